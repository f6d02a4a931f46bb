"""Input normalisation (``PixelNormalization``), batch norm as the papers configure it,
and the padding of inputs (``MarginPadding2D``, the Yu-Koltun front end's margins)."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from deeplab_tf.layers.base import check_choice, check_positive_int, register

# ImageNet mean pixel in RGB order (the Caffe/keras.applications ResNet and VGG
# normalisation, "caffe").
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)

NORMALIZATION_MODES = ("caffe", "tf")
# The RGB pixel each mode maps to zero: images are padded with it (crops larger than
# the image, padded batches), so that padding is zero after normalisation, as the
# zero padding inside the network is. "tf" scales [0, 255] to [-1, 1]: 127.5 is zero.
NORMALIZATION_MEANS = {"caffe": IMAGENET_MEAN_RGB, "tf": (127.5, 127.5, 127.5)}


@register
class FoldableBatchNormalization(layers.BatchNormalization):
    """Keras's batch norm, fused in training, which ``deeplab_tf.folding.fold_batch_norm``
    can fold into the convolution before it.

    In training, on NHWC feature maps, it runs TensorFlow's fused batch norm (one
    kernel forward and one backward, ``FusedBatchNormV3``) where Keras composes
    moments, normalisation and their gradients from a dozen elementwise ops and
    reductions: those took about a quarter of a ResNet-101 training step on a CPU.
    It computes the same function and the same moving statistics (the fused op's
    batch variance carries Bessel's correction, which is taken out, as Keras 2's
    fused path did). Synchronised (cross-replica) and renormalised batch norm,
    masks and other layouts take Keras's path.

    Folded (``folded=True``), the layer only adds ``beta`` per channel (a ``BiasAdd``,
    which oneDNN fuses with the convolution and a ReLU after it): the convolution's
    kernel then carries gamma / sqrt(variance + epsilon) and ``beta`` the rest of the
    affine map. A folded layer is for inference: it normalises nothing, in training
    mode neither.
    """

    def __init__(self, *args, folded: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.folded = folded

    def call(self, inputs, training=None, mask=None):
        if self.folded:
            return tf.nn.bias_add(inputs, ops.cast(self.beta, inputs.dtype))
        if training and self.trainable and self._fusable(inputs, mask):
            return self._fused_training(inputs)
        return super().call(inputs, training=training, mask=mask)

    def _fusable(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.synchronized
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (3, -1)
            and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16)
        )

    def _fused_training(self, inputs):
        channels = inputs.shape[-1]
        gamma = self.gamma if self.scale else tf.ones([channels])
        beta = self.beta if self.center else tf.zeros([channels])
        empty = tf.constant([], tf.float32)
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=tf.cast(gamma, tf.float32),
            offset=tf.cast(beta, tf.float32),
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=True,
        )
        # The op returns the unbiased variance n / (n - 1) s^2 (n >= 2) for the moving
        # average; Keras averages the biased one.
        count = tf.cast(tf.size(inputs) // channels, tf.float32)
        variance *= tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "folded": self.folded}


def batch_norm(
    name: str | None = None,
    momentum: float = 0.9997,
    epsilon: float = 1e-5,
    synchronized: bool = False,
) -> FoldableBatchNormalization:
    """The batch norm of the DeepLab v3 heads (decay 0.9997, v3 paper section 4.1)."""
    return FoldableBatchNormalization(
        momentum=momentum, epsilon=epsilon, synchronized=synchronized, name=name
    )


@register
class PixelNormalization(layers.Layer):
    """Maps RGB pixels in [0, 255] to what a backbone's ImageNet weights expect.

    This is the first layer of every model, so training, evaluation, serving and
    TFLite all feed the same raw pixels (DESIGN.md, Facts).

    Args:
        mode: ``"caffe"`` (RGB -> BGR, minus the ImageNet mean pixel; ResNet and
            VGG in keras.applications) or ``"tf"`` (scaled to [-1, 1]; MobileNetV2).
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        check_choice("mode", mode, NORMALIZATION_MODES)
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        mean_bgr = ops.convert_to_tensor(IMAGENET_MEAN_RGB[::-1], dtype=self.compute_dtype)
        return ops.flip(x, axis=-1) - mean_bgr

    @property
    def mean(self) -> tuple[float, float, float]:
        """The RGB pixel this layer maps to zero (``NORMALIZATION_MEANS``)."""
        return NORMALIZATION_MEANS[self.mode]

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def normalization_layer(model: keras.Model) -> PixelNormalization:
    """``model``'s input normalisation (nested models searched too)."""
    stack = [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, PixelNormalization):
            return layer
        stack.extend(getattr(layer, "layers", []))
    raise ValueError(f"model {model.name} has no PixelNormalization layer")


def normalization_mean(model: keras.Model) -> tuple[float, float, float]:
    """The RGB pixel that ``model``'s input normalisation maps to zero: what to pad its
    images with."""
    return normalization_layer(model).mean


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


@register
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
        check_positive_int("multiple", multiple)
        check_choice("mode", mode, PADDING_MODES)
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
