"""ResNet-50/101 (v1, bottleneck) with output-stride control, multi-grid and cascaded blocks,
and ``resnet10_cpu``, a small basic-block ResNet for CPU training on small images.

Layer names and weight shapes are those of ``keras.applications.ResNet50/101``
so ImageNet weights transfer by name, and at output stride 32 the features are
the same as that model's, except that the convolutions have no bias: each is followed
by a batch norm, which cancels it, so loading moves Keras's biases into the batch
norms' moving means (``weights.transfer_weights``) and training computes no bias
gradients (a ``deeplabv3`` step about 5 % faster). The paper's block1..block4 are
Keras's conv2..conv5; the cascaded copies of block4 (v3 paper section 3.2,
block5..block7) are named conv6..conv8.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from deeplab_tf.backbones.features import FeatureInfo
from deeplab_tf.backbones.output_stride import (
    check_multi_grid,
    check_output_stride,
    stage_strides,
)
from deeplab_tf.layers import AtrousConv2D, FoldableBatchNormalization, PixelNormalization

RESNET_UNITS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
STAGE_FILTERS = (64, 128, 256, 512)
MAX_CASCADE_BLOCKS = 3
# keras.applications ResNet batch norm epsilon; the weights were trained with it.
BN_EPSILON = 1.001e-5


def _bottleneck_unit(
    x,
    filters: int,
    stride: int,
    rate: int,
    projection: bool,
    name: str,
    implementation: str,
    bn_momentum: float,
    sync_batchnorm: bool,
):
    """Keras's ``residual_block_v1``: the stride sits in the first 1x1 convolution,
    so the 3x3 after it takes the stage's new rate at once."""

    def bn(suffix):
        return FoldableBatchNormalization(
            epsilon=BN_EPSILON,
            momentum=bn_momentum,
            synchronized=sync_batchnorm,
            name=f"{name}_{suffix}_bn",
        )

    if projection:
        shortcut = layers.Conv2D(
            4 * filters,
            1,
            strides=stride,
            use_bias=False,
            kernel_initializer="he_normal",
            name=f"{name}_0_conv",
        )(x)
        shortcut = bn("0")(shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(
        filters,
        1,
        strides=stride,
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_1_conv",
    )(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(bn("1")(x))
    x = AtrousConv2D(
        filters,
        3,
        rate=rate,
        use_bias=False,
        implementation=implementation,
        kernel_initializer="he_normal",
        name=f"{name}_2_conv",
    )(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(bn("2")(x))
    x = layers.Conv2D(
        4 * filters, 1, use_bias=False, kernel_initializer="he_normal", name=f"{name}_3_conv"
    )(x)
    x = bn("3")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def build_resnet(
    arch: str = "resnet101",
    output_stride: int = 16,
    multi_grid: Sequence[int] = (1, 1, 1),
    cascade_blocks: int = 0,
    implementation: str = "dilated",
    bn_momentum: float = 0.9997,
    sync_batchnorm: bool = False,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
) -> keras.Model:
    """ResNet v1 backbone from RGB pixels in [0, 255] to dense features.

    Args:
        arch: ``"resnet50"`` or ``"resnet101"``.
        output_stride: 8, 16 or 32; strides past it become atrous rates
            (OS16: block4 rate 2; OS8: block3 rate 2, block4 rate 4).
        multi_grid: unit rates (r1, r2, r3) multiplying the 3x3 rates of the three
            units of block4 and of every cascaded block (v3 paper section 3.2.1).
        cascade_blocks: 0..3 extra copies of block4 (block5..block7), each with a
            nominal stride of 2 that becomes a doubling of the rate.
        implementation: atrous implementation of the 3x3 convolutions.
        bn_momentum, sync_batchnorm: batch norm settings.
        input_shape: (H, W, 3); H and W may be None.

    Returns:
        A ``keras.Model`` named ``arch`` whose output has 2048 channels at
        ceil(H / output_stride); ``model.feature_info`` lists the stage outputs.
    """
    if arch not in RESNET_UNITS:
        raise ValueError(f"arch must be one of {sorted(RESNET_UNITS)}, got {arch!r}")
    check_output_stride(output_stride)
    multi_grid = check_multi_grid(multi_grid, RESNET_UNITS[arch][-1], "block4")
    if cascade_blocks not in range(MAX_CASCADE_BLOCKS + 1):
        raise ValueError(
            f"cascade_blocks must be in 0..{MAX_CASCADE_BLOCKS} (block5..block7), "
            f"got {cascade_blocks!r}"
        )

    units = RESNET_UNITS[arch] + (RESNET_UNITS[arch][-1],) * cascade_blocks
    filters = STAGE_FILTERS + (STAGE_FILTERS[-1],) * cascade_blocks
    nominal = (1, 2, 2, 2) + (2,) * cascade_blocks
    schedule = stage_strides(nominal, output_stride, stem_stride=4)

    inputs = keras.Input(shape=input_shape, name="image")
    x = PixelNormalization("caffe", name="normalization")(inputs)
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(
        64, 7, strides=2, use_bias=False, kernel_initializer="he_normal", name="conv1_conv"
    )(x)
    x = FoldableBatchNormalization(
        epsilon=BN_EPSILON, momentum=bn_momentum, synchronized=sync_batchnorm, name="conv1_bn"
    )(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    feature_info = [FeatureInfo("conv1_relu", 64, 2)]
    for stage_index, (stage, stage_units, stage_filters) in enumerate(
        zip(schedule, units, filters, strict=True)
    ):
        stage_name = f"conv{stage_index + 2}"
        # Multi-grid applies to block4 (conv5) and the cascaded blocks after it.
        grid = multi_grid if stage_index >= 3 else (1,) * stage_units
        for unit in range(stage_units):
            x = _bottleneck_unit(
                x,
                stage_filters,
                stride=stage.stride if unit == 0 else 1,
                rate=stage.rate * grid[unit],
                projection=unit == 0,
                name=f"{stage_name}_block{unit + 1}",
                implementation=implementation,
                bn_momentum=bn_momentum,
                sync_batchnorm=sync_batchnorm,
            )
        feature_info.append(
            FeatureInfo(f"{stage_name}_block{stage_units}_out", 4 * stage_filters, stage.reduction)
        )

    model = keras.Model(inputs, x, name=arch)
    model.feature_info = tuple(feature_info)
    return model


# === resnet10_cpu ===

# One basic-block unit per stage (He et al. 2016, Table 1: the ResNet-18/34 block, at
# the depth of timm's resnet10), a quarter of ResNet-18's widths and a 3x3 stride-2
# stem without max pooling: 96-pixel images keep 48x48 features in block1 and 12x12 at
# output stride 8. Chosen for the quickstart (``deeplabv3-resnet10-cpu``): on a 2-core
# CPU it trains 117 images/s where a half-width MobileNetV2, whose depthwise
# convolutions run at a low rate there, trained 77, and it learns more per step.
RESNET10_CPU_FILTERS = (32, 64, 128, 128)
RESNET10_CPU_STEM_FILTERS = 32
RESNET10_CPU_OUTPUT_STRIDES = (8, 16)  # stem 2 x stages (1, 2, 2, 2) reach 16 at most


def _basic_unit(
    x,
    filters: int,
    stride: int,
    rate_in: int,
    rate: int,
    projection: bool,
    name: str,
    implementation: str,
    bn_momentum: float,
    sync_batchnorm: bool,
):
    """The basic residual unit (two 3x3 convolutions). The first holds the stride;
    when the stride has become a rate it keeps the rate of the grid it reads
    (``rate_in``), and it pads symmetrically so strided and atrous runs sample the
    same pixels (as MobileNetV2's depthwise convolutions). ``projection`` follows the
    nominal stride, so the weights are the same at every output stride."""

    def bn(suffix):
        return FoldableBatchNormalization(
            momentum=bn_momentum, synchronized=sync_batchnorm, name=f"{name}_{suffix}_bn"
        )

    shortcut = x
    if projection:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_0_conv")(
            x
        )
        shortcut = bn("0")(shortcut)
    if stride != 1:  # still strided, so nothing before it was dilated (rate_in 1)
        x = layers.ZeroPadding2D(1, name=f"{name}_1_pad")(x)
        x = layers.Conv2D(
            filters,
            3,
            strides=stride,
            use_bias=False,
            kernel_initializer="he_normal",
            name=f"{name}_1_conv",
        )(x)
    else:
        x = AtrousConv2D(
            filters,
            3,
            rate=rate_in,
            use_bias=False,
            implementation=implementation,
            kernel_initializer="he_normal",
            name=f"{name}_1_conv",
        )(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(bn("1")(x))
    x = AtrousConv2D(
        filters,
        3,
        rate=rate,
        use_bias=False,
        implementation=implementation,
        kernel_initializer="he_normal",
        name=f"{name}_2_conv",
    )(x)
    x = bn("2")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def build_resnet10_cpu(
    output_stride: int = 8,
    implementation: str = "dilated",
    bn_momentum: float = 0.9997,
    sync_batchnorm: bool = False,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
) -> keras.Model:
    """The ``resnet10_cpu`` backbone from RGB pixels in [0, 255] to dense features.

    Args:
        output_stride: 8 or 16 (block4 at rate 2, or strided).
        implementation: atrous implementation of the 3x3 convolutions.
        bn_momentum, sync_batchnorm: batch norm settings.
        input_shape: (H, W, 3); H and W may be None.

    Returns:
        A ``keras.Model`` named ``resnet10_cpu`` with 128 output channels at
        ceil(H / output_stride); ``model.feature_info`` lists the stage outputs.
        There are no ImageNet weights for it: it trains from scratch.
    """
    check_output_stride(output_stride)
    if output_stride not in RESNET10_CPU_OUTPUT_STRIDES:
        raise ValueError(
            f"resnet10_cpu supports output_stride {list(RESNET10_CPU_OUTPUT_STRIDES)} "
            f"(its stride is 16 at most), got {output_stride}"
        )
    nominal_strides = (1, 2, 2, 2)
    schedule = stage_strides(nominal_strides, output_stride, stem_stride=2)

    inputs = keras.Input(shape=input_shape, name="image")
    x = PixelNormalization("tf", name="normalization")(inputs)
    x = layers.ZeroPadding2D(1, name="conv1_pad")(x)
    x = layers.Conv2D(
        RESNET10_CPU_STEM_FILTERS,
        3,
        strides=2,
        use_bias=False,
        kernel_initializer="he_normal",
        name="conv1_conv",
    )(x)
    x = FoldableBatchNormalization(
        momentum=bn_momentum, synchronized=sync_batchnorm, name="conv1_bn"
    )(x)
    x = layers.Activation("relu", name="conv1_relu")(x)

    feature_info = [FeatureInfo("conv1_relu", RESNET10_CPU_STEM_FILTERS, 2)]
    for stage_index, (stage, nominal, filters) in enumerate(
        zip(schedule, nominal_strides, RESNET10_CPU_FILTERS, strict=True)
    ):
        name = f"conv{stage_index + 2}_block1"
        x = _basic_unit(
            x,
            filters,
            stride=stage.stride,
            rate_in=stage.rate_in,
            rate=stage.rate,
            projection=nominal != 1 or x.shape[-1] != filters,
            name=name,
            implementation=implementation,
            bn_momentum=bn_momentum,
            sync_batchnorm=sync_batchnorm,
        )
        feature_info.append(FeatureInfo(f"{name}_out", filters, stage.reduction))

    model = keras.Model(inputs, x, name="resnet10_cpu")
    model.feature_info = tuple(feature_info)
    return model
