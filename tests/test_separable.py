"""Atrous separable convolution (v3+ section 3.1) against a numpy reference."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf.layers import (
    ATROUS_IMPLEMENTATIONS,
    AtrousSeparableConv2D,
    depthwise_atrous_conv2d,
    fixed_padding,
    native_dilated_depthwise_available,
)
from tests.helpers import assert_close_relative, run_layer_checks
from tests.tolerances import network_rtol

rng = np.random.default_rng(0)
CHANNELS, FILTERS, EPSILON = 5, 6, 1e-3
# Two float32 convolutions with sums of at most 9 taps (depthwise 3x3) and 5 channels
# (pointwise), and two batch norms (a multiply-add each): four layers in series.
RTOL = network_rtol(4, 9)


def _layer(rate=1, strides=1, implementation="dilated", relu=True, x_shape=(2, 11, 13, CHANNELS)):
    """A built layer with random weights and random batch norm statistics, so that a
    wrong statistic or a swapped half shows."""
    layer = AtrousSeparableConv2D(
        FILTERS, 3, rate=rate, strides=strides, implementation=implementation, relu=relu,
        bn_epsilon=EPSILON,
    )  # fmt: skip
    layer.build(x_shape)
    layer.depthwise_kernel.assign(rng.normal(size=layer.depthwise_kernel.shape))
    layer.pointwise.kernel.assign(rng.normal(size=layer.pointwise.kernel.shape) / 2)
    for bn, size in ((layer.depthwise_bn, CHANNELS), (layer.pointwise_bn, FILTERS)):
        bn.set_weights([
            rng.uniform(0.5, 1.5, size), rng.normal(size=size) / 2,
            rng.normal(size=size) / 2, rng.uniform(0.5, 2.0, size),
        ])  # fmt: skip
    return layer


def _numpy_reference(x: np.ndarray, layer: AtrousSeparableConv2D) -> np.ndarray:
    """Stride 1, 'same': y[i, c] = sum_k x[i + rate k, c] w[k, c]; batch norm
    (x - mean) / sqrt(var + eps) gamma + beta; ReLU; 1x1; batch norm; ReLU."""
    w = np.asarray(layer.depthwise_kernel, np.float64)[..., 0]
    k, rate = w.shape[0], layer.rate
    pad = rate * (k - 1) // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, wd = x.shape[1:3]
    y = sum(
        xp[:, rate * a : rate * a + h, rate * b : rate * b + wd, :] * w[a, b]
        for a in range(k)
        for b in range(k)
    )

    def bn(v, layer_bn):
        gamma, beta, mean, var = (np.asarray(t, np.float64) for t in layer_bn.get_weights())
        v = (v - mean) / np.sqrt(var + EPSILON) * gamma + beta
        return np.maximum(v, 0) if layer.relu else v

    y = bn(y, layer.depthwise_bn)
    y = y @ np.asarray(layer.pointwise.kernel, np.float64)[0, 0]
    return bn(y, layer.pointwise_bn)


@pytest.mark.parametrize("implementation", ATROUS_IMPLEMENTATIONS)
@pytest.mark.parametrize("rate", [1, 2, 3, 6])
@pytest.mark.parametrize("relu", [True, False])
# 11x13 is divisible by none of the rates > 1; 12x12 by 2, 3 and 6.
@pytest.mark.parametrize("size", [(11, 13), (12, 12)])
def test_forward_matches_numpy(implementation, rate, relu, size):
    x = rng.normal(size=(2, *size, CHANNELS)).astype("float32")
    layer = _layer(rate, 1, implementation, relu, x.shape)
    assert_close_relative(layer(x, training=False), _numpy_reference(x, layer), RTOL)


@pytest.mark.parametrize("size", [(13, 13), (12, 15), (513 // 16, 513 // 16)])
def test_strided_equals_stride_one_subsampled(size):
    """TF1's explicit padding: stride 2 is the stride-1 'same' result at [::2], on odd
    sizes (513) as on even ones; the output is ceil(size / 2)."""
    x = rng.normal(size=(1, *size, CHANNELS)).astype("float32")
    layer = _layer(strides=2, x_shape=x.shape)
    expected = _numpy_reference(x, layer)[:, ::2, ::2]
    y = layer(x, training=False)
    assert tuple(y.shape[1:3]) == tuple(-(-s // 2) for s in size)
    assert tuple(y.shape) == layer.compute_output_shape(x.shape)
    assert_close_relative(y, expected, RTOL)


def test_fixed_padding_is_tf1s():
    # kernel_size + (kernel_size - 1)(rate - 1) - 1, split with the odd pixel after.
    assert fixed_padding(3, 1) == (1, 1)
    assert fixed_padding(3, 2) == (2, 2)
    assert fixed_padding(4, 1) == (1, 2)
    assert fixed_padding(1, 1) == (0, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_dilated_depthwise_is_used_where_it_runs(dtype):
    """``native_dilated_depthwise_available`` (read off the build and the CPU) says what
    running ``DepthwiseConv2dNative`` with dilations says: TensorFlow's own kernels,
    where oneDNN is off or on bfloat16 without AVX-512, refuse dilations."""
    try:
        tf.raw_ops.DepthwiseConv2dNative(
            input=tf.zeros([1, 7, 7, 2], dtype),
            filter=tf.zeros([3, 3, 2, 1], dtype),
            strides=[1, 1, 1, 1],
            padding="SAME",
            dilations=[1, 2, 2, 1],
        )
        runs = True
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
        runs = False
    assert native_dilated_depthwise_available(dtype) == runs


@pytest.mark.parametrize("implementation", ATROUS_IMPLEMENTATIONS)
@pytest.mark.parametrize("rate", [1, 2, 3])
def test_depthwise_gradients_match_numpy(implementation, rate):
    """Gradients of sum(y * dy) for y[i, c] = sum_k x[i + rate k, c] w[k, c] (the
    native op's own gradient ignores the dilations: this is what caught it)."""
    x = rng.normal(size=(2, 11, 12, CHANNELS))
    w = rng.normal(size=(3, 3, CHANNELS, 1))
    dy = rng.normal(size=(2, 11, 12, CHANNELS))
    pad = rate
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for a in range(3):
        for b in range(3):
            rows, cols = slice(rate * a, rate * a + 11), slice(rate * b, rate * b + 12)
            dw[a, b, :, 0] = (xp[:, rows, cols, :] * dy).sum(axis=(0, 1, 2))
            dxp[:, rows, cols, :] += dy * w[a, b, :, 0]
    dx = dxp[:, pad : pad + 11, pad : pad + 12]
    tx, tw = tf.constant(x, tf.float32), tf.constant(w, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([tx, tw])
        y = depthwise_atrous_conv2d(tx, tw, rate, 1, implementation)
        loss = tf.reduce_sum(y * tf.constant(dy, tf.float32))
    got_dx, got_dw = tape.gradient(loss, [tx, tw])
    # float32 sums: 9 taps for dx; the batch's 2 x 11 x 12 pixels for dw.
    assert_close_relative(got_dx, dx, network_rtol(1, 9))
    assert_close_relative(got_dw, dw, network_rtol(1, 2 * 11 * 12), varies=False)


@pytest.mark.parametrize("rate", [2, 3])
def test_implementations_agree_in_training(rate):
    """The training path (batch statistics) and its gradients are the same whichever
    implementation runs the depthwise convolution."""
    x = tf.constant(rng.normal(size=(2, 11, 12, CHANNELS)).astype("float32"))
    dy = tf.constant(rng.normal(size=(2, 11, 12, FILTERS)).astype("float32"))
    results = []
    weights = _layer(rate).get_weights()
    for implementation in ATROUS_IMPLEMENTATIONS:
        layer = _layer(rate, implementation=implementation)
        layer.set_weights(weights)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        dx, dk = tape.gradient(loss, [x, layer.depthwise_kernel])
        results.append((np.asarray(y), np.asarray(dx), np.asarray(dk)))
    # The backward pass is a network of the same depth with sums over the batch and
    # the image (264 pixels) for the kernel's gradient.
    backward = network_rtol(8, 2 * 11 * 12)
    for y, dx, dk in results[1:]:
        assert_close_relative(y, results[0][0], RTOL)
        assert_close_relative(dx, results[0][1], backward)
        assert_close_relative(dk, results[0][2], backward, varies=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strides": 2, "rate": 2}, "one of them must be 1"),
        ({"implementation": "fft"}, "implementation must be one of"),
        ({"rate": 0}, "rate must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AtrousSeparableConv2D(4, **kwargs)


@pytest.mark.parametrize(
    "layer",
    [
        AtrousSeparableConv2D(4, rate=2, implementation="direct"),
        AtrousSeparableConv2D(3, strides=2, relu=False, depthwise_regularizer="l2"),
    ],
)
def test_layer_round_trip(layer, tmp_path):
    run_layer_checks(layer, rng.normal(size=(1, 9, 8, 3)).astype("float32"), tmp_path)
