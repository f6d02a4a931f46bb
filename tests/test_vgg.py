"""VGG-16 for DeepLab v1/v2: sizes, parameter counts, ImageNet weights, v1 and v2 heads."""

import dataclasses
import gc
import urllib.error

import keras
import numpy as np
import pytest

from deeplab_tf import build_model, get_variant
from deeplab_tf.backbones import WeightsUnavailableError, build_backbone, transfer_weights, vgg
from deeplab_tf.backbones.vgg import decimation_taps, fc_kernels_from_dense
from deeplab_tf.layers import ATROUS_IMPLEMENTATIONS, AtrousConv2D
from deeplab_tf.model import added_layer_names
from tests.helpers import (
    assert_close_relative,
    assert_same_weights,
    numpy_atrous_conv2d,
    numpy_atrous_conv2d_bound,
)
from tests.tolerances import assert_within, network_rtol, sum_rtol

rng = np.random.default_rng(0)


def _conv(k, cin, cout):
    return k * k * cin * cout + cout


VGG16_CONV_PARAMS = sum(
    _conv(3, cin, cout)
    for cin, cout in [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256)]
    + [(256, 256)] * 2
    + [(256, 512)]
    + [(512, 512)] * 5
)


class TestV1Configurations:
    @pytest.mark.parametrize(
        "name, kernel, filters, paper_millions",
        [
            ("deeplabv1-7x7", 7, 4096, 134.3),
            ("deeplabv1", 4, 4096, 65.1),
            ("deeplabv1-4x4-r8", 4, 4096, 65.1),
            ("deeplabv1-largefov", 3, 1024, 20.5),
        ],
    )
    def test_parameter_counts_and_306_to_39(self, name, kernel, filters, paper_millions):
        """v1 Table 2 / v2 Table 1 with 21 classes: 134.3M, 65.1M, 65.1M, 20.5M; and a
        306x306 image gives 39x39 logits (v1 section 3.2)."""
        model = build_model(name, 21, upsample_logits=False, input_shape=(306, 306, 3))
        count = model.count_params()
        print(f"{name}: {count:,} parameters")
        assert abs(count - paper_millions * 1e6) < 0.1e6, count
        fc = _conv(kernel, 512, filters) + _conv(1, filters, filters) + _conv(1, filters, 21)
        assert count == VGG16_CONV_PARAMS + fc
        assert model.output.shape == (None, 39, 39, 21)
        del model
        gc.collect()

    def test_head_layers_follow_the_paper(self):
        model = build_model("deeplabv1-4x4-r8", 21)
        fc6 = model.get_layer("fc6")
        assert (fc6.kernel_size, fc6.rate, fc6.filters) == (4, 8, 4096)
        assert [model.get_layer(n).rate for n in ("drop6", "drop7")] == [0.5, 0.5]
        backbone = model.get_layer("vgg16")
        pools = [backbone.get_layer(f"block{b}_pool") for b in range(1, 6)]
        assert [p.pool_size for p in pools] == [(3, 3)] * 5
        assert [p.strides for p in pools] == [(2, 2)] * 3 + [(1, 1)] * 2
        assert [backbone.get_layer(f"block5_conv{i}").rate for i in (1, 2, 3)] == [2, 2, 2]
        assert [(f.name, f.reduction) for f in backbone.feature_info][-1] == ("block5_pool", 8)


def _apply(model, names, x):
    for name in names:
        x = model.get_layer(name)(x)
    return np.asarray(x)


class TestImageNetConvolutions:
    """Our VGG-16 against keras.applications.VGG16 with the same (random) weights."""

    @pytest.fixture(scope="class")
    def pair(self):
        reference = keras.applications.VGG16(weights=None, include_top=False)
        ours = build_backbone("vgg16", output_stride=8)
        report = transfer_weights(reference, ours)
        assert report.missing == [] and report.unused == []
        return reference, ours

    def test_features_before_the_first_changed_pooling_are_identical(self, pair):
        reference, ours = pair
        x = rng.uniform(0, 255, size=(1, 37, 30, 3)).astype("float32")
        ref = keras.Model(reference.input, reference.get_layer("block1_conv2").output)
        mine = keras.Model(ours.input, ours.get_layer("block1_conv2").output)
        expected = ref(keras.applications.vgg16.preprocess_input(x.copy()))
        np.testing.assert_array_equal(np.asarray(mine(x)), np.asarray(expected))

    @pytest.mark.parametrize("block, convs", [(1, 2), (2, 2), (3, 3), (4, 3)])
    def test_conv1_to_conv4_blocks_are_identical(self, pair, block, convs):
        """Each of conv1..conv4 (the layers between the changed poolings) computes
        exactly what keras.applications' does on the same input."""
        reference, ours = pair
        channels = ours.get_layer(f"block{block}_conv1").input.shape[-1]
        x = rng.normal(size=(1, 19, 14, channels)).astype("float32")
        names = [f"block{block}_conv{i}" for i in range(1, convs + 1)]
        np.testing.assert_array_equal(_apply(ours, names, x), _apply(reference, names, x))

    def test_conv5_with_holes_equals_keras_conv5_on_the_decimated_map(self, pair):
        """The hole algorithm (v1 section 3.1): conv5 at dilation 2 on the dense map, read
        every other pixel, is keras's conv5 on the map decimated by 2."""
        reference, ours = pair
        x = rng.normal(size=(1, 18, 15, 512)).astype("float32")
        names = [f"block5_conv{i}" for i in (1, 2, 3)]
        dense = _apply(ours, [n for name in names for n in (name, f"{name}_relu")], x)
        sparse = _apply(reference, names, x[:, ::2, ::2])
        # Dilated against plain 3x3 convolutions over 512 channels, three in series.
        assert_close_relative(dense[:, ::2, ::2], sparse, network_rtol(3, 9 * 512))


class TestFcConversion:
    C, F = 3, 8

    def _known(self):
        # kernel[i, j, c, f] = 1000 i + 100 j + 10 c + f / 10: every entry tells where it is.
        i, j, c, f = np.meshgrid(*(np.arange(n) for n in (7, 7, self.C, self.F)), indexing="ij")
        kernel = (1000 * i + 100 * j + 10 * c + f / 10).astype("float32")
        fc1 = [kernel.reshape(49 * self.C, self.F), np.arange(self.F, dtype="float32")]
        fc2 = [rng.normal(size=(self.F, self.F)).astype("float32"), -np.arange(self.F) * 1.0]
        return kernel, fc1, fc2

    @pytest.mark.parametrize("size, taps", [(7, range(7)), (4, (0, 2, 4, 6)), (3, (0, 3, 6))])
    def test_decimation_keeps_evenly_spaced_taps(self, size, taps):
        kernel, fc1, fc2 = self._known()
        (k6, b6), (k7, _) = fc_kernels_from_dense(fc1, fc2, size, self.F)
        taps = np.asarray(taps)
        assert list(decimation_taps(size)) == list(taps)
        np.testing.assert_array_equal(k6, kernel[taps][:, taps])
        np.testing.assert_array_equal(b6, fc1[1])
        np.testing.assert_array_equal(k7, fc2[0].reshape(1, 1, self.F, self.F))

    def test_subset_of_filters_is_seeded_and_consistent(self):
        kernel, fc1, fc2 = self._known()
        (k6, b6), (k7, b7) = fc_kernels_from_dense(fc1, fc2, 3, 3, seed=5)
        keep6 = np.asarray(b6, int)  # fc1's bias is the filter index
        assert len(set(keep6)) == 3 and list(keep6) == sorted(keep6)
        np.testing.assert_array_equal(k6, kernel[::3, ::3][..., keep6])
        keep7 = -np.asarray(b7, int)
        # fc7 reads exactly the fc6 filters that were kept.
        np.testing.assert_array_equal(k7[0, 0], fc2[0][keep6][:, keep7])
        (again, _), _ = fc_kernels_from_dense(fc1, fc2, 3, 3, seed=5)
        np.testing.assert_array_equal(again, k6)
        (other, _), _ = fc_kernels_from_dense(fc1, fc2, 3, 3, seed=6)
        assert not np.array_equal(other, k6)

    def test_7x7_conversion_computes_the_dense_layer(self):
        """Keras flattens pool5 in (row, column, channel) order: the converted 7x7
        convolution equals Flatten + Dense on a 7x7 map."""
        _, fc1, fc2 = self._known()
        fc1 = [rng.normal(size=fc1[0].shape).astype("float32"), fc1[1]]
        x = rng.normal(size=(2, 7, 7, self.C)).astype("float32")
        dense = keras.layers.Dense(self.F)
        dense.build((None, 49 * self.C))
        dense.set_weights(fc1)
        expected = np.asarray(dense(keras.layers.Flatten()(x)))
        (k6, b6), _ = fc_kernels_from_dense(fc1, fc2, 7, self.F)
        conv = np.einsum("nijc,ijcf->nf", x, k6) + b6
        # Two float32 sums of the same 49 C products in other orders.
        atol = 2 * sum_rtol(49 * self.C) * np.abs(expected).max()
        np.testing.assert_allclose(conv, expected, atol=atol)

    def test_bad_shapes(self):
        _, fc1, fc2 = self._known()
        with pytest.raises(ValueError, match=r"filters must be in 1\.\.8"):
            fc_kernels_from_dense(fc1, fc2, 3, 9)
        with pytest.raises(ValueError, match="are not VGG's"):
            fc_kernels_from_dense([fc1[0][:-1], fc1[1]], fc2, 3, 4)


class TestImageNetWeights:
    def test_largefov_gets_convolutions_and_converted_fc_layers(self, monkeypatch):
        """build_model(..., backbone_weights="imagenet") with the ImageNet VGG16 replaced
        (no download here) by keras.applications.VGG16(weights=None)'s convolutions and
        its top with fc1/fc2 64 wide instead of 4096 (a 32-wide LargeFOV keeps a subset)."""
        convs = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
        x = keras.layers.Flatten(name="flatten")(convs.output)
        x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
        x = keras.layers.Dense(64, activation="relu", name="fc2")(x)
        source = keras.Model(convs.input, x)
        monkeypatch.setattr(vgg, "weights_source", lambda arch, weights: source)
        variant = dataclasses.replace(get_variant("deeplabv1-largefov"), head_filters=32)
        model = build_model(variant, 21, backbone_weights="imagenet")
        backbone = model.get_layer("vgg16")
        for name in ("block1_conv1", "block4_conv2", "block5_conv3"):
            assert_same_weights(backbone.get_layer(name), source.get_layer(name))
        fc6, fc7 = fc_kernels_from_dense(
            source.get_layer("fc1").get_weights(), source.get_layer("fc2").get_weights(), 3, 32
        )
        for layer, expected in (("fc6", fc6), ("fc7", fc7)):
            for a, b in zip(model.get_layer(layer).get_weights(), expected, strict=True):
                np.testing.assert_array_equal(a, b)

    def test_imagenet_offline_gives_a_clear_error(self, monkeypatch, tmp_path):
        from keras.src.utils import file_utils

        def offline(*args, **kwargs):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

        monkeypatch.setattr(file_utils, "urlretrieve", offline)
        monkeypatch.setattr(file_utils.config, "keras_home", lambda: str(tmp_path))
        with pytest.raises(WeightsUnavailableError, match=r"ImageNet weights of vgg16.*with-top"):
            build_model("deeplabv1-largefov", 21, backbone_weights="imagenet")

    def test_missing_file(self, tmp_path):
        with pytest.raises(WeightsUnavailableError, match=r"file not found: .*nope\.h5"):
            build_model("deeplabv1-largefov", 21, backbone_weights=tmp_path / "nope.h5")


class TestV2AsppOnVgg:
    def test_branches_are_summed(self):
        """ASPP-S (v2 Fig. 7): four fc6-fc7-fc8 branches, rates 2/4/8/12, logits summed."""
        model = build_model("deeplabv2-vgg16-aspp-s", 5, upsample_logits=False)
        assert [model.get_layer(f"fc6_{i}").rate for i in (1, 2, 3, 4)] == [2, 4, 8, 12]
        branches = [model.get_layer(f"logits_{i}").output for i in (1, 2, 3, 4)]
        probe = keras.Model(model.input, [*branches, model.output])
        *parts, total = probe(rng.uniform(0, 255, size=(1, 33, 41, 3)).astype("float32"))
        # A 4-term float32 sum in another order: 3 roundings of the parts, which can be
        # a few times the total where branches cancel; 1e-5 of the total is 84 eps.
        assert_close_relative(total, np.sum(parts, axis=0), 1e-5)


class TestMultiscaleFeatures:
    def test_msc_adds_640_channels_and_starts_at_the_largefov_model(self):
        """DeepLab-MSc (v1 section 4.3): five 128 3x3 + 128 1x1 MLPs (640 channels); its
        extra classifier starts at zero, so with the LargeFOV weights it predicts as
        the LargeFOV model does."""
        variant = get_variant("deeplabv1-msc-largefov")
        msc = build_model(variant, 21, upsample_logits=False)
        largefov = build_model("deeplabv1-largefov", 21, upsample_logits=False)
        report = transfer_weights(largefov, msc)
        assert sorted(report.missing) == sorted(added_layer_names(variant))
        assert msc.get_layer("msc_features").output.shape[-1] == 640
        mlp_inputs = (3, 64, 128, 256, 512)
        extra = sum(_conv(3, c, 128) + _conv(1, 128, 128) for c in mlp_inputs)
        assert msc.count_params() - largefov.count_params() == extra + _conv(1, 640, 21)
        x = rng.uniform(0, 255, size=(1, 41, 41, 3)).astype("float32")
        # The same layers up to the classifier, whose sum gains 640 (zero) terms in
        # another blocking: one layer's float32 bound.
        assert_close_relative(msc(x), largefov(x), sum_rtol(1024 + 640))
        assert msc.get_layer("msc_image_conv1").strides == (8, 8)


@pytest.mark.parametrize("implementation", ATROUS_IMPLEMENTATIONS)
@pytest.mark.parametrize("rate", [4, 8])
def test_even_4x4_fc6_kernel_is_centred(implementation, rate):
    """The v1 4x4 fc6 with 'same' padding: taps at -3r/2, -r/2, r/2, 3r/2 around each
    output (numpy reference, symmetric padding (k - 1) r / 2)."""
    x = rng.normal(size=(1, 11, 9, 3)).astype("float32")
    layer = AtrousConv2D(2, 4, rate=rate, implementation=implementation, use_bias=False)
    layer.build(x.shape)
    w = np.asarray(layer.kernel)
    expected = numpy_atrous_conv2d(x, w, rate, "same")
    # Higham's bound on each 4x4 taps x 3 channels sum.
    assert_within(layer(x), expected, numpy_atrous_conv2d_bound(x, w, rate, "same"))


def test_vgg_runs_at_output_stride_8_only():
    with pytest.raises(ValueError, match="deeplabv1-largefov runs at output stride 8 only"):
        build_model("deeplabv1-largefov", 3, output_stride=16)
    with pytest.raises(ValueError, match="vgg16 runs at output stride 8 only"):
        build_backbone("vgg16", output_stride=16)
