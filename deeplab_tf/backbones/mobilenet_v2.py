"""MobileNetV2 with output-stride control, for mobile export and fast CPU runs.

Layer names and weight shapes are those of ``keras.applications.MobileNetV2``
(without its final 1280-channel ``Conv_1``; DeepLab takes the 320-channel
features of the last inverted residual block, as the TF DeepLab code does).
Strided convolutions are padded symmetrically (``keras.applications`` pads
(0, 1) for unknown sizes), so a strided layer samples the same pixels as its
atrous replacement and outputs at output strides 8/16/32 agree exactly.
"""

from __future__ import annotations

import keras
from keras import layers

from deeplab_tf.backbones.features import FeatureInfo
from deeplab_tf.backbones.output_stride import check_output_stride, stage_strides
from deeplab_tf.layers import FoldableBatchNormalization, PixelNormalization

# (expansion, filters, nominal stride, units) of the inverted residual stages;
# the first two stages make the stride-4 stem together with Conv1.
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 3),
    (6, 64, 2, 4),
    (6, 96, 1, 3),
    (6, 160, 2, 3),
    (6, 320, 1, 1),
)
BN_EPSILON = 1e-3


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to a multiple of ``divisor`` (MobileNet reference rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # never round down by more than 10%
        rounded += divisor
    return rounded


def build_mobilenet_v2(
    alpha: float = 1.0,
    output_stride: int = 16,
    bn_momentum: float = 0.9997,
    sync_batchnorm: bool = False,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
) -> keras.Model:
    """MobileNetV2 backbone from RGB pixels in [0, 255] to dense features.

    Args:
        alpha: width multiplier (keras.applications has ImageNet weights for
            0.35, 0.5, 0.75, 1.0, 1.3 and 1.4).
        output_stride: 8, 16 or 32.
        bn_momentum, sync_batchnorm: batch norm settings.
        input_shape: (H, W, 3); H and W may be None.

    Returns:
        A ``keras.Model`` named ``mobilenetv2`` with ``make_divisible(320 * alpha)``
        output channels at ceil(H / output_stride); ``model.feature_info`` lists
        the stage outputs.
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"alpha must be a positive width multiplier, got {alpha!r}")
    check_output_stride(output_stride)

    def bn(name):
        return FoldableBatchNormalization(
            epsilon=BN_EPSILON, momentum=bn_momentum, synchronized=sync_batchnorm, name=name
        )

    # Conv1 and the stride-2 stage make a stride-4 stem: only the strides of the
    # three stride-2 stages after it can turn into rates (OS >= 8).
    strided = [stage for stage in MOBILENET_V2_STAGES[2:] if stage[2] == 2]
    schedule = iter(stage_strides([s[2] for s in strided], output_stride, stem_stride=4))

    inputs = keras.Input(shape=input_shape, name="image")
    x = PixelNormalization("tf", name="normalization")(inputs)
    x = layers.ZeroPadding2D(1, name="Conv1_pad")(x)
    x = layers.Conv2D(make_divisible(32 * alpha), 3, strides=2, use_bias=False, name="Conv1")(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(bn("bn_Conv1")(x))

    feature_info = []
    block_id, reduction, rate = 0, 2, 1
    for stage_index, (expansion, filters, nominal_stride, units) in enumerate(MOBILENET_V2_STAGES):
        out_channels = make_divisible(int(filters * alpha))
        for unit in range(units):
            prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
            stride, depthwise_rate = 1, rate
            if unit == 0 and nominal_stride == 2:
                if stage_index == 1:
                    stride = 2  # part of the stem
                else:
                    stage = next(schedule)
                    stride, depthwise_rate, rate = stage.stride, stage.rate_in, stage.rate
                reduction *= stride
            in_channels = x.shape[-1]
            shortcut = x
            if block_id:
                x = layers.Conv2D(
                    expansion * in_channels, 1, use_bias=False, name=f"{prefix}expand"
                )(x)
                x = layers.ReLU(6.0, name=f"{prefix}expand_relu")(bn(f"{prefix}expand_BN")(x))
            if unit == 0 and nominal_stride == 2:
                x = layers.ZeroPadding2D(depthwise_rate, name=f"{prefix}pad")(x)
                padding = "valid"
            else:
                padding = "same"
            x = layers.DepthwiseConv2D(
                3,
                strides=stride,
                dilation_rate=depthwise_rate,
                padding=padding,
                use_bias=False,
                name=f"{prefix}depthwise",
            )(x)
            x = layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(bn(f"{prefix}depthwise_BN")(x))
            x = layers.Conv2D(out_channels, 1, use_bias=False, name=f"{prefix}project")(x)
            x = bn(f"{prefix}project_BN")(x)
            last_layer = f"{prefix}project_BN"
            # The residual follows the nominal stride, so the layers (and the
            # weights) are the same at every output stride.
            if in_channels == out_channels and not (unit == 0 and nominal_stride == 2):
                x = layers.Add(name=f"{prefix}add")([shortcut, x])
                last_layer = f"{prefix}add"
            block_id += 1
        feature_info.append(FeatureInfo(last_layer, out_channels, reduction))

    model = keras.Model(inputs, x, name="mobilenetv2")
    model.feature_info = tuple(feature_info)
    return model
