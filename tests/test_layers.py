import dataclasses
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf.layers import (
    ASPP,
    ATROUS_IMPLEMENTATIONS,
    IMAGENET_MEAN_RGB,
    AtrousConv2D,
    ConvBNReLU,
    FoldableBatchNormalization,
    ImagePooling,
    PixelNormalization,
    ResizeBilinear,
    direct_atrous_conv2d,
    normalization_layer,
    normalization_mean,
)
from deeplab_tf.layers.atrous import TAPS_FORWARD_MIN_PADDING_READS, _taps_forward
from deeplab_tf.model import build_model
from deeplab_tf.variants import get_variant
from tests.helpers import (
    numpy_atrous_conv2d,
    numpy_atrous_conv2d_bound,
    numpy_atrous_conv2d_grads,
    run_layer_checks,
)
from tests.tolerances import EPS32, assert_within, sum_bound, sum_rtol

RATES = (1, 2, 3, 4, 12)
rng = np.random.default_rng(0)


def _atrous_layer(rate, implementation, padding="same", x_shape=(2, 11, 13, 3), filters=4):
    layer = AtrousConv2D(
        filters, 3, rate=rate, implementation=implementation, padding=padding, use_bias=False
    )
    layer.build(x_shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
    return layer


def assert_gradients_within_bounds(
    dx, dw, ref_dx, ref_dw, x, w, rate, dy, padding: str = "same"
) -> None:
    """Higham's bound for each gradient's sums: dx sums 3x3 taps x output channels, dw
    sums over the batch and the output's pixels; magnitudes from |x|, |w|, |dy|."""
    abs_dx, abs_dw = numpy_atrous_conv2d_grads(np.abs(x), np.abs(w), rate, padding, np.abs(dy))
    assert_within(dx, ref_dx, sum_bound(9 * dy.shape[-1], abs_dx))
    assert_within(dw, ref_dw, sum_bound(int(np.prod(dy.shape[:3])), abs_dw))


class TestAtrousConv2DCorrectness:
    """Each implementation against the numpy definition y[i] = sum_k x[i + r k] w[k]."""

    @pytest.mark.parametrize("implementation", ATROUS_IMPLEMENTATIONS)
    @pytest.mark.parametrize("rate", RATES)
    # 11x13 is divisible by none of the rates > 1; 12x12 by 2, 3, 4 and 12.
    @pytest.mark.parametrize("size", [(11, 13), (12, 12)])
    def test_forward_matches_numpy(self, implementation, rate, size):
        x = rng.normal(size=(2, *size, 3)).astype("float32")
        layer = _atrous_layer(rate, implementation, x_shape=x.shape)
        w = np.asarray(layer.kernel)
        expected = numpy_atrous_conv2d(x, w, rate, "same")
        assert_within(layer(x), expected, numpy_atrous_conv2d_bound(x, w, rate, "same"))

    def test_taps_compile_with_xla_where_taps_read_only_padding(self):
        """XLA checks every slice's begin, an empty window's too (it rejected them: the
        Predictor's --jit-compile with the ASPP tap by tap). A 5x4 map at rate 6: every
        tap but the centre reads only padding."""
        x = rng.normal(size=(2, 5, 4, 3)).astype("float32")
        layer = _atrous_layer(6, "taps", x_shape=(None, None, None, 3))
        compiled = tf.function(
            layer, jit_compile=True, input_signature=[tf.TensorSpec([None, None, None, 3])]
        )
        w = np.asarray(layer.kernel)
        expected = numpy_atrous_conv2d(x, w, 6, "same")
        assert_within(compiled(x), expected, numpy_atrous_conv2d_bound(x, w, 6, "same"))

    def test_taps_trace_without_control_flow(self):
        """Traced with unknown sizes (as the Predictor traces), the taps are plain ops:
        a tf.cond per tap (two function branches each) made a Predictor's first call
        seconds slower."""
        layer = _atrous_layer(6, "taps", x_shape=(None, None, None, 3))
        traced = tf.function(layer).get_concrete_function(tf.TensorSpec([None, None, None, 3]))
        op_types = {op.type for op in traced.graph.get_operations()}
        assert "Conv2D" in op_types
        assert not op_types & {"If", "StatelessIf", "While", "StatelessWhile"}

    @pytest.mark.parametrize("implementation", ATROUS_IMPLEMENTATIONS)
    @pytest.mark.parametrize("rate", [1, 2, 3])
    def test_valid_padding_matches_numpy(self, implementation, rate):
        x = rng.normal(size=(1, 15, 14, 3)).astype("float32")
        layer = _atrous_layer(rate, implementation, padding="valid", x_shape=x.shape)
        w = np.asarray(layer.kernel)
        expected = numpy_atrous_conv2d(x, w, rate, "valid")
        y = layer(x)
        assert y.shape == expected.shape == (1, 15 - 2 * rate, 14 - 2 * rate, 4)
        assert_within(y, expected, numpy_atrous_conv2d_bound(x, w, rate, "valid"))

    @pytest.mark.parametrize("rate", RATES)
    def test_implementations_agree_with_bias(self, rate):
        x = rng.normal(size=(1, 17, 10, 5)).astype("float32")
        reference = AtrousConv2D(6, 3, rate=rate)
        reference.build(x.shape)
        reference.bias.assign(rng.normal(size=6).astype("float32"))
        outputs = []
        for implementation in ATROUS_IMPLEMENTATIONS:
            layer = AtrousConv2D(6, 3, rate=rate, implementation=implementation)
            layer.build(x.shape)
            layer.set_weights(reference.get_weights())
            outputs.append(np.asarray(layer(x)))
        # Each is within Higham's bound of the exact sum (45 terms: 3x3 taps x 5
        # channels, and the bias), so two of them within twice that.
        kernel = np.abs(reference.get_weights()[0])
        magnitude = numpy_atrous_conv2d(np.abs(x), kernel, rate, "same") + np.abs(reference.bias)
        for y in outputs[1:]:
            assert_within(y, outputs[0], 2 * sum_bound(46, magnitude))

    @pytest.mark.parametrize("implementation", ATROUS_IMPLEMENTATIONS)
    @pytest.mark.parametrize("rate", RATES)
    def test_gradients_match_numpy(self, implementation, rate):
        x = tf.constant(rng.normal(size=(2, 11, 13, 3)).astype("float32"))
        layer = _atrous_layer(rate, implementation)
        dy = rng.normal(size=(2, 11, 13, 4)).astype("float32")
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) * dy)
        dx, dw = tape.gradient(loss, [x, layer.kernel])
        w = np.asarray(layer.kernel)
        ref_dx, ref_dw = numpy_atrous_conv2d_grads(x.numpy(), w, rate, "same", dy)
        assert_gradients_within_bounds(dx, dw, ref_dx, ref_dw, x.numpy(), w, rate, dy)

    @pytest.mark.parametrize(
        "rate, padding, kernel_size, form",
        [
            (2, "same", 3, "space_to_batch"),
            (12, "same", 3, "space_to_batch"),
            (2, "same", 3, "taps"),
            (3, "same", 3, "taps"),
            (12, "same", 3, "taps"),  # taps that read only padding
            (4, "same", 4, "taps"),  # v1's 4x4 fc6, centred at an even (k - 1) * rate
            (2, "valid", 3, "space_to_batch"),  # the Yu-Koltun front end's
            (2, "valid", 3, "taps"),
            (4, "valid", 3, "taps"),
        ],
    )
    def test_direct_fallback_gradient_matches_numpy(
        self, rate, padding, kernel_size, form, monkeypatch
    ):
        """The gradient used where conv2d backprop lacks dilations: space-to-batch, or
        tap by tap (on large convolutions: here made small enough)."""
        taps_from = 0 if form == "taps" else float("inf")
        monkeypatch.setattr("deeplab_tf.layers.atrous.TAPS_GRADIENT_MIN_MACS", taps_from)
        x = tf.constant(rng.normal(size=(2, 19, 14, 3)).astype("float32"))
        w = tf.constant(rng.normal(size=(kernel_size, kernel_size, 3, 2)).astype("float32"))
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = direct_atrous_conv2d(x, w, rate, padding, native_backprop=False)
            dy = rng.normal(size=y.shape).astype("float32")
            loss = tf.reduce_sum(y * dy)
        dx, dw = tape.gradient(loss, [x, w])
        x, w = x.numpy(), w.numpy()
        ref_dx, ref_dw = numpy_atrous_conv2d_grads(x, w, rate, padding, dy)
        bound = numpy_atrous_conv2d_bound(x, w, rate, padding)
        assert_within(y, numpy_atrous_conv2d(x, w, rate, padding), bound)
        assert_gradients_within_bounds(dx, dw, ref_dx, ref_dw, x, w, rate, dy, padding)

    @pytest.mark.parametrize(
        "size, rate, taps",
        [(33, 2, False), (33, 4, True), (65, 4, False), (65, 8, True), (33, 18, True)],
    )
    def test_fallback_forward_goes_tap_by_tap_where_the_kernel_reads_padding(
        self, size, rate, taps
    ):
        """The rule at the benchmark's shapes (README, Benchmarks), its share of padding
        reads against a count of a dilated kernel's reads inside the map (a convolution
        of ones)."""
        ones = np.ones((1, size, size, 1), np.float32)
        reads_inside = numpy_atrous_conv2d(ones, np.ones((3, 3, 1, 1), np.float32), rate, "same")
        padding_reads = 1 - reads_inside.sum() / (9 * size * size)
        assert (padding_reads >= TAPS_FORWARD_MIN_PADDING_READS) == taps
        assert _taps_forward((2, size, size, 512), (3, 3, 512, 512), rate, "SAME") == taps

    def test_direct_trains_without_onednn(self):
        """With TF_ENABLE_ONEDNN_OPTS=0 native dilated backprop fails; ours must not."""
        script = textwrap.dedent(
            """
            import numpy as np, tensorflow as tf
            from deeplab_tf.layers import AtrousConv2D, native_dilated_backprop_available
            x = tf.constant(np.random.default_rng(1).normal(size=(1, 10, 9, 3)), tf.float32)
            grads = []
            for implementation in ("direct", "space_to_batch"):
                layer = AtrousConv2D(4, 3, rate=3, implementation=implementation)
                layer.build(x.shape)
                layer.set_weights([np.full(w.shape, 0.1, "float32") for w in layer.weights])
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    loss = tf.reduce_sum(layer(x) ** 2)
                grads.append([g.numpy() for g in tape.gradient(loss, [x, layer.kernel])])
            diff = max(np.abs(a - b).max() for a, b in zip(*grads))
            print(native_dilated_backprop_available(), diff)
            """
        )
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        native, diff = result.stdout.split()[-2:]
        assert native == "False"  # the fallback path really ran
        # Two float32 summation orders of the same 27 products (3x3x3) per output and
        # 4 x 10 x 9 per kernel gradient, terms of order 1: they differ by a few units
        # of float32 rounding (6e-8) times the sums' size (about 10 to 100).
        assert float(diff) < 1e-4

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_the_build_answers_as_running_the_op_does(self, dtype):
        """The capability is read off the build and the CPU (no failing op, no error log
        line); it must say what running the two backward ops says, under any oneDNN
        setting: with oneDNN on, a CPU without AVX-512 still runs bfloat16 on
        TensorFlow's own kernels (mixed-precision training failed there)."""
        from deeplab_tf.layers.atrous import (
            _dilated_backprop_runs,
            native_dilated_backprop_available,
        )

        assert native_dilated_backprop_available(dtype) == _dilated_backprop_runs(dtype)


class TestAtrousConv2DInterface:
    def test_output_shape_and_effective_kernel(self):
        layer = AtrousConv2D(2, 3, rate=4, padding="valid")
        # effective kernel size k + (k - 1)(r - 1) = 3 + 2 * 3 = 9
        assert layer(np.zeros((1, 20, 9, 1), "float32")).shape == (1, 12, 1, 2)
        assert layer.compute_output_shape((1, 20, 9, 1)) == (1, 12, 1, 2)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"filters": 4, "rate": 0}, "rate must be a positive integer"),
            ({"filters": 4, "implementation": "fft"}, "implementation must be one of"),
            ({"filters": 4, "padding": "causal"}, "padding must be one of"),
            ({"filters": -1}, "filters must be a positive integer"),
        ],
    )
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            AtrousConv2D(**kwargs)

    def test_weights_match_keras_conv2d(self):
        """Same variables as Conv2D, so weights move between them by layer name."""
        x = rng.normal(size=(1, 8, 8, 3)).astype("float32")
        conv = keras.layers.Conv2D(5, 3, padding="same")
        conv.build(x.shape)
        atrous = AtrousConv2D(5, 3)
        atrous.build(x.shape)
        atrous.set_weights(conv.get_weights())
        # Each within Higham's bound of the exact 27-term sums (plus the zero bias).
        magnitude = numpy_atrous_conv2d(np.abs(x), np.abs(conv.get_weights()[0]), 1, "same")
        assert_within(atrous(x), conv(x), 2 * sum_bound(28, magnitude))


class TestFusedBatchNormInTraining:
    """FoldableBatchNormalization's training path (TensorFlow's fused kernel) against
    the batch norm formulas in float64: outputs, moving statistics and gradients."""

    @staticmethod
    def numpy_reference(x, gamma, beta, dy, epsilon):
        axes = (0, 1, 2)
        mean, variance = x.mean(axes), x.var(axes)  # the biased variance, as Keras
        xhat = (x - mean) / np.sqrt(variance + epsilon)
        dxhat = dy * gamma
        dx = (dxhat - dxhat.mean(axes) - xhat * (dxhat * xhat).mean(axes)) / np.sqrt(
            variance + epsilon
        )
        return gamma * xhat + beta, mean, variance, dx, (dy * xhat).sum(axes), dy.sum(axes)

    @pytest.mark.parametrize(
        "shape, epsilon", [((2, 9, 7, 16), 1e-5), ((3, 5, 5, 4), 1e-3), ((1, 1, 1, 8), 1e-5)]
    )
    def test_matches_the_formulas(self, shape, epsilon):
        rng = np.random.default_rng(0)
        x = rng.normal(3.0, 2.0, shape).astype("f4")
        dy = rng.normal(size=shape).astype("f4")
        channels = shape[-1]
        layer = FoldableBatchNormalization(momentum=0.9, epsilon=epsilon)
        layer.build(shape)
        gamma = np.linspace(0.5, 1.5, channels, dtype="f4")
        beta = np.linspace(-1.0, 1.0, channels, dtype="f4")
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = layer(inputs, training=True)
            loss = tf.reduce_sum(y * dy)
        dx, dgamma, dbeta = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
        x64 = x.astype(np.float64)
        ref_y, mean, variance, ref_dx, ref_dgamma, ref_dbeta = self.numpy_reference(
            x64, gamma.astype(np.float64), beta.astype(np.float64), dy.astype(np.float64), epsilon
        )
        # Each statistic is a float32 sum of n = N H W terms; the mean's error, up to
        # n eps max|x|, moves the normalised values by that over the deviation, and the
        # variance's relative error moves them by as much again: a bound of
        # 2 n eps max|x| / sigma on x-hat, times gamma (and, for the gradients, times
        # the sums of |dy| and |dy x-hat| they are made of).
        n = int(np.prod(shape[:3]))
        sigma = np.sqrt(variance + epsilon)
        relative = 2 * n * EPS32 * np.abs(x64).max(axis=(0, 1, 2)) / sigma
        assert_within(y, ref_y, relative * gamma + n * EPS32 * np.abs(beta))
        momentum = 0.9
        assert_within(layer.moving_mean, 0.1 * mean, n * EPS32 * np.abs(x64).max())
        # Keras's moving variance averages the biased batch variance.
        assert_within(
            layer.moving_variance,
            momentum + (1 - momentum) * variance,
            2 * n * EPS32 * np.abs(x64).max() ** 2,
        )
        # The gradients are sums of dy and dy x-hat over the n pixels (dbeta, dgamma);
        # dx = gamma / sigma (dy - mean(dy) - x-hat mean(dy x-hat)) carries the two
        # means' errors and x-hat's, a factor 4 covering the four terms it combines.
        magnitude = (np.abs(dy) * (1 + np.abs(ref_y - beta) / gamma)).sum(axis=(0, 1, 2))
        assert_within(dbeta, ref_dbeta, n * EPS32 * np.abs(dy).sum(axis=(0, 1, 2)))
        assert_within(dgamma, ref_dgamma, (relative + n * EPS32) * magnitude)
        bound = 4 * (relative + 2 * n * EPS32) * gamma / sigma * magnitude / n
        assert_within(dx, ref_dx, bound)

    def test_a_model_trains_through_the_fused_kernel(self):
        model = build_model("deeplabv3-resnet10-cpu", 3)
        images = tf.zeros([2, 32, 32, 3])

        @tf.function
        def forward(images):
            return model(images, training=True)

        ops = {op.type for op in forward.get_concrete_function(images).graph.get_operations()}
        assert "FusedBatchNormV3" in ops
        assert "SquaredDifference" not in ops  # no moments computed op by op


class TestPixelNormalization:
    def test_caffe_matches_keras_resnet_preprocessing(self):
        x = rng.uniform(0, 255, size=(2, 5, 7, 3)).astype("float32")
        expected = keras.applications.resnet.preprocess_input(x.copy())
        # One float32 subtraction of values up to 255: half an ulp at 255 is 1.5e-5.
        np.testing.assert_allclose(np.asarray(PixelNormalization("caffe")(x)), expected, atol=1e-4)

    def test_tf_matches_keras_mobilenet_v2_preprocessing(self):
        x = rng.uniform(0, 255, size=(2, 5, 7, 3)).astype("float32")
        expected = keras.applications.mobilenet_v2.preprocess_input(x.copy())
        # x / 127.5 - 1 against a multiply-add: two roundings at values up to 1 (2.4e-7).
        np.testing.assert_allclose(np.asarray(PixelNormalization("tf")(x)), expected, atol=1e-6)

    def test_mean_pixel_maps_to_zero(self):
        mean = np.broadcast_to(np.array(IMAGENET_MEAN_RGB, "float32"), (1, 2, 2, 3))
        # The mean minus its float32 self: at most a rounding of 124 (7.6e-6).
        np.testing.assert_allclose(np.asarray(PixelNormalization("caffe")(mean)), 0, atol=1e-5)

    @pytest.mark.parametrize(
        "variant, mode",
        [("deeplabv3-resnet10-cpu", "tf"), ("deeplabv3-mobilenetv2-cpu", "tf"),
         ("deeplabv3-resnet50", "caffe"), ("dilation-frontend", "caffe")],
    )  # fmt: skip
    def test_each_backbone_pads_with_what_it_normalises_to_zero(self, variant, mode):
        """The pad pixel of a model (training crops larger than the image, padded
        validation batches) is zero after the model's own first layer, also for the
        [-1, 1] scaling, where the ImageNet mean would be (-0.03, -0.08, -0.18)."""
        # The first layer is what counts: VGG's fc6/fc7 (4096 wide, 120M weights) as 64.
        narrow = dataclasses.replace(get_variant(variant), head_filters=64)
        model = build_model(narrow, num_classes=3, input_shape=(None, None, 3))
        layer = normalization_layer(model)
        assert layer.mode == mode
        pad = np.broadcast_to(np.float32(normalization_mean(model)), (1, 2, 2, 3))
        # One float32 rounding of values up to 255 (1.5e-5 at 124; 127.5 is exact).
        np.testing.assert_allclose(np.asarray(layer(pad)), 0, atol=1e-5)
        imagenet_mean = np.broadcast_to(np.float32(IMAGENET_MEAN_RGB), (1, 1, 1, 3))
        assert (np.abs(np.asarray(layer(imagenet_mean))) > 0.01).any() == (mode == "tf")

    def test_bad_mode(self):
        with pytest.raises(ValueError, match=r"mode must be one of \['caffe', 'tf'\]"):
            PixelNormalization("torch")


class TestImagePooling:
    def test_larger_than_training_crop_matches_numpy(self):
        """Built and used on a small map, then fed a map larger than any crop
        (1025x2049 at OS16 -> 65x129): still the global mean of that map."""
        layer = ImagePooling(8)
        layer(rng.normal(size=(1, 33, 33, 16)).astype("float32"))  # "built at 513"
        bn = layer.project.bn
        bn.moving_mean.assign(rng.normal(size=8).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2, size=8).astype("float32"))
        bn.gamma.assign(rng.uniform(0.5, 2, size=8).astype("float32"))
        bn.beta.assign(rng.normal(size=8).astype("float32"))
        x = rng.normal(loc=0.3, size=(2, 65, 129, 16)).astype("float32")
        x[1] *= 3.0  # the two images have different means
        y = np.asarray(layer(x, training=False))

        kernel = np.asarray(layer.project.conv.kernel)[0, 0]
        pooled = x.mean(axis=(1, 2)) @ kernel
        normed = (pooled - np.asarray(bn.moving_mean)) / np.sqrt(
            np.asarray(bn.moving_variance) + bn.epsilon
        ) * np.asarray(bn.gamma) + np.asarray(bn.beta)
        expected = np.broadcast_to(np.maximum(normed, 0)[:, None, None, :], (2, 65, 129, 8))
        assert y.shape == (2, 65, 129, 8)
        # The layer's float32 mean over 65x129 pixels (then a 16-term 1x1 and an affine
        # batch norm) against float64: sum_rtol of the mean's terms, of outputs of order 1.
        np.testing.assert_allclose(y, expected, atol=sum_rtol(65 * 129) * np.abs(expected).max())
        assert not np.allclose(y[0], y[1])


class TestASPP:
    def test_output_and_branches(self):
        aspp = ASPP(filters=8, rates=(2, 4, 6), image_pooling=True)
        y = aspp(rng.normal(size=(2, 9, 7, 5)).astype("float32"))
        assert y.shape == (2, 9, 7, 8)
        assert [b.name for b in aspp.branches] == [
            "branch_1x1",
            "branch_3x3_1",
            "branch_3x3_2",
            "branch_3x3_3",
            "image_pooling",
        ]
        assert [b.conv.rate for b in aspp.branches[1:4]] == [2, 4, 6]
        # concat of 5 branches of 8 channels -> 1x1 projection
        assert aspp.projection.conv.kernel.shape == (1, 1, 40, 8)
        assert np.all(np.asarray(y) >= 0)  # ends with ReLU

    def test_separable_branches(self):
        """v3+: each 3x3 branch is an atrous separable convolution at its rate; the ASPP
        is the projection of the branches' concatenation."""
        aspp = ASPP(filters=6, rates=(2, 3), separable=True, implementation="direct")
        x = rng.normal(size=(2, 9, 7, 5)).astype("float32")
        y = aspp(x, training=False)
        separable = aspp.branches[1:3]
        assert [type(b).__name__ for b in separable] == ["AtrousSeparableConv2D"] * 2
        assert [(b.rate, b.implementation, b.relu) for b in separable] == [
            (2, "direct", True), (3, "direct", True)
        ]  # fmt: skip
        assert separable[0].depthwise_kernel.shape == (3, 3, 5, 1)
        branches = np.concatenate([b(x, training=False) for b in aspp.branches], axis=-1)
        expected = aspp.projection(branches, training=False)
        # The same ops on the same inputs in another graph: last-bit differences only.
        np.testing.assert_allclose(y, expected, rtol=0, atol=sum_rtol(30) * np.abs(expected).max())

    def test_without_atrous_branches(self):
        """TF1's MobileNetV2 model: the 1x1 branch and image pooling, projected."""
        aspp = ASPP(filters=4, rates=())
        y = aspp(rng.normal(size=(1, 5, 6, 3)).astype("float32"))
        assert [b.name for b in aspp.branches] == ["branch_1x1", "image_pooling"]
        assert aspp.projection.conv.kernel.shape == (1, 1, 8, 4) and y.shape == (1, 5, 6, 4)

    def test_without_image_pooling(self):
        aspp = ASPP(filters=4, rates=(1,), image_pooling=False)
        aspp(np.zeros((1, 3, 3, 2), "float32"))
        assert len(aspp.branches) == 2
        assert aspp.projection.conv.kernel.shape == (1, 1, 8, 4)

    def test_dynamic_sizes_in_one_graph(self):
        aspp = ASPP(filters=4, rates=(2,))
        fn = tf.function(
            lambda x: aspp(x, training=False),
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
        )
        for shape in [(1, 5, 5, 3), (2, 17, 9, 3)]:
            assert fn(tf.zeros(shape)).shape == (*shape[:3], 4)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"rates": (6, 0, 18)}, "each of rates must be a positive integer"),
            ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ],
    )
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            ASPP(**kwargs)


@pytest.mark.parametrize(
    "layer, inputs",
    [
        (PixelNormalization("caffe"), rng.uniform(0, 255, (1, 4, 5, 3))),
        (AtrousConv2D(3, 3, rate=2, implementation="direct"), rng.normal(size=(1, 7, 6, 2))),
        (
            AtrousConv2D(
                3,
                3,
                rate=3,
                implementation="space_to_batch",
                padding="valid",
                kernel_regularizer="l2",
            ),
            rng.normal(size=(1, 9, 8, 2)),
        ),
        (ConvBNReLU(4, 3, rate=2), rng.normal(size=(1, 6, 6, 3))),
        (ImagePooling(4), rng.normal(size=(2, 5, 3, 3))),
        (ASPP(filters=4, rates=(1, 2, 3), dropout=0.1), rng.normal(size=(1, 6, 5, 3))),
        (ASPP(filters=4, rates=(2,), separable=True), rng.normal(size=(1, 6, 5, 3))),
        (ResizeBilinear(), [rng.normal(size=(1, 3, 4, 2)), rng.normal(size=(1, 9, 13, 1))]),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, keras.layers.Layer) else "",
)
def test_layer_round_trip(layer, inputs, tmp_path):
    if isinstance(inputs, list):
        inputs = [x.astype("float32") for x in inputs]
    else:
        inputs = inputs.astype("float32")
    run_layer_checks(layer, inputs, tmp_path)


class TestResizeBilinear:
    def test_aligned_corners_for_stride_multiples_plus_one(self):
        """Logit j sits on pixel 16 j: for 513 = 16 * 32 + 1, pixel 16 j equals logit j."""
        logits = rng.normal(size=(1, 33, 33, 2)).astype("float32")
        y = np.asarray(ResizeBilinear()([logits, np.zeros((1, 513, 513, 3), "float32")]))
        assert y.shape == (1, 513, 513, 2)
        # 4-term float32 interpolations of values of order 1: a few eps (1e-5 is 84).
        np.testing.assert_allclose(y[:, ::16, ::16], logits, atol=1e-5)
        # halfway between two logits is their mean
        np.testing.assert_allclose(y[:, 8, 0], (logits[:, 0, 0] + logits[:, 1, 0]) / 2, atol=1e-5)

    def test_output_is_float32_under_mixed_precision(self):
        layer = ResizeBilinear()
        x = tf.zeros((1, 2, 2, 1), tf.float16)
        assert layer([x, tf.zeros((1, 5, 5, 3))]).dtype == tf.float32
