"""Multi-scale inputs with max fusion (DeepLab v2 MSC): fusion, the training loss, files."""

import dataclasses

import keras
import numpy as np
import pytest

from deeplab_tf import build_model, get_variant
from deeplab_tf.inference import Predictor, model_at_output_stride
from deeplab_tf.losses import SoftmaxCrossEntropy
from deeplab_tf.multiscale import MultiScaleInputs, scaled_size, single_scale_model
from deeplab_tf.training import load_init_checkpoint
from tests.helpers import assert_same_weights
from tests.tolerances import network_rtol, sum_rtol, sum_to_one_atol

rng = np.random.default_rng(0)
TINY = dataclasses.replace(get_variant("deeplabv3-mobilenetv2"), alpha=0.35, head_filters=16)
SCALES = (1.0, 0.75, 0.5)
# Bilinear resizing sums 4 weighted terms in float32 where numpy does in float64.
RESIZE_RTOL = sum_rtol(4)
# The wrapped network's float32 bound: its 4 convolutions in series and the input's
# float32 rounding, sums of at most 3x3x16 terms.
NETWORK_RTOL = network_rtol(5, 9 * 16)


@pytest.mark.parametrize(
    "size, scale, expected",
    # TF1 DeepLab's scale_dimension, int((d - 1) * scale + 1), worked by hand: the v2
    # MSC scales of a 321 crop, the half of a 513 image, and a size that stays >= 1.
    [
        (321, 0.75, 241),
        (321, 0.5, 161),
        (513, 0.5, 257),
        (513, 0.25, 129),
        (1, 0.5, 1),
        (2, 0.5, 1),
    ],
)
def test_scaled_size_keeps_the_corner_pixels_on_the_grid(size, scale, expected):
    assert int(scaled_size(size, scale)) == expected


def _msc_model(num_classes=4, upsample_logits=False):
    """The wrapper around a small stride-8 network (it does not depend on what it wraps;
    the ResNet-101 variant trains in tests/test_paper_variants.py)."""
    keras.utils.set_random_seed(0)
    image = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, -1.0)(image)
    for filters in (8, 16, 16):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    logits = keras.layers.Conv2D(num_classes, 1, name="logits")(x)
    base = keras.Model(image, logits, name="tiny_single_scale")
    return MultiScaleInputs(base, SCALES, upsample_logits=upsample_logits, name="tiny_msc")


def _resize_aligned(x: np.ndarray, size) -> np.ndarray:
    """numpy bilinear resize of [N, H, W, C] with corners aligned."""

    def along(axis, x, out):
        n = x.shape[axis]
        src = np.arange(out) * ((n - 1) / (out - 1) if out > 1 else 0.0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n - 1)
        w = (src - low).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        return np.take(x, low, axis) * (1 - w) + np.take(x, high, axis) * w

    return along(2, along(1, x.astype(np.float64), size[0]), size[1])


def _subsample_labels(labels: np.ndarray, size) -> np.ndarray:
    """Nearest label with corners aligned: row i of h takes round(i (H - 1) / (h - 1))."""
    rows = np.floor(np.arange(size[0]) * (labels.shape[1] - 1) / max(size[0] - 1, 1) + 0.5)
    cols = np.floor(np.arange(size[1]) * (labels.shape[2] - 1) / max(size[1] - 1, 1) + 0.5)
    return labels[:, rows.astype(int)][:, :, cols.astype(int)]


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy over the pixels not labelled 255."""
    logits = logits.astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    valid = labels != 255
    picked = np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return float(-picked[valid].mean())


def _batch(size=(33, 41)):
    x = rng.uniform(0, 255, size=(2, *size, 3)).astype("float32")
    y = rng.integers(0, 4, size=(2, *size)).astype("int32")
    y[0, :5] = 255
    return x, y


def test_fused_logits_are_the_max_of_the_resized_scales():
    """v2 section 3.2: the image at 1, 0.75, 0.5 (sizes (H - 1) s + 1), shared weights,
    logits resized to the scale-1 logits' size and fused by a per-pixel max."""
    model = _msc_model()
    x, _ = _batch()
    outputs = {k: np.asarray(v) for k, v in model(x, training=True).items()}
    per_scale = [outputs[f"scale_{scale:g}"] for scale in SCALES]
    assert [p.shape[1:3] for p in per_scale] == [(5, 6), (4, 4), (3, 3)]
    expected = np.max([_resize_aligned(p, (5, 6)) for p in per_scale], axis=0)
    assert np.abs(expected).mean() > 0.01
    atol = RESIZE_RTOL * np.abs(expected).max()
    np.testing.assert_allclose(outputs["fused"], expected, atol=atol)
    # Each scale is the one network on the resized image (numpy resizing here: float
    # rounding differences only).
    base = single_scale_model(model)
    for scale, logits in zip(SCALES, per_scale, strict=True):
        size = (int(32 * scale) + 1, int(40 * scale) + 1)
        image = _resize_aligned(x, size).astype("float32")
        atol = NETWORK_RTOL * np.abs(logits).max()
        np.testing.assert_allclose(np.asarray(base(image)), logits, atol=atol)
    # Evaluation and prediction get the fused logits, at the input size when upsampled.
    assert model(x).shape == (2, 5, 6, 4)
    upsampled = _msc_model(upsample_logits=True)
    upsampled.set_weights(model.get_weights())
    fused = np.asarray(model(x))
    expected = _resize_aligned(fused, (33, 41))
    atol = RESIZE_RTOL * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(upsampled(x)), expected, atol=atol)


def test_training_loss_is_the_sum_of_the_scale_and_fused_losses():
    """Each of the three scales' logits and the fused logits against the labels
    subsampled to its own size; fit's loss is their sum; evaluation sees the fused."""
    model = _msc_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss=SoftmaxCrossEntropy(upsample_logits=False)
    )
    x, y = _batch()
    outputs = model(x, training=True)
    assert list(outputs) == ["scale_1", "scale_0.75", "scale_0.5", "fused"]
    by_hand = [
        _cross_entropy(np.asarray(v), _subsample_labels(y, v.shape[1:3])) for v in outputs.values()
    ]
    total = sum(by_hand)
    # float32 means of positive terms (at most 2x5x6 pixels a scale, each a 4-class
    # log-softmax) against float64; fit and evaluate run another trace of the network
    # (its bound on the logits) and average in a metric.
    rel = sum_rtol(2 * 5 * 6 * 4)
    assert float(model.compute_loss(x, y, outputs)) == pytest.approx(total, rel=rel)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(total, rel=rel + NETWORK_RTOL)
    fused = np.asarray(model(x, training=False))
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    expected = _cross_entropy(fused, _subsample_labels(y, (5, 6)))
    assert evaluated == pytest.approx(expected, rel=rel + NETWORK_RTOL)


def test_keras_file_round_trip_and_training_after_loading(tmp_path):
    model = _msc_model()
    model.compile(optimizer="sgd", loss=SoftmaxCrossEntropy(upsample_logits=False))
    x, y = _batch()
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "msc.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, MultiScaleInputs) and loaded.scales == SCALES
    # The same weights in a newly traced network: its float32 bound.
    expected = np.asarray(model(x))
    atol = NETWORK_RTOL * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(loaded(x)), expected, atol=atol)
    # The optimizer state came back: the next step is the same in both.
    np.testing.assert_allclose(
        loaded.train_on_batch(x, y), model.train_on_batch(x, y), rtol=NETWORK_RTOL
    )


def test_single_scale_checkpoint_initialises_the_msc_network(tmp_path):
    keras.utils.set_random_seed(1)
    single = build_model(TINY, 4, output_stride=8)
    path = tmp_path / "single.keras"
    single.save(path)
    model = build_model(dataclasses.replace(TINY, input_scales=SCALES), 4, output_stride=8)
    assert isinstance(model, MultiScaleInputs)
    load_init_checkpoint(model, path)
    assert_same_weights(single, single_scale_model(model))


def test_scales_must_start_at_1():
    with pytest.raises(ValueError, match=r"start with 1\.0"):
        dataclasses.replace(TINY, input_scales=(0.5, 1.0))


def test_output_stride_switch_of_an_msc_variant():
    """v2 MSC on a small ResNet (the quickstart's, at its native OS8): rebuilt at OS8
    it gives the model's own probabilities; at OS16 the shared network gets OS16's
    rates with every weight moved, and valid, different probabilities."""
    keras.utils.set_random_seed(0)
    variant = dataclasses.replace(
        get_variant("deeplabv3-resnet10-cpu"), name="resnet10-msc", input_scales=SCALES
    )
    model = build_model(variant, 4)
    image = np.random.default_rng(0).integers(0, 256, (41, 49, 3)).astype(np.uint8)
    native = Predictor(model).predict(image)
    same = Predictor(model, output_stride=8, variant=variant).predict(image)
    # The same layers and weights through the same kernels: up to the softmax's last
    # rounding (1e-6 is 8 eps at 1).
    np.testing.assert_allclose(same, native, atol=1e-6)
    os16 = model_at_output_stride(model, 16, variant)
    network = single_scale_model(os16)
    assert network.get_layer("aspp").rates == variant.aspp_rates_at(16)
    assert single_scale_model(model).get_layer("aspp").rates == variant.aspp_rates_at(8)
    for a, b in zip(os16.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    coarse = Predictor(model, output_stride=16, variant=variant).predict(image)
    np.testing.assert_allclose(coarse.sum(-1), 1.0, atol=sum_to_one_atol(4))
    assert coarse.shape == native.shape and np.abs(coarse - native).max() > 1e-4
