"""Aligned Xception-65 (DeepLabv3+ section 3.2; TF1 research/deeplab ``xception_65``)
with output-stride control.

The Xception of Chollet (CVPR 2017) as modified by MSRA for dense prediction and then by
the DeepLab authors: more middle-flow blocks (16), every max pooling replaced by a
strided separable convolution (so that atrous rates can replace any stride), batch norm
after every depthwise and pointwise convolution. Layout (TF1 ``xception_65_factory``):

* stem: 3x3 convolution of 32, stride 2 (TF1's explicit padding); 3x3 of 64;
* entry flow: three blocks of three separable convolutions (128, 256, 728 wide), the
  last of each with stride 2, plus a 1x1 strided convolution shortcut;
* middle flow: 16 blocks of three 728-wide separable convolutions, identity shortcut;
* exit flow: a block of 728, 1024, 1024 with stride 2 and a 1x1 shortcut, then one of
  1536, 1536, 2048 without shortcut (its unit rates are the multi-grid).

In every block but the last, each separable convolution is preceded by a ReLU and has
none inside (TF1 ``activation_fn_in_separable_conv=False``, the released checkpoints'
design); the last block has a ReLU after each batch norm instead. Batch norm epsilon
1e-3 as TF1's Xception. Inputs scaled to [-1, 1] (TF1 DeepLab's preprocessing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
from keras import layers

from deeplab_tf.backbones.features import FeatureInfo
from deeplab_tf.backbones.output_stride import (
    check_multi_grid,
    check_output_stride,
    stage_strides,
)
from deeplab_tf.layers import (
    AtrousSeparableConv2D,
    FoldableBatchNormalization,
    PixelNormalization,
    fixed_padding,
)

XCEPTION_BN_EPSILON = 1e-3
XCEPTION_STEM = (32, 64)
MIDDLE_FLOW_BLOCKS = 16


@dataclass(frozen=True)
class XceptionBlock:
    """One block of the table: its scope, the three separable convolutions' widths,
    its shortcut ("conv", "sum" or "none"), its nominal stride and whether the ReLUs sit
    inside the separable convolutions (after each batch norm) instead of before them."""

    name: str
    depths: tuple[int, int, int]
    shortcut: str
    stride: int
    relu_inside: bool = False


XCEPTION_65_BLOCKS = (
    XceptionBlock("entry_flow_block1", (128, 128, 128), "conv", 2),
    XceptionBlock("entry_flow_block2", (256, 256, 256), "conv", 2),
    XceptionBlock("entry_flow_block3", (728, 728, 728), "conv", 2),
    *(
        XceptionBlock(f"middle_flow_block{i + 1}", (728, 728, 728), "sum", 1)
        for i in range(MIDDLE_FLOW_BLOCKS)
    ),
    XceptionBlock("exit_flow_block1", (728, 1024, 1024), "conv", 2),
    XceptionBlock("exit_flow_block2", (1536, 1536, 2048), "none", 1, relu_inside=True),
)
MIDDLE_FLOW_LAST = XCEPTION_65_BLOCKS[2 + MIDDLE_FLOW_BLOCKS]
# The decoder's stride-4 features (TF1 DECODER_END_POINTS of xception_65): the second
# separable convolution of entry_flow/block2, before the block's stride.
XCEPTION_LOW_LEVEL = "entry_flow_block2_separable_conv2"


def build_xception65(
    output_stride: int = 16,
    multi_grid: Sequence[int] = (1, 1, 1),
    implementation: str = "dilated",
    bn_momentum: float = 0.9997,
    sync_batchnorm: bool = False,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
) -> keras.Model:
    """Aligned Xception-65 from RGB pixels in [0, 255] to dense features.

    Args:
        output_stride: 8, 16 or 32. A block whose stride would pass it runs at stride
            1 and multiplies the atrous rate of every block after it (TF1
            ``stack_blocks_dense``: at 16 the exit flow's second block runs at rate 2;
            at 8 the middle flow at 2 and the exit flow's second block at 4).
        multi_grid: unit rates of the last block's three separable convolutions.
        implementation: atrous implementation of the depthwise convolutions.
        bn_momentum, sync_batchnorm: batch norm settings.
        input_shape: (H, W, 3); H and W may be None.

    Returns:
        A ``keras.Model`` named ``xception65`` with 2048 channels at
        ceil(H / output_stride); ``model.feature_info`` lists the block outputs and
        the decoder's stride-4 point.
    """
    check_output_stride(output_stride)
    multi_grid = check_multi_grid(multi_grid, 3, "exit_flow_block2")
    norm = dict(bn_momentum=bn_momentum, bn_epsilon=XCEPTION_BN_EPSILON,
                sync_batchnorm=sync_batchnorm)  # fmt: skip

    def bn(name):
        return FoldableBatchNormalization(
            momentum=bn_momentum,
            epsilon=XCEPTION_BN_EPSILON,
            synchronized=sync_batchnorm,
            name=name,
        )

    inputs = keras.Input(shape=input_shape, name="image")
    x = PixelNormalization("tf", name="normalization")(inputs)
    x = layers.ZeroPadding2D(fixed_padding(3, 1), name="entry_flow_conv1_1_pad")(x)
    x = layers.Conv2D(XCEPTION_STEM[0], 3, strides=2, use_bias=False,
                      kernel_initializer="he_normal", name="entry_flow_conv1_1")(x)  # fmt: skip
    x = layers.Activation("relu", name="entry_flow_conv1_1_relu")(bn("entry_flow_conv1_1_bn")(x))
    x = layers.Conv2D(XCEPTION_STEM[1], 3, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name="entry_flow_conv1_2")(x)  # fmt: skip
    x = layers.Activation("relu", name="entry_flow_conv1_2_relu")(bn("entry_flow_conv1_2_bn")(x))

    schedule = stage_strides([b.stride for b in XCEPTION_65_BLOCKS], output_stride, stem_stride=2)
    feature_info = []
    for block, stage in zip(XCEPTION_65_BLOCKS, schedule, strict=True):
        unit_rates = multi_grid if block is XCEPTION_65_BLOCKS[-1] else (1, 1, 1)
        residual = x
        for i, (depth, unit_rate) in enumerate(zip(block.depths, unit_rates, strict=True)):
            name = f"{block.name}_separable_conv{i + 1}"
            if not block.relu_inside:
                residual = layers.Activation("relu", name=f"{name}_relu")(residual)
            residual = AtrousSeparableConv2D(
                depth,
                3,
                rate=stage.rate_in * unit_rate,
                strides=stage.stride if i == 2 else 1,
                implementation=implementation,
                relu=block.relu_inside,
                name=name,
                **norm,
            )(residual)
            if name == XCEPTION_LOW_LEVEL:
                feature_info.append(FeatureInfo(name, depth, stage.reduction // stage.stride))
        if block.shortcut == "conv":
            shortcut = layers.Conv2D(block.depths[-1], 1, strides=stage.stride, use_bias=False,
                                     kernel_initializer="he_normal",
                                     name=f"{block.name}_shortcut")(x)  # fmt: skip
            shortcut = bn(f"{block.name}_shortcut_bn")(shortcut)
            x = layers.Add(name=f"{block.name}_out")([residual, shortcut])
        elif block.shortcut == "sum":
            x = layers.Add(name=f"{block.name}_out")([residual, x])
        else:
            x = layers.Identity(name=f"{block.name}_out")(residual)
        if not block.name.startswith("middle_flow") or block is MIDDLE_FLOW_LAST:
            feature_info.append(FeatureInfo(f"{block.name}_out", block.depths[-1], stage.reduction))

    model = keras.Model(inputs, x, name="xception65")
    model.feature_info = tuple(feature_info)
    return model
