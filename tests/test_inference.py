import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from deeplab_tf import build_model
from deeplab_tf.inference import (
    InferenceError,
    Predictor,
    model_at_output_stride,
    tile_starts,
)
from tests.helpers import ROOT, TINY_RTOL, tiny_model, tiny_variant, write_model_dir
from tests.test_losses import numpy_bilinear_aligned
from tests.tolerances import model_probability_atol, network_rtol, sum_to_one_atol

rng = np.random.default_rng(3)


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_classes=5)


@pytest.fixture(scope="module")
def image():
    return rng.integers(0, 256, (45, 61, 3)).astype(np.uint8)


def numpy_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def probability_bound(model, image, rtol=TINY_RTOL) -> float:
    """``model_probability_atol`` for one image, by default of the tiny network."""
    return model_probability_atol(model, image[None], rtol)


def logits_at_stride(model, x):
    """The classifier's output (before the model's own upsampling), float64."""
    head = keras.Model(model.inputs, model.get_layer("logits").output)
    return np.asarray(head(x.astype("float32"), training=False), np.float64)


class TestOutputStride:
    def test_same_weights_at_os16_and_os8(self, model, image):
        """v3 section 4.2: trained at OS16, evaluated at OS8 with the same weights."""
        os16 = Predictor(model).predict(image)
        os8 = Predictor(model, output_stride=8, variant=tiny_variant()).predict(image)
        assert os16.shape == os8.shape == (45, 61, 5)
        np.testing.assert_allclose(os8.sum(-1), 1.0, atol=sum_to_one_atol(5))
        assert np.abs(os16 - os8).max() > 1e-3  # a denser feature map, other values
        # Rebuilt at the stride it already has: identical, so every weight moved.
        again = Predictor(model, output_stride=16, variant=tiny_variant()).predict(image)
        # The same layers and weights: the same kernels on the same values, equal up to
        # the softmax's last rounding (1e-6 is 8 eps at 1).
        np.testing.assert_allclose(again, os16, atol=1e-6)

    def test_rebuilt_model_has_the_rates_of_os8(self, model):
        rebuilt = model_at_output_stride(model, 8, tiny_variant())
        assert rebuilt.get_layer("aspp").rates == (12, 24, 36)
        assert model.get_layer("aspp").rates == (6, 12, 18)
        for a, b in zip(rebuilt.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)

    def test_from_a_model_dir_without_naming_the_variant(self, model, image, tmp_path):
        """config.json tells the variant (a custom dataclass here) and the stride."""
        model_dir = write_model_dir(model, tmp_path / "run", data_dir=None)
        predictor = Predictor(model_dir, output_stride=8)
        assert predictor.output_stride == 8 and predictor.num_classes == 5
        expected = Predictor(model, output_stride=8, variant=tiny_variant()).predict(image)
        # The same rebuilt network either way: up to the softmax's last rounding.
        np.testing.assert_allclose(predictor.predict(image), expected, atol=1e-6)
        assert Predictor(model_dir).output_stride == 16

    def test_unregistered_model_needs_its_variant(self, model):
        with pytest.raises(InferenceError, match="'tiny' is not a registered variant"):
            Predictor(model, output_stride=8)

    def test_wrong_variant_is_a_clear_error(self, model):
        with pytest.raises(InferenceError, match="does not match variant 'deeplabv3-mobilenetv2'"):
            Predictor(model, output_stride=8, variant="deeplabv3-mobilenetv2")


def test_logits_after_the_classifier_are_kept():
    """Only the final bilinear upsampling is left to the Predictor: layers after the
    classifier (DeepLab-MSc's extra classifier here) stay in the model."""
    model = build_model("deeplabv1-msc-largefov", num_classes=3)
    extra = model.get_layer("logits_msc")
    extra.set_weights([rng.normal(0, 0.05, w.shape) for w in extra.get_weights()])
    image = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
    expected = numpy_softmax(np.asarray(model(image[None].astype("float32")), np.float64)[0])
    # The Predictor's own trace of the network: VGG-16's 13 convolutions, fc6..fc8 and the
    # MSc classifier in series (17), sums of up to 3x3x512 terms.
    atol = probability_bound(model, image, network_rtol(17, 9 * 512))
    np.testing.assert_allclose(Predictor(model).predict(image), expected, atol=atol)


class TestScalesAndFlips:
    def test_probabilities_sum_to_one_and_flip_equivariant(self, model, image):
        """Flip the image, flip the result back: the same probabilities (v3 Table 4)."""
        predictor = Predictor(model, scales=(0.5, 1.0, 1.75), flip=True)
        p = predictor.predict(image)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=sum_to_one_atol(5))
        p_flipped = predictor.predict(image[:, ::-1])
        # Equal up to the network's float32 bound (a resized mirror is not bit-for-bit
        # the mirror of the resized image, and convolutions sum mirrored windows in
        # another order).
        atol = probability_bound(model, image)
        np.testing.assert_allclose(p_flipped[:, ::-1], p, atol=atol)
        # Without flips the model alone is not mirror-symmetric: the test can fail.
        single = Predictor(model, scales=(0.5, 1.0, 1.75))
        asymmetry = np.abs(single.predict(image[:, ::-1])[:, ::-1] - single.predict(image))
        assert asymmetry.max() > 1e-2, asymmetry.max()

    @pytest.mark.parametrize("fusion", ["mean", "max"])
    def test_fusion_matches_numpy(self, model, image, fusion):
        """mean: average of softmax over scales and flips (v3); max: softmax of the
        per-pixel maximum logit (v2 MSC). Scaled sizes are (d - 1) s + 1."""
        scales = (0.5, 1.25)
        predictor = Predictor(model, scales=scales, flip=True, fusion=fusion)
        x = image[None].astype(np.float64)
        logits = []
        for s in scales:
            size = (int((45 - 1) * s + 1), int((61 - 1) * s + 1))
            scaled = numpy_bilinear_aligned(x, size)
            for flip in (False, True):
                inp = scaled[:, :, ::-1] if flip else scaled
                out = numpy_bilinear_aligned(logits_at_stride(model, inp), (45, 61))
                logits.append(out[:, :, ::-1] if flip else out)
        logits = np.concatenate(logits)
        if fusion == "mean":
            expected = numpy_softmax(logits).mean(0)
        else:
            expected = numpy_softmax(logits.max(0))
        # TensorFlow resizes in float32 where numpy resizes in float64: the network's
        # input differs by its rounding, one more layer of the network's bound.
        atol = probability_bound(model, image, network_rtol(56, 480))
        np.testing.assert_allclose(predictor.predict(image), expected, atol=atol)

    @pytest.mark.parametrize("fusion", ["mean", "max"])
    def test_a_batch_gives_each_image_its_own_probabilities(self, model, image, fusion):
        """batch_probabilities (traced by the exported signatures) on two images equals
        predict on each: scales and flips never mix the images of a batch."""
        predictor = Predictor(model, scales=(0.75, 1.0), flip=True, fusion=fusion)
        images = np.stack([image, image[::-1, ::-1]])
        batch = predictor.batch_probabilities(images.astype(np.float32)).numpy()
        for i in range(2):  # batched convolutions block their sums in another order
            atol = probability_bound(model, images[i])
            np.testing.assert_allclose(batch[i], predictor.predict(images[i]), atol=atol)

    def test_jit_compile_gives_the_same_probabilities(self, model, image):
        """Only the model is compiled: XLA's CPU aligned-corners resize is wrong for the
        3x4 -> 45x61 logits of this image (TensorFlow issue 118344)."""
        plain = Predictor(model).predict(image)
        compiled = Predictor(model, jit_compile=True)
        # XLA's own CPU kernels: the network's float32 bound.
        atol = probability_bound(model, image)
        np.testing.assert_allclose(compiled.predict(image), plain, atol=atol)

    def test_bad_settings(self, model):
        with pytest.raises(InferenceError, match="scales must be positive"):
            Predictor(model, scales=(1.0, 0.0))
        with pytest.raises(InferenceError, match="fusion must be one of"):
            Predictor(model, fusion="median")
        with pytest.raises(InferenceError, match="tile_overlap must be in"):
            Predictor(model, tile_overlap=1.0)


class TestSlidingWindows:
    def test_tile_starts_cover_with_overlap(self):
        assert tile_starts(10, 4, 0.5) == [0, 2, 4, 6]
        assert tile_starts(11, 4, 0.5) == [0, 2, 4, 6, 7]
        assert tile_starts(4, 8, 0.5) == [0]
        for length, tile, overlap in [(1000, 97, 1 / 3), (98, 97, 0.0), (513, 100, 0.25)]:
            starts = tile_starts(length, tile, overlap)
            assert starts[0] == 0 and starts[-1] == length - tile
            gaps = np.diff(starts)
            assert (gaps > 0).all() and (tile - gaps >= round(overlap * tile)).all()

    def test_window_covering_the_image_equals_whole_image(self, model, image):
        whole = Predictor(model, tiling="whole").predict(image)
        covering = Predictor(model, tile_size=(45, 61)).predict(image)
        np.testing.assert_array_equal(covering, whole)
        tiled = Predictor(model, tile_size=24).predict(image)  # 3 x 4 tiles
        np.testing.assert_allclose(tiled.sum(-1), 1.0, atol=sum_to_one_atol(5))
        assert np.abs(tiled - whole).max() > 1e-3  # really tiled: less context per tile

    def test_pointwise_model_is_unchanged_by_tiling(self, image):
        """For a per-pixel model every tile gives each pixel the same probabilities, so
        stitching must reproduce the whole image exactly: any misplaced tile shows."""
        keras.utils.set_random_seed(1)
        pointwise = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(4, 1)])
        whole = Predictor(pointwise, tiling="whole").predict(image)
        for tile, overlap in [(16, 1 / 3), ((20, 7), 0.5), (44, 0.0)]:
            tiled = Predictor(pointwise, tile_size=tile, tile_overlap=overlap).predict(image)
            # Each pixel's 3-term sum, then a softmax and a mean of up to 4 equal
            # vectors: a few roundings at 1 (1e-6 is 8 eps) where a misplaced tile
            # changes probabilities by their size.
            np.testing.assert_allclose(tiled, whole, atol=1e-6)

    def test_overlaps_are_averaged(self):
        """A model that paints each tile with one vector computed from its mean colour:
        a pixel gets the mean of the tiles covering it (tile 4x4 on 10x9 with overlap
        0.5: rows start at 0, 2, 4, 6 and columns at 0, 2, 4, 5)."""
        keras.utils.set_random_seed(2)
        inputs = keras.Input((None, None, 3))
        pooled = keras.layers.GlobalAveragePooling2D(keepdims=True)(inputs)
        scores = keras.layers.Dense(3)(pooled / 255.0) * 5.0
        broadcast = keras.layers.Lambda(lambda t: t[0] + 0.0 * t[1][..., :1])([scores, inputs])
        painter = keras.Model(inputs, broadcast)
        image = rng.integers(0, 256, (10, 9, 3)).astype(np.uint8)
        got = Predictor(painter, tile_size=4, tile_overlap=0.5).predict(image)
        tiles = {}
        for r in (0, 2, 4, 6):
            for c in (0, 2, 4, 5):
                crop = image[None, r : r + 4, c : c + 4].astype("float32")
                tiles[r, c] = numpy_softmax(np.asarray(painter(crop))[0, 0, 0])
        for y in range(10):
            for x in range(9):
                covering = [p for (r, c), p in tiles.items() if r <= y < r + 4 and c <= x < c + 4]
                # A float32 mean of at most 4 probability vectors: 4 eps at 1 < 1e-6.
                np.testing.assert_allclose(got[y, x], np.mean(covering, 0), atol=1e-6)

    def test_labels_and_streamed_probabilities(self, model, image):
        predictor = Predictor(model, tile_size=20)
        probabilities = np.zeros((45, 61, 5), np.float32)
        labels = predictor.predict_labels(image, probabilities_out=probabilities)
        np.testing.assert_array_equal(probabilities, predictor.predict(image))
        np.testing.assert_array_equal(labels, probabilities.argmax(-1))
        assert labels.dtype == np.uint8


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests.helpers import tiny_model
    from deeplab_tf.inference import Predictor

    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024

    model = tiny_model(num_classes=6)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (200, 200, 3)).astype(np.uint8)
    large = rng.integers(0, 256, (1280, 1280, 3)).astype(np.uint8)
    predictors = {
        "sliding": Predictor(model, tile_size=128),
        "whole": Predictor(model, tiling="whole"),
    }
    growth = {}
    for name, predictor in predictors.items():
        predictor.predict_labels(small)  # traced before measuring
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        before = status_mb("VmRSS")
        predictor.predict_labels(large)
        growth[name] = status_mb("VmHWM") - before
    print(json.dumps(growth))
    """
)


def test_sliding_window_memory_is_bounded():
    """The peak resident memory above the resident memory before the call (Linux
    VmHWM after a reset, minus VmRSS), for a 1280x1280 image: with 128-pixel tiles
    it stays small, while the same model on the whole image needs far more (about
    300 MB here, growing with the pixels): the bound comes from the tiles."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    # The label map (1.6 MB) and one band of 128 rows of probabilities (4 MB) are all
    # that grows with the image.
    assert growth["sliding"] < 40, growth
    assert growth["whole"] > 150, growth
