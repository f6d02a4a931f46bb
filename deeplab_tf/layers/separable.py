"""Atrous separable convolution (DeepLabv3+, Chen et al. ECCV 2018, section 3.1): a
depthwise atrous convolution, one filter per channel, then a pointwise 1x1 convolution
that mixes the channels, each followed by batch norm (the v3+ ASPP, decoder and aligned
Xception)."""

from __future__ import annotations

import functools

import tensorflow as tf
from keras import initializers, layers, ops, regularizers

from deeplab_tf.layers.atrous import ATROUS_IMPLEMENTATIONS, AtrousConv2D, sum_of_taps
from deeplab_tf.layers.base import check_choice, check_positive_int, register
from deeplab_tf.layers.normalization import batch_norm
from deeplab_tf.precision import onednn_runs


@functools.cache
def native_dilated_depthwise_available(dtype: str = "float32") -> bool:
    """Whether ``DepthwiseConv2dNative`` runs dilations in ``dtype`` here: oneDNN's
    kernels do; TensorFlow's own CPU kernels (where oneDNN is off, or bfloat16 on a CPU
    without AVX-512: ``precision.onednn_runs``) refuse them even in the forward pass.
    Asked of the build and the CPU, not by running the op (see
    ``native_dilated_backprop_available``)."""
    return onednn_runs(dtype)


def fixed_padding(kernel_size: int, rate: int) -> tuple[int, int]:
    """The zero padding (before, after) of a strided convolution in TF1 DeepLab
    (``fixed_padding``): the effective kernel's size less one, the odd pixel after,
    whatever the input's size. A stride-s convolution on it equals the stride-1 'same'
    one subsampled at [::s]."""
    total = kernel_size + (kernel_size - 1) * (rate - 1) - 1
    return total // 2, total - total // 2


def depthwise_atrous_conv2d(x, kernel, rate: int, strides: int, implementation: str):
    """``kernel`` [k, k, C, 1] applied to each channel of ``x`` at ``rate`` ('same'
    padding at stride 1; TF1's fixed padding when strided).

    ``"dilated"`` is Keras' ``ops.depthwise_conv``; ``"space_to_batch"`` the explicit
    ``tf.nn.with_space_to_batch`` form (the two run the same kernels in TensorFlow, which
    implements dilated depthwise convolution by space-to-batch); ``"direct"`` the
    native ``DepthwiseConv2dNative`` with dilations, which only oneDNN runs: elsewhere
    (TensorFlow's own CPU kernels) it falls back to the space-to-batch form; ``"taps"``
    a per-channel product per kernel tap (``sum_of_taps``)."""
    if strides > 1:
        k = kernel.shape[0]
        before, after = fixed_padding(k, rate)
        x = ops.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])
        return ops.depthwise_conv(x, kernel, strides=strides, padding="valid")
    if implementation == "dilated" or rate == 1:
        return ops.depthwise_conv(x, kernel, strides=1, padding="same", dilation_rate=rate)
    if implementation == "taps":
        # One filter per channel (no depth multiplier): each tap scales the channels.
        return sum_of_taps(
            x, kernel, rate, "same", lambda crop, one: crop * one[0, 0, :, 0], kernel.shape[2]
        )
    if implementation == "direct" and native_dilated_depthwise_available(tf.as_dtype(x.dtype).name):
        return _native_dilated_depthwise(x, kernel, rate)
    return _space_to_batch_depthwise(x, kernel, rate)


def _space_to_batch_depthwise(x, kernel, rate: int):
    def op(inputs, num_spatial_dims, padding):
        del num_spatial_dims
        return tf.nn.depthwise_conv2d(inputs, kernel, [1, 1, 1, 1], padding)

    return tf.nn.with_space_to_batch(
        x, dilation_rate=[rate, rate], padding="SAME", op=op, filter_shape=kernel.shape[:2]
    )


def _native_dilated_depthwise(x, kernel, rate: int):
    # The native op's registered gradient ignores the dilations (TensorFlow 2.21 with
    # oneDNN: its input and kernel gradients are those of the undilated convolution),
    # so the gradient is taken from the space-to-batch form, which is equal.
    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.raw_ops.DepthwiseConv2dNative(
            input=x, filter=kernel, strides=[1, 1, 1, 1], padding="SAME",
            dilations=[1, rate, rate, 1],
        )  # fmt: skip

        def grad(dy):
            with tf.GradientTape() as tape:
                tape.watch([x, kernel])
                y_s2b = _space_to_batch_depthwise(x, kernel, rate)
            return tape.gradient(y_s2b, [x, kernel], output_gradients=dy)

        return y, grad

    return conv(x, kernel)


@register
class AtrousSeparableConv2D(layers.Layer):
    """Depthwise atrous k x k convolution, batch norm, [ReLU], pointwise 1x1
    convolution, batch norm, [ReLU]: TF1 DeepLab's ``split_separable_conv2d`` with batch
    norm after each half (no biases).

    Args:
        filters: output channels of the pointwise convolution.
        kernel_size: the depthwise kernel's size.
        rate: the depthwise convolution's atrous rate.
        strides: 1 or more (with rate 1): TF1's explicit padding then a 'valid'
            convolution, so that odd sizes such as 513 align as in the reference.
        implementation: one of ``ATROUS_IMPLEMENTATIONS`` (see
            ``depthwise_atrous_conv2d``); the pointwise convolution is 1x1 either way.
        relu: a ReLU after each batch norm (TF1's ``activation_fn``: the v3+ ASPP,
            decoder and Xception's last exit-flow block). Without it, the other
            Xception blocks apply the ReLU before the convolution instead.
        bn_momentum, bn_epsilon, sync_batchnorm: batch norm settings.
        depthwise_regularizer, pointwise_regularizer: kernel regularizers (TF1 does not
            regularise the depthwise kernels by default).
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 3,
        rate: int = 1,
        strides: int = 1,
        implementation: str = "dilated",
        relu: bool = True,
        bn_momentum: float = 0.9997,
        bn_epsilon: float = 1e-5,
        sync_batchnorm: bool = False,
        depthwise_regularizer=None,
        pointwise_regularizer=None,
        **kwargs,
    ):
        check_positive_int("filters", filters)
        check_positive_int("kernel_size", kernel_size)
        check_positive_int("rate", rate)
        check_positive_int("strides", strides)
        check_choice("implementation", implementation, ATROUS_IMPLEMENTATIONS)
        if strides > 1 and rate > 1:
            raise ValueError(f"strides {strides} with rate {rate}: one of them must be 1")
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.rate = rate
        self.strides = strides
        self.implementation = implementation
        self.relu = relu
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.sync_batchnorm = sync_batchnorm
        self.depthwise_regularizer = regularizers.get(depthwise_regularizer)
        self.pointwise_regularizer = regularizers.get(pointwise_regularizer)
        self.depthwise_bn = batch_norm("depthwise_bn", bn_momentum, bn_epsilon, sync_batchnorm)
        self.pointwise = AtrousConv2D(
            filters,
            1,
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=pointwise_regularizer,
            name="pointwise",
        )
        self.pointwise_bn = batch_norm("pointwise_bn", bn_momentum, bn_epsilon, sync_batchnorm)
        self.input_spec = layers.InputSpec(ndim=4)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: the channel dimension of the input must be known")
        self.depthwise_kernel = self.add_weight(
            name="depthwise_kernel",
            shape=(self.kernel_size, self.kernel_size, channels, 1),
            # TF1 DeepLab: truncated normal, stddev 0.33 for the depthwise weights.
            initializer=initializers.TruncatedNormal(stddev=0.33),
            regularizer=self.depthwise_regularizer,
        )
        depthwise_shape = (*input_shape[:-1], channels)
        self.depthwise_bn.build(depthwise_shape)
        self.pointwise.build(depthwise_shape)
        self.pointwise_bn.build((*input_shape[:-1], self.filters))

    def call(self, inputs, training=None):
        kernel = ops.cast(self.depthwise_kernel, self.compute_dtype)
        x = depthwise_atrous_conv2d(inputs, kernel, self.rate, self.strides, self.implementation)
        x = self.depthwise_bn(x, training=training)
        if self.relu:
            x = ops.relu(x)
        x = self.pointwise_bn(self.pointwise(x), training=training)
        return ops.relu(x) if self.relu else x

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        s = self.strides
        h = None if h is None else -(-h // s)
        w = None if w is None else -(-w // s)
        return (n, h, w, self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "rate": self.rate,
            "strides": self.strides,
            "implementation": self.implementation,
            "relu": self.relu,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "sync_batchnorm": self.sync_batchnorm,
            "depthwise_regularizer": regularizers.serialize(self.depthwise_regularizer),
            "pointwise_regularizer": regularizers.serialize(self.pointwise_regularizer),
        }
