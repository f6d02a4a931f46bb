"""Layers of the DeepLab family: pixel normalisation, atrous convolution, ASPP (v3),
and the Yu-Koltun pieces (margin padding, aligned upsampling, context module).

Every layer stores each ``__init__`` argument as a public attribute of the same
name, returns exactly those arguments from ``get_config`` and is registered for
``.keras`` serialisation under the ``deeplab_tf`` package.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import initializers, layers, ops, regularizers

# ImageNet mean pixel in RGB order (the Caffe/keras.applications ResNet and VGG
# normalisation). Images are padded with it so padding is zero after normalisation.
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)

ATROUS_IMPLEMENTATIONS = ("dilated", "space_to_batch", "direct")
NORMALIZATION_MODES = ("caffe", "tf")

_register = keras.saving.register_keras_serializable(package="deeplab_tf")


def _check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def batch_norm(
    name: str | None = None,
    momentum: float = 0.9997,
    epsilon: float = 1e-5,
    synchronized: bool = False,
) -> layers.BatchNormalization:
    """The batch norm of the DeepLab v3 heads (decay 0.9997, v3 paper section 4.1)."""
    return layers.BatchNormalization(
        momentum=momentum, epsilon=epsilon, synchronized=synchronized, name=name
    )


@_register
class PixelNormalization(layers.Layer):
    """Maps RGB pixels in [0, 255] to what a backbone's ImageNet weights expect.

    This is the first layer of every model, so training, evaluation, serving and
    TFLite all feed the same raw pixels (DESIGN.md, Facts).

    Args:
        mode: ``"caffe"`` (RGB -> BGR, minus the ImageNet mean pixel; ResNet and
            VGG in keras.applications) or ``"tf"`` (scaled to [-1, 1]; MobileNetV2).
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        _check_choice("mode", mode, NORMALIZATION_MODES)
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        mean_bgr = ops.convert_to_tensor(IMAGENET_MEAN_RGB[::-1], dtype=self.compute_dtype)
        return ops.flip(x, axis=-1) - mean_bgr

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@functools.cache
def native_dilated_backprop_available() -> bool:
    """Whether this TensorFlow build differentiates ``conv2d(dilations>1)`` natively.

    oneDNN (on by default on x86 CPUs) and GPUs do; the plain Eigen CPU kernels
    (``TF_ENABLE_ONEDNN_OPTS=0``) raise "Current CPU implementations do not yet
    support dilation rates larger than 1" in the backward pass. Asked of the build
    rather than by running the op: a failing op logs an error line through
    TensorFlow's C++ logging, which a user reads as a crash.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a TensorFlow without this module: run the op itself
        return _dilated_backprop_runs()
    return bool(_pywrap_util_port.IsMklEnabled()) or bool(tf.config.list_physical_devices("GPU"))


def _dilated_backprop_runs() -> bool:
    # Run the two backward ops themselves: init_scope (eager, even when called
    # while tracing a graph) pauses gradient tapes.
    with tf.init_scope():
        dilated = dict(strides=[1, 1, 1, 1], padding="SAME", dilations=[1, 2, 2, 1])
        try:
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=[1, 5, 5, 1],
                filter=tf.zeros([3, 3, 1, 1]),
                out_backprop=tf.zeros([1, 5, 5, 1]),
                **dilated,
            )
            tf.raw_ops.Conv2DBackpropFilter(
                input=tf.zeros([1, 5, 5, 1]),
                filter_sizes=[3, 3, 1, 1],
                out_backprop=tf.zeros([1, 5, 5, 1]),
                **dilated,
            )
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            return False
    return True


def direct_atrous_conv2d(x, kernel, rate: int, padding: str, native_backprop: bool | None = None):
    """``tf.nn.conv2d(..., dilations=rate)`` that can always be differentiated.

    Where the backward kernels lack dilation support, the gradient is taken from
    the space-to-batch form of the same convolution, which is mathematically equal.
    """
    padding = padding.upper()
    if native_backprop is None:
        native_backprop = native_dilated_backprop_available()
    if rate == 1 or native_backprop:
        return tf.nn.conv2d(x, kernel, strides=1, padding=padding, dilations=rate)

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides=1, padding=padding, dilations=rate)

        def grad(dy):
            with tf.GradientTape() as tape:
                tape.watch([x, kernel])
                y_s2b = tf.nn.atrous_conv2d(x, kernel, rate, padding)
            return tape.gradient(y_s2b, [x, kernel], output_gradients=dy)

        return y, grad

    return conv(x, kernel)


@_register
class AtrousConv2D(layers.Layer):
    """Atrous (dilated) 2-D convolution, y[i] = sum_k x[i + rate * k] w[k].

    Three numerically equal implementations (DESIGN.md, Atrous convolution):
    ``"dilated"`` (Keras ``ops.conv`` with ``dilation_rate``), ``"space_to_batch"``
    (``tf.nn.atrous_conv2d``, the method of the v2 paper section 3.1) and
    ``"direct"`` (``tf.nn.conv2d(..., dilations=rate)``, run natively by oneDNN
    and cuDNN). The variables (``kernel``, ``bias``) are the same as Keras
    ``Conv2D``'s, so weights move between the two by layer name, and do not
    depend on ``rate``: a model rebuilt at another output stride loads the same
    weights.

    Args:
        filters: number of output channels.
        kernel_size: the square kernel's size; with 'same' padding an even size (the v1
            4x4 fc6) is centred when (kernel_size - 1) * rate is even.
        rate: dilation rate; the effective kernel size is k + (k - 1)(rate - 1).
        implementation: one of ``ATROUS_IMPLEMENTATIONS``.
        padding: ``"same"`` or ``"valid"``.
        use_bias: whether to add a bias.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer: as in ``keras.layers.Conv2D``.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 3,
        rate: int = 1,
        implementation: str = "dilated",
        padding: str = "same",
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        _check_positive_int("filters", filters)
        _check_positive_int("kernel_size", kernel_size)
        _check_positive_int("rate", rate)
        _check_choice("implementation", implementation, ATROUS_IMPLEMENTATIONS)
        _check_choice("padding", padding, ("same", "valid"))
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.rate = rate
        self.implementation = implementation
        self.padding = padding
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.input_spec = layers.InputSpec(ndim=4)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: the channel dimension of the input must be known")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.kernel_size, self.kernel_size, channels, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )

    def call(self, inputs):
        kernel = ops.cast(self.kernel, self.compute_dtype)
        if self.implementation == "dilated":
            y = ops.conv(inputs, kernel, strides=1, padding=self.padding, dilation_rate=self.rate)
        elif self.implementation == "space_to_batch":
            y = tf.nn.atrous_conv2d(inputs, kernel, self.rate, self.padding.upper())
        else:
            y = direct_atrous_conv2d(inputs, kernel, self.rate, self.padding)
        if self.use_bias:
            y = y + ops.cast(self.bias, self.compute_dtype)
        return y

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        if self.padding == "valid":
            shrink = (self.kernel_size - 1) * self.rate
            h = None if h is None else h - shrink
            w = None if w is None else w - shrink
        return (n, h, w, self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "rate": self.rate,
            "implementation": self.implementation,
            "padding": self.padding,
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
        }


@_register
class ConvBNReLU(layers.Layer):
    """Convolution (no bias), batch norm, ReLU: the unit of every v3 head branch.

    Args:
        filters, kernel_size, rate, implementation: as in ``AtrousConv2D``.
        bn_momentum, bn_epsilon, sync_batchnorm: batch norm settings.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 1,
        rate: int = 1,
        implementation: str = "dilated",
        bn_momentum: float = 0.9997,
        bn_epsilon: float = 1e-5,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.rate = rate
        self.implementation = implementation
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.sync_batchnorm = sync_batchnorm
        self.conv = AtrousConv2D(
            filters,
            kernel_size,
            rate=rate,
            implementation=implementation,
            use_bias=False,
            kernel_initializer="he_normal",
            name="conv",
        )
        self.bn = batch_norm("bn", bn_momentum, bn_epsilon, sync_batchnorm)

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.bn.build(self.conv.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        return ops.relu(self.bn(self.conv(inputs), training=training))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "rate": self.rate,
            "implementation": self.implementation,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "sync_batchnorm": self.sync_batchnorm,
        }


@_register
class ImagePooling(layers.Layer):
    """Image-level features of the v3 ASPP (v3 paper section 3.3, Fig. 5).

    Global average pooling over the whole feature map, 1x1 convolution, batch
    norm, ReLU, then back to the feature map's runtime size. Bilinear upsampling
    of a 1x1 map is a broadcast, which is what is done, so any input size works,
    including maps larger than the training crop (the TF1 code pooled with a
    fixed window and broke there).

    Args:
        filters: output channels.
        bn_momentum, bn_epsilon, sync_batchnorm: batch norm settings.
    """

    def __init__(
        self,
        filters: int = 256,
        bn_momentum: float = 0.9997,
        bn_epsilon: float = 1e-5,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        _check_positive_int("filters", filters)
        super().__init__(**kwargs)
        self.filters = filters
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.sync_batchnorm = sync_batchnorm
        self.project = ConvBNReLU(
            filters,
            1,
            bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon,
            sync_batchnorm=sync_batchnorm,
            name="project",
        )

    def build(self, input_shape):
        self.project.build((input_shape[0], 1, 1, input_shape[-1]))

    def call(self, inputs, training=None):
        pooled = ops.mean(inputs, axis=(1, 2), keepdims=True)
        pooled = self.project(pooled, training=training)
        shape = ops.shape(inputs)
        return ops.broadcast_to(pooled, (shape[0], shape[1], shape[2], self.filters))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "sync_batchnorm": self.sync_batchnorm,
        }


@_register
class ASPP(layers.Layer):
    """Atrous Spatial Pyramid Pooling of DeepLab v3 (v3 paper section 3.3).

    Branches: one 1x1 convolution, one 3x3 atrous convolution per rate, and
    (optionally) image-level pooling; all ``filters`` wide with batch norm and
    ReLU. They are concatenated and projected by a 1x1 convolution with batch
    norm and ReLU, then optional dropout. The paper's rates are (6, 12, 18) at
    output stride 16 and doubled at output stride 8.

    Args:
        filters: width of every branch and of the projection (256 in the paper).
        rates: atrous rates of the 3x3 branches.
        image_pooling: whether to add the image-level branch.
        dropout: dropout rate after the projection (0 disables it).
        implementation: atrous implementation of the 3x3 branches.
        bn_momentum, bn_epsilon, sync_batchnorm: batch norm settings.
    """

    def __init__(
        self,
        filters: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        image_pooling: bool = True,
        dropout: float = 0.0,
        implementation: str = "dilated",
        bn_momentum: float = 0.9997,
        bn_epsilon: float = 1e-5,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        _check_positive_int("filters", filters)
        rates = tuple(rates)
        if not rates:
            raise ValueError("rates must hold at least one atrous rate, got ()")
        for rate in rates:
            _check_positive_int("each of rates", rate)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        super().__init__(**kwargs)
        self.filters = filters
        self.rates = rates
        self.image_pooling = image_pooling
        self.dropout = dropout
        self.implementation = implementation
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.sync_batchnorm = sync_batchnorm

        norm = dict(bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, sync_batchnorm=sync_batchnorm)
        self.branches = [ConvBNReLU(filters, 1, name="branch_1x1", **norm)]
        # Branch names carry the index, not the rate: the rates change with the
        # output stride and the variables must not.
        for index, rate in enumerate(rates):
            self.branches.append(
                ConvBNReLU(
                    filters,
                    3,
                    rate=rate,
                    implementation=implementation,
                    name=f"branch_3x3_{index + 1}",
                    **norm,
                )
            )
        if image_pooling:
            self.branches.append(ImagePooling(filters, name="image_pooling", **norm))
        self.projection = ConvBNReLU(filters, 1, name="projection", **norm)
        self.dropout_layer = layers.Dropout(dropout, name="dropout") if dropout else None

    def build(self, input_shape):
        for branch in self.branches:
            branch.build(input_shape)
        self.projection.build((*input_shape[:3], self.filters * len(self.branches)))

    def call(self, inputs, training=None):
        x = ops.concatenate([b(inputs, training=training) for b in self.branches], axis=-1)
        x = self.projection(x, training=training)
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "rates": list(self.rates),
            "image_pooling": self.image_pooling,
            "dropout": self.dropout,
            "implementation": self.implementation,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "sync_batchnorm": self.sync_batchnorm,
        }


def resize_bilinear_aligned(images, size):
    """Bilinear resize of float32 [N, h, w, C] to ``size`` (H, W) with corners aligned.

    As in the DeepLab code: with 'same' padding, logit j of a stride-s map sits on
    input pixel s * j, so for sizes s * k + 1 (513) the mapping is exact.
    """
    return tf.raw_ops.ResizeBilinear(
        images=images, size=size, align_corners=True, half_pixel_centers=False
    )


@_register
class ResizeBilinear(layers.Layer):
    """Bilinearly resizes ``inputs[0]`` to the runtime spatial size of ``inputs[1]``.

    Corners are aligned (``resize_bilinear_aligned``). The output is float32 so
    logits stay full precision under mixed precision.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        x, reference = inputs
        size = ops.shape(reference)[1:3]
        x = resize_bilinear_aligned(ops.cast(x, "float32"), size)
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        x_shape, reference_shape = input_shape
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[-1])


def resize_bilinear_half_pixel(images, size):
    """Bilinear resize of float32 [N, h, w, C] to ``size`` with half-pixel centres.

    Output pixel i samples input coordinate (i + 0.5) h / H - 0.5: the mapping of
    an upsampling by an integer factor f whose input pixel j is the centre of the
    output cells f j .. f j + f - 1 (Caffe's bilinear deconvolution with kernel 2f,
    stride f, pad f / 2, which the Yu-Koltun code uses).
    """
    return tf.raw_ops.ResizeBilinear(
        images=images, size=size, align_corners=False, half_pixel_centers=True
    )


@_register
class UpsampleAndCrop(layers.Layer):
    """Upsamples ``inputs[0]`` by ``factor`` (half-pixel bilinear) and crops it to the
    runtime spatial size of ``inputs[1]`` (the top-left part).

    For networks whose logit j covers input pixels factor j .. factor j + factor - 1
    (the Yu-Koltun front end, whose padded input is a multiple of the factor): the
    upsampled map is aligned with the image, and the rows and columns past the
    image (the padding to a multiple of the factor) are cropped away. Float32 out.

    Args:
        factor: the network's output stride.
    """

    def __init__(self, factor: int = 8, **kwargs):
        _check_positive_int("factor", factor)
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        x, reference = inputs
        shape = ops.shape(x)
        x = resize_bilinear_half_pixel(
            ops.cast(x, "float32"), (shape[1] * self.factor, shape[2] * self.factor)
        )
        size = ops.shape(reference)
        return ops.cast(x[:, : size[1], : size[2], :], self.compute_dtype)

    def compute_output_shape(self, input_shape):
        x_shape, reference_shape = input_shape
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[-1])

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def reflect_indices(size, before, after):
    """Indices into a length-``size`` axis that pad it by ``before``/``after`` reflections.

    Reflection about the edge pixels without repeating them (``tf.pad`` REFLECT,
    OpenCV's BORDER_REFLECT_101), continued periodically, so a pad may exceed the
    size (186-pixel margins around a small image): index u maps to
    m = u mod 2(size - 1), then m if m < size else 2(size - 1) - m.
    """
    u = tf.range(-before, size + after)
    period = tf.maximum(2 * (size - 1), 1)
    m = tf.math.floormod(u, period)
    return tf.minimum(tf.where(m < size, m, period - m), size - 1)


PADDING_MODES = ("reflect", "zero")


@_register
class MarginPadding2D(layers.Layer):
    """Pads a feature map by ``margin`` on every side, and at the bottom and right up
    to a multiple of ``multiple``.

    The Yu-Koltun networks use no padding inside: the front end's input image is
    reflection-padded by the 186 pixels its valid convolutions consume, and the
    context module's input by 33 (its receptive field is 67 = 2 * 33 + 1), so the
    output has the input's size (paper sections 4 and 5).

    Args:
        margin: pixels added on each side.
        multiple: the unpadded size is first rounded up to a multiple of this.
        mode: ``"reflect"`` (``reflect_indices``; any margin) or ``"zero"``.
    """

    def __init__(self, margin: int, multiple: int = 1, mode: str = "reflect", **kwargs):
        if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
            raise ValueError(f"margin must be a non-negative integer, got {margin!r}")
        _check_positive_int("multiple", multiple)
        _check_choice("mode", mode, PADDING_MODES)
        super().__init__(**kwargs)
        self.margin = margin
        self.multiple = multiple
        self.mode = mode

    def _extra(self, size):
        return (-size) % self.multiple

    def call(self, inputs):
        shape = ops.shape(inputs)
        h, w = shape[1], shape[2]
        if self.mode == "zero":
            pads = [
                [0, 0],
                [self.margin, self.margin + self._extra(h)],
                [self.margin, self.margin + self._extra(w)],
                [0, 0],
            ]
            return tf.pad(inputs, pads)
        rows = reflect_indices(h, self.margin, self.margin + self._extra(h))
        cols = reflect_indices(w, self.margin, self.margin + self._extra(w))
        return tf.gather(tf.gather(inputs, rows, axis=1), cols, axis=2)

    def compute_output_shape(self, input_shape):
        def padded(size):
            return None if size is None else size + self._extra(size) + 2 * self.margin

        return (input_shape[0], padded(input_shape[1]), padded(input_shape[2]), input_shape[3])

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "multiple": self.multiple,
            "mode": self.mode,
        }


@_register
class FreezableDropout(layers.Dropout):
    """``keras.layers.Dropout`` that is off while the layer is frozen (``trainable=False``).

    Keras batch norm runs in inference mode when frozen; dropout does not. A
    frozen part of a network is fixed, so its dropout must be off too: the
    Yu-Koltun context module is trained on the front end's (deterministic)
    outputs, and DeepLab-MSc keeps the first-stage network as it was.
    """

    def call(self, inputs, training=False):
        return super().call(inputs, training=bool(training) and self.trainable)


# === Yu-Koltun context module ===

CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
# Output channels of each layer as multiples of the input channels C (paper Table 1).
CONTEXT_WIDTHS = {
    "basic": (1, 1, 1, 1, 1, 1, 1, 1),
    "large": (2, 2, 4, 8, 16, 32, 32, 1),
}
# Receptive field 67 = 1 + 2 * sum(dilations): the input is padded by 33.
CONTEXT_MARGIN = sum(CONTEXT_DILATIONS)


@_register
class ContextIdentity(initializers.Initializer):
    """Identity initialisation of a context-module convolution (Yu-Koltun, eqs. 4 and 5).

    For a kernel [k, k, c_in, c_out] in a module on C channels:
    k(t, a, b) = C / c_out where t is the centre tap and floor(a C / c_in) =
    floor(b C / c_out), else eps ~ N(0, sigma^2) with sigma = ``noise * C / c_out``.
    With c_in = c_out = C and no noise this is eq. 4 (each layer passes its input
    through); with widths multiple of C, eq. 5, which passes each input channel
    through the group of wider channels that descends from it, scaled so that the
    module's output at initialisation is its truncated input.

    Args:
        channels: C, the module's input (and output) channels.
        noise: sigma relative to C / c_out (the paper asks sigma << C / c_out).
        seed: seed of the noise.
    """

    def __init__(self, channels: int, noise: float = 0.0, seed: int | None = None):
        _check_positive_int("channels", channels)
        self.channels = channels
        self.noise = float(noise)
        self.seed = seed

    def __call__(self, shape, dtype=None):
        k_h, k_w, c_in, c_out = shape
        c = self.channels
        if c_in % c or c_out % c:
            raise ValueError(f"channels {c} must divide c_in {c_in} and c_out {c_out}")
        value = c / c_out
        same_group = (np.arange(c_in)[:, None] * c // c_in) == (np.arange(c_out)[None] * c // c_out)
        kernel = np.zeros(shape, np.float32)
        kernel[k_h // 2, k_w // 2] = value * same_group
        dtype = dtype or "float32"
        if not self.noise:
            return ops.convert_to_tensor(kernel, dtype=dtype)
        noise = keras.random.normal(shape, stddev=self.noise * value, dtype=dtype, seed=self.seed)
        return ops.convert_to_tensor(kernel, dtype=dtype) + noise * (kernel == 0)

    def get_config(self):
        return {"channels": self.channels, "noise": self.noise, "seed": self.seed}


@_register
class ContextModule(layers.Layer):
    """The context module of Yu & Koltun, "Multi-Scale Context Aggregation by Dilated
    Convolutions" (ICLR 2016), section 3 and Table 1.

    Seven 3x3 convolutions with dilations 1, 1, 2, 4, 8, 16, 1, each followed by
    ReLU, then a 1x1 convolution; no padding inside, the input is padded by 33
    (the receptive field is 67x67), so the output has the input's size and its C
    channels. Basic: C channels throughout (about 64 C^2 parameters); Large: 2C,
    2C, 4C, 8C, 16C, 32C, 32C, C. Identity initialisation (``ContextIdentity``,
    eqs. 4 and 5), zero biases: at initialisation the module returns max(x, 0)
    (Basic exactly; Large up to the noise that breaks ties between channels).

    Args:
        size: ``"basic"`` or ``"large"``.
        padding_mode: ``"zero"`` or ``"reflect"`` for the 33-pixel input margin (the
            paper found both similar).
        init_noise: Large: noise of eq. 5, relative to C / c_{i+1}.
        implementation: atrous implementation of the dilated convolutions.
    """

    def __init__(
        self,
        size: str = "basic",
        padding_mode: str = "zero",
        init_noise: float = 1e-3,
        implementation: str = "dilated",
        **kwargs,
    ):
        _check_choice("size", size, tuple(CONTEXT_WIDTHS))
        _check_choice("padding_mode", padding_mode, PADDING_MODES)
        super().__init__(**kwargs)
        self.size = size
        self.padding_mode = padding_mode
        self.init_noise = float(init_noise)
        self.implementation = implementation
        self.pad = MarginPadding2D(CONTEXT_MARGIN, mode=padding_mode, name="pad")
        self.convs = []

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: the channel dimension of the input must be known")
        noise = self.init_noise if self.size == "large" else 0.0
        widths = [channels * w for w in CONTEXT_WIDTHS[self.size]]
        kernel_sizes = (3,) * len(CONTEXT_DILATIONS) + (1,)
        rates = (*CONTEXT_DILATIONS, 1)
        shape = self.pad.compute_output_shape(input_shape)
        for index, (width, kernel_size, rate) in enumerate(
            zip(widths, kernel_sizes, rates, strict=True)
        ):
            conv = AtrousConv2D(
                width,
                kernel_size,
                rate=rate,
                implementation=self.implementation,
                padding="valid",
                kernel_initializer=ContextIdentity(channels, noise),
                name=f"conv{index + 1}" if index < len(CONTEXT_DILATIONS) else "final",
            )
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            self.convs.append(conv)

    def call(self, inputs):
        x = self.pad(inputs)
        for conv in self.convs[:-1]:
            x = ops.relu(conv(x))
        return self.convs[-1](x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "size": self.size,
            "padding_mode": self.padding_mode,
            "init_noise": self.init_noise,
            "implementation": self.implementation,
        }
