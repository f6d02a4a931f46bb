"""VGG-16 for DeepLab v1/v2 and for the Yu-Koltun front end, and its ImageNet weights.

Layer names and weight shapes are those of ``keras.applications.VGG16``
(``block1_conv1`` .. ``block5_conv3``), so the ImageNet convolutions transfer by
name. The fully connected layers become convolutions (``fc6``, ``fc7``) whose
kernels are made from ``fc1``/``fc2`` of ``VGG16(include_top=True)``
(``fc_kernels_from_dense``).

* DeepLab (v1 paper section 3.1, v2 section 3.1): pool1..pool3 are 3x3 with stride
  2, pool4 and pool5 3x3 with stride 1 (no decimation), conv5 has dilation 2 and
  fc6 dilation 4 (or the v1 variants' 8 and 12): output stride 8, 'same' padding,
  ceil(H / 8) outputs (306 -> 39, v1 section 3.2).
* Yu-Koltun front end (section 4): pool4 and pool5 removed entirely, pool1..3 are
  VGG's 2x2/2, conv5 dilation 2, fc6 7x7 dilation 4, no padding anywhere inside;
  the image is reflection-padded by the 186 pixels the network consumes, so the
  output has ceil(H / 8) pixels, pixel j covering image pixels 8j .. 8j + 7.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

from deeplab_tf.backbones.features import FeatureInfo
from deeplab_tf.backbones.weights import TransferReport, transfer_weights, weights_source
from deeplab_tf.layers import AtrousConv2D, FreezableDropout, MarginPadding2D, PixelNormalization

VGG_BACKBONES = ("vgg16", "vgg16_frontend")
# (filters, convolutions) of the five blocks.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# The ImageNet fc6 is a 7x7 convolution over 512 channels (fc1 of keras.applications).
IMAGENET_FC6_SIZE = 7
FC_DROPOUT = 0.5
# Seed of the random subset of ImageNet fc6/fc7 filters kept by 1024-wide heads (LargeFOV).
FC_SUBSET_SEED = 0
# What the front end's valid convolutions consume on each side, in input pixels:
# (2 + 2 * 2 + 3 * 4 + 3 * 8) for conv1..conv4, 3 * 2 * 8 for conv5 (dilation 2) and
# 3 * 4 * 8 for fc6 (7x7, dilation 4): 186, the margin of the Yu-Koltun code.
FRONTEND_MARGIN = 186
FRONTEND_STRIDE = 8
# The DeepLab-MSc taps: the normalised image and pool1..pool4 (v1 paper section 4.3).
MSC_TAPS = ("normalization", "block1_pool", "block2_pool", "block3_pool", "block4_pool")


def _check_output_stride_8(arch: str, output_stride: int) -> None:
    if output_stride != 8:
        raise ValueError(
            f"{arch} runs at output stride 8 only (the v1/v2 and Yu-Koltun networks), "
            f"got {output_stride!r}"
        )


def _conv(x, filters: int, rate: int, padding: str, implementation: str, name: str):
    if rate == 1:  # exactly keras.applications' layer
        return layers.Conv2D(filters, 3, padding=padding, activation="relu", name=name)(x)
    conv = AtrousConv2D(filters, 3, rate, implementation, padding, name=name)
    x = conv(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def build_vgg16(
    output_stride: int = 8,
    implementation: str = "dilated",
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    msc_taps: bool = False,
) -> keras.Model:
    """The DeepLab v1/v2 VGG-16 from RGB pixels in [0, 255] to 512 features at stride 8.

    Args:
        output_stride: 8 (the only stride of the v1/v2 VGG networks).
        implementation: atrous implementation of conv5 (dilation 2).
        input_shape: (H, W, 3); H and W may be None.
        msc_taps: also return the DeepLab-MSc inputs (``MSC_TAPS``): the model then
            outputs ``[features, normalised image, pool1, pool2, pool3, pool4]``.

    Returns:
        A ``keras.Model`` named ``vgg16`` (ceil(H / 8) outputs) with ``feature_info``.
    """
    _check_output_stride_8("vgg16", output_stride)
    inputs = keras.Input(shape=input_shape, name="image")
    x = PixelNormalization("caffe", name="normalization")(inputs)
    outputs = {"normalization": x}
    feature_info = []
    reduction = 1
    for block, (filters, convs) in enumerate(VGG16_BLOCKS, start=1):
        rate = 2 if block == 5 else 1  # after pool4, which no longer decimates
        for index in range(1, convs + 1):
            x = _conv(x, filters, rate, "same", implementation, f"block{block}_conv{index}")
        stride = 2 if block <= 3 else 1
        reduction *= stride
        x = layers.MaxPooling2D(3, strides=stride, padding="same", name=f"block{block}_pool")(x)
        outputs[f"block{block}_pool"] = x
        feature_info.append(FeatureInfo(f"block{block}_pool", filters, reduction))
    taps = [outputs[name] for name in MSC_TAPS]
    model = keras.Model(inputs, [x, *taps] if msc_taps else x, name="vgg16")
    model.feature_info = tuple(feature_info)
    return model


def build_vgg16_frontend(
    output_stride: int = 8,
    implementation: str = "dilated",
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
) -> keras.Model:
    """The Yu-Koltun front end's convolutions, from RGB pixels to 512 features.

    The image is normalised, padded to a multiple of 8 at the bottom/right and
    reflection-padded by ``FRONTEND_MARGIN`` on every side; then conv1..conv5 run
    without padding (pool1..3 2x2/2, no pool4/pool5, conv5 dilation 2). The output
    has ceil(H / 8) + 24 pixels: ``fc6`` (7x7, dilation 4, valid) brings it to ceil(H / 8).

    Returns:
        A ``keras.Model`` named ``vgg16_frontend`` with ``feature_info``.
    """
    _check_output_stride_8("vgg16_frontend", output_stride)
    inputs = keras.Input(shape=input_shape, name="image")
    x = PixelNormalization("caffe", name="normalization")(inputs)
    x = MarginPadding2D(FRONTEND_MARGIN, FRONTEND_STRIDE, "reflect", name="reflection_padding")(x)
    feature_info = []
    reduction = 1
    for block, (filters, convs) in enumerate(VGG16_BLOCKS, start=1):
        rate = 2 if block == 5 else 1
        for index in range(1, convs + 1):
            x = _conv(x, filters, rate, "valid", implementation, f"block{block}_conv{index}")
        name = f"block{block}_conv{convs}"
        if block <= 3:
            reduction *= 2
            name = f"block{block}_pool"
            x = layers.MaxPooling2D(2, name=name)(x)
        feature_info.append(FeatureInfo(name, filters, reduction))
    model = keras.Model(inputs, x, name="vgg16_frontend")
    model.feature_info = tuple(feature_info)
    return model


def vgg_fc_layers(
    x,
    kernel_size: int,
    rate: int,
    filters: int,
    padding: str = "same",
    implementation: str = "dilated",
    suffix: str = "",
):
    """VGG's fc6 and fc7 as convolutions: fc6 (``kernel_size``, dilation ``rate``,
    ``filters``) -> ReLU -> dropout 0.5 -> fc7 (1x1, ``filters``) -> ReLU -> dropout 0.5.

    Layer names ``fc6{suffix}``, ``fc7{suffix}`` (``load_vgg16_weights`` fills them).
    """
    x = AtrousConv2D(
        filters,
        kernel_size,
        rate=rate,
        implementation=implementation,
        padding=padding,
        name=f"fc6{suffix}",
    )(x)
    x = layers.Activation("relu", name=f"fc6{suffix}_relu")(x)
    x = FreezableDropout(FC_DROPOUT, name=f"drop6{suffix}")(x)
    x = layers.Conv2D(filters, 1, activation="relu", name=f"fc7{suffix}")(x)
    return FreezableDropout(FC_DROPOUT, name=f"drop7{suffix}")(x)


# === ImageNet weights ===


def decimation_taps(kernel_size: int, source_size: int = IMAGENET_FC6_SIZE) -> np.ndarray:
    """Evenly spaced taps of a ``source_size`` kernel kept in a ``kernel_size`` one:
    (0, 2, 4, 6) for 4x4, (0, 3, 6) for 3x3, all for 7x7 (v1 section 3.2: "spatially
    subsampling (by simple decimation)")."""
    if not 1 <= kernel_size <= source_size:
        raise ValueError(f"kernel_size must be in 1..{source_size}, got {kernel_size!r}")
    return np.round(np.linspace(0, source_size - 1, kernel_size)).astype(int)


def fc_kernels_from_dense(
    fc1: Sequence[np.ndarray],
    fc2: Sequence[np.ndarray],
    kernel_size: int,
    filters: int,
    seed: int = FC_SUBSET_SEED,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """fc6/fc7 convolution weights from VGG-16's fully connected fc1/fc2.

    ``fc1`` is ``[kernel (49 C, F), bias (F,)]`` over the flattened 7x7xC pool5
    (Keras ``Flatten``: row-major (row, column, channel)), so it is the 7x7xCxF
    kernel of a convolution, decimated to ``kernel_size`` (``decimation_taps``).
    With ``filters < F`` a random subset of the fc6 filters is kept, and a second
    one of the fc7 filters, whose input channels are the kept fc6 filters (LargeFOV:
    "a random subset of 1,024 out of the 4,096 filters", v2 section 4.1.1).

    Returns:
        ``[fc6 kernel, fc6 bias]``, ``[fc7 kernel (1, 1, filters, filters), fc7 bias]``.
    """
    kernel1, bias1 = (np.asarray(w) for w in fc1)
    kernel2, bias2 = (np.asarray(w) for w in fc2)
    size = IMAGENET_FC6_SIZE
    units = kernel1.shape[1]
    if kernel1.shape[0] % (size * size) or kernel2.shape != (units, units):
        raise ValueError(
            f"fc1/fc2 kernels of shapes {kernel1.shape}, {kernel2.shape} are not VGG's "
            f"(49 C, F) and (F, F)"
        )
    if not 1 <= filters <= units:
        raise ValueError(f"filters must be in 1..{units}, got {filters!r}")
    kernel6 = kernel1.reshape(size, size, -1, units)
    taps = decimation_taps(kernel_size)
    kernel6 = kernel6[taps][:, taps]
    keep6 = keep7 = np.arange(units)
    if filters < units:
        rng = np.random.default_rng(seed)
        keep6 = np.sort(rng.choice(units, filters, replace=False))
        keep7 = np.sort(rng.choice(units, filters, replace=False))
    fc6 = [kernel6[..., keep6], bias1[keep6]]
    fc7 = [kernel2[keep6][:, keep7].reshape(1, 1, filters, filters), bias2[keep7]]
    return fc6, fc7


def fc_layer_pairs(model: keras.Model) -> list[tuple[keras.layers.Layer, keras.layers.Layer]]:
    """The (fc6, fc7) layer pairs of a model: ``fc6``/``fc7`` or ``fc6_i``/``fc7_i``."""
    by_name = {layer.name: layer for layer in model.layers}
    return [
        (layer, by_name["fc7" + layer.name[3:]])
        for layer in model.layers
        if layer.name.startswith("fc6") and "fc7" + layer.name[3:] in by_name
    ]


def load_vgg16_weights(
    model: keras.Model,
    backbone: keras.Model,
    weights: str | os.PathLike,
    seed: int = FC_SUBSET_SEED,
) -> TransferReport:
    """Fills a VGG model from ImageNet: the backbone's convolutions by name, and every
    fc6/fc7 pair of ``model`` from fc1/fc2 (``fc_kernels_from_dense``).

    Args:
        model: the segmentation model holding ``backbone`` and the fc layers.
        backbone: its ``vgg16`` or ``vgg16_frontend`` part.
        weights: ``"imagenet"`` or a file, as ``deeplab_tf.backbones.load_backbone_weights``
            (the VGG16 *with* its top: ``include_top=True``).

    Raises:
        WeightsUnavailableError: the weights cannot be obtained.
    """
    source = weights_source("vgg16", weights)
    report = transfer_weights(source, backbone)
    fc1 = source.get_layer("fc1").get_weights()
    fc2 = source.get_layer("fc2").get_weights()
    for fc6, fc7 in fc_layer_pairs(model):
        weights6, weights7 = fc_kernels_from_dense(fc1, fc2, fc6.kernel_size, fc6.filters, seed)
        fc6.set_weights(weights6)
        fc7.set_weights(weights7)
        report.filled += [fc6.name, fc7.name]
    return report
