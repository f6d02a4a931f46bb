"""What the v1/v2 heads and every model's end use: bilinear upsampling with aligned
corners (``ResizeBilinear``), the front end's ``UpsampleAndCrop`` and the fc layers'
``FreezableDropout``."""

from __future__ import annotations

import tensorflow as tf
from keras import layers, ops

from deeplab_tf.layers.base import check_positive_int, register


def resize_bilinear_aligned(images, size):
    """Bilinear resize of float32 [N, h, w, C] to ``size`` (H, W) with corners aligned.

    As in the DeepLab code: with 'same' padding, logit j of a stride-s map sits on
    input pixel s * j, so for sizes s * k + 1 (513) the mapping is exact.
    """
    return tf.raw_ops.ResizeBilinear(
        images=images, size=size, align_corners=True, half_pixel_centers=False
    )


@register
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


@register
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
        check_positive_int("factor", factor)
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


@register
class FreezableDropout(layers.Dropout):
    """``keras.layers.Dropout`` that is off while the layer is frozen (``trainable=False``).

    Keras batch norm runs in inference mode when frozen; dropout does not. A
    frozen part of a network is fixed, so its dropout must be off too: the
    Yu-Koltun context module is trained on the front end's (deterministic)
    outputs, and DeepLab-MSc keeps the first-stage network as it was.
    """

    def call(self, inputs, training=False):
        return super().call(inputs, training=bool(training) and self.trainable)
