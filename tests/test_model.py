import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf import VARIANTS, build_model, get_variant
from deeplab_tf.variants import Variant
from tests.helpers import TINY_RTOL, assert_close_relative, calibrate_batch_norm
from tests.tolerances import network_rtol

rng = np.random.default_rng(0)
# A MobileNetV2 at width 0.35 keeps the runs at 513x513 fast on a CPU.
TINY = dataclasses.replace(get_variant("deeplabv3-mobilenetv2"), alpha=0.35, head_filters=16)
# Float32 bound (tests/tolerances.py): ResNet-50's 49 and block5..7's 27 layers and the
# head's 3, sums of at most 4608 terms (TINY's is TINY_RTOL).
RESNET50_CASCADE_RTOL = network_rtol(79, 9 * 512)


def _ceil_div(a, b):
    return -(-a // b)


class TestOutputSizes:
    @pytest.mark.parametrize("output_stride, size", [(8, 65), (16, 33), (32, 17)])
    def test_deeplabv3_resnet101_at_513(self, output_stride, size):
        """513 -> 65 at OS8, 33 at OS16 (DESIGN.md), from the graph's static shapes."""
        logits = build_model(
            "deeplabv3",
            21,
            output_stride=output_stride,
            upsample_logits=False,
            input_shape=(513, 513, 3),
        )
        assert logits.output.shape == (None, size, size, 21)
        assert logits.get_layer("aspp").rates == tuple(r * 16 // output_stride for r in (6, 12, 18))

    @pytest.mark.parametrize("output_stride", [8, 16])
    def test_run_at_513(self, output_stride):
        x = rng.uniform(0, 255, size=(1, 513, 513, 3)).astype("float32")
        model = build_model(TINY, 21, output_stride=output_stride)
        assert model(x).shape == (1, 513, 513, 21)
        stride_logits = build_model(TINY, 21, output_stride=output_stride, upsample_logits=False)
        assert stride_logits(x).shape == (1, 513 // output_stride + 1, 513 // output_stride + 1, 21)

    @pytest.mark.parametrize("size", [(97, 131), (64, 33), (1025, 2049)])
    def test_odd_non_square_and_large(self, size):
        model = build_model(TINY, 5, upsample_logits=False)
        full = build_model(TINY, 5)
        full.set_weights(model.get_weights())
        x = rng.uniform(0, 255, size=(1, *size, 3)).astype("float32")
        assert model(x).shape == (1, _ceil_div(size[0], 16), _ceil_div(size[1], 16), 5)
        assert full(x).shape == (1, *size, 5)

    def test_different_sizes_through_one_model(self):
        # Calibrated batch norm: with the initial statistics the logits are about 1e-10,
        # and any comparison would hold.
        model = calibrate_batch_norm(build_model(TINY, 3))
        serve = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
        )
        for shape in [(2, 40, 56, 3), (1, 71, 33, 3), (3, 17, 17, 3)]:
            x = rng.uniform(0, 255, size=shape).astype("float32")
            y = serve(x)
            assert y.shape == (*shape[:3], 3)
            # Two traced functions of one model: the float32 bound of the network.
            assert_close_relative(y, model.predict_on_batch(x), rtol=TINY_RTOL, varies=False)

    def test_uint8_pixels(self):
        model = calibrate_batch_norm(build_model(TINY, 3))
        x = rng.integers(0, 256, size=(1, 33, 35, 3), dtype=np.uint8)
        # The model casts the pixels to float32 first: the same values reach the same
        # kernels, so the results are the same bits.
        np.testing.assert_array_equal(model(x), model(x.astype("float32")))


def _conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def _bn(c):
    return 4 * c  # gamma, beta, moving mean, moving variance


def _resnet_params(units):
    # Every convolution is followed by a batch norm and has no bias (resnet.py).
    conv_bn = lambda k, cin, cout: _conv(k, cin, cout, bias=False) + _bn(cout)  # noqa: E731
    total = conv_bn(7, 3, 64)
    cin = 64
    for filters, n in zip((64, 128, 256, 512), units, strict=True):
        for unit in range(n):
            if unit == 0:
                total += conv_bn(1, cin, 4 * filters)
            total += conv_bn(1, cin, filters) + conv_bn(3, filters, filters)
            total += conv_bn(1, filters, 4 * filters)
            cin = 4 * filters
    return total


def test_deeplabv3_parameter_count():
    """The count from the layer shapes of the paper's architecture."""
    backbone = _resnet_params((3, 4, 23, 3))
    branch = lambda k, cin: _conv(k, cin, 256, bias=False) + _bn(256)  # noqa: E731
    aspp = branch(1, 2048) + 3 * branch(3, 2048) + branch(1, 2048) + branch(1, 5 * 256)
    logits = _conv(1, 256, 21)
    expected = backbone + aspp + logits
    model = build_model("deeplabv3", 21)
    print(f"deeplabv3 (21 classes): {model.count_params():,} parameters")
    assert model.get_layer("resnet101").count_params() == backbone
    assert model.count_params() == expected


class TestOutputStrideSwitch:
    def test_os16_weights_load_unchanged_at_os8(self, tmp_path):
        """v3 trains at OS16 and evaluates at OS8 with the same weights."""
        variant = dataclasses.replace(get_variant("deeplabv3-resnet50"), head_filters=32)
        os16 = build_model(variant, 4, output_stride=16)
        path = tmp_path / "os16.weights.h5"
        os16.save_weights(path)
        os8 = build_model(variant, 4, output_stride=8)
        os8.load_weights(path)
        assert [v.path for v in os8.weights] == [v.path for v in os16.weights]
        for a, b in zip(os8.weights, os16.weights, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert os8.get_layer("resnet50").get_layer("conv5_block1_2_conv").rate == 4
        assert os16.get_layer("resnet50").get_layer("conv5_block1_2_conv").rate == 2
        x = rng.uniform(0, 255, size=(1, 65, 49, 3)).astype("float32")
        y16, y8 = np.asarray(os16(x)), np.asarray(os8(x))
        assert y16.shape == y8.shape == (1, 65, 49, 4)
        assert not np.allclose(y16, y8)


class TestSerialization:
    @pytest.mark.parametrize(
        "variant",
        [
            TINY,
            # One cascaded block: its layers' configs as block6/7's (the rates: TestResNet)
            dataclasses.replace(
                get_variant("deeplabv3-cascade"), backbone="resnet50", cascade_blocks=1
            ),
        ],
        ids=["mobilenetv2", "resnet50-cascade"],
    )
    def test_keras_round_trip(self, variant, tmp_path):
        model = build_model(variant, 7, output_stride=16, atrous_implementation="space_to_batch")
        path = tmp_path / "model.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        x = rng.uniform(0, 255, size=(2, 47, 63, 3)).astype("float32")
        # The same weights in a newly traced model: at most the float32 bound of the
        # deeper of the two networks (a weight not restored changes outputs by their size).
        assert_close_relative(loaded(x), model(x), rtol=RESNET50_CASCADE_RTOL, varies=False)
        assert loaded.get_layer("logits").filters == 7

    def test_summary_names_the_blocks(self):
        lines = []
        build_model("deeplabv3", 21).summary(print_fn=lambda line, **kw: lines.append(line))
        text = "\n".join(lines)
        for block in ("resnet101", "aspp", "logits", "upsample"):
            assert block in text


class TestVariants:
    # The v1/v2 and Yu-Koltun variants: tests/test_paper_variants.py.
    @pytest.mark.parametrize(
        "name", sorted(n for n, v in VARIANTS.items() if v.head in ("aspp", "none"))
    )
    def test_every_v3_variant_builds(self, name):
        variant = VARIANTS[name]
        model = build_model(name, 21, upsample_logits=False, input_shape=(65, 65, 3))
        size = _ceil_div(65, 4 if variant.decoder else variant.output_stride)  # v3+: stride 4
        assert model.output.shape == (None, size, size, 21)
        assert model.name == name
        assert variant.paper

    def test_required_variants(self):
        assert {
            "deeplabv3",
            "deeplabv3-resnet50",
            "deeplabv3-cascade",
            "deeplabv3-mobilenetv2",
        } <= set(VARIANTS)
        v3 = VARIANTS["deeplabv3"]
        assert (v3.backbone, v3.output_stride, v3.multi_grid, v3.aspp_rates) == (
            "resnet101",
            16,
            (1, 2, 4),
            (6, 12, 18),
        )
        cascade = VARIANTS["deeplabv3-cascade"]
        assert (cascade.cascade_blocks, cascade.multi_grid, cascade.head) == (3, (1, 2, 1), "none")


class TestBadArguments:
    @pytest.mark.parametrize(
        "call, message",
        [
            (
                lambda: build_model("deeplabv4", 21),
                "unknown variant 'deeplabv4'; known variants: deeplabv3",
            ),
            (
                lambda: build_model("deeplabv3", 21, output_stride=4),
                r"output_stride must be one of \[8, 16, 32\], got 4",
            ),
            (
                lambda: build_model("deeplabv3", -3),
                "num_classes must be a positive integer, got -3",
            ),
            (
                lambda: build_model(
                    dataclasses.replace(get_variant("deeplabv3"), multi_grid=(1, 2)), 21
                ),
                r"multi_grid must be 3 positive integer unit rates .* got \(1, 2\)",
            ),
            (
                lambda: Variant(name="x", backbone="vgg19", paper="-"),
                r"backbone must be one of \['resnet50', 'resnet101', 'mobilenetv2', "
                r"'resnet10_cpu', 'xception65', 'vgg16', 'vgg16_frontend'\]",
            ),
            (
                lambda: build_model(TINY, 3, atrous_implementation="winograd"),
                r"implementation must be one of \['dilated', 'space_to_batch', 'direct', 'taps'\]",
            ),
        ],
        ids=["variant", "output_stride", "num_classes", "multi_grid", "backbone", "implementation"],
    )
    def test_value_error_says_what_is_allowed(self, call, message):
        with pytest.raises(ValueError, match=message):
            call()
