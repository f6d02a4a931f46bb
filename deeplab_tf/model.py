"""``build_model``: a variant as a ``keras.Model`` from RGB pixels to per-pixel logits.

Contract: input [N, H, W, 3] RGB pixels in [0, 255] of any H, W (the backbone's
normalisation is inside the model); backbone -> head (v3 ASPP or none) -> 1x1
classifier ``logits`` at ceil(H / output_stride) -> bilinear upsampling to H x W.
The variables do not depend on the output stride, so weights trained at one
stride load unchanged into the model built at another (v3 paper section 4.1).
"""

from __future__ import annotations

import dataclasses
import os

import keras
from keras import layers

from deeplab_tf.backbones import build_backbone, check_output_stride
from deeplab_tf.layers import ASPP, ResizeBilinear
from deeplab_tf.variants import Variant, get_variant

# The fastest numerically equal atrous implementation on oneDNN CPUs
# (README, bench/atrous.py); all three give the same output and gradients.
DEFAULT_ATROUS_IMPLEMENTATION = "direct"


def build_model(
    variant: str | Variant,
    num_classes: int,
    output_stride: int | None = None,
    backbone_weights: str | os.PathLike | None = None,
    upsample_logits: bool = True,
    atrous_implementation: str = DEFAULT_ATROUS_IMPLEMENTATION,
    bn_momentum: float = 0.9997,
    sync_batchnorm: bool = False,
    aspp_dropout: float = 0.0,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
) -> keras.Model:
    """Builds a segmentation model.

    Args:
        variant: a name in ``VARIANTS`` or a ``Variant``.
        num_classes: number of classes (logit channels).
        output_stride: 8, 16 or 32; default: the variant's (training) stride.
        backbone_weights: ``None``, ``"imagenet"`` or a weights file path (see
            ``deeplab_tf.backbones.load_backbone_weights``).
        upsample_logits: return logits at the input size (True) or at
            ceil(input / output_stride) (False).
        atrous_implementation: ``"dilated"``, ``"space_to_batch"`` or ``"direct"``.
        bn_momentum: batch norm decay (0.9997 in the v3 paper).
        sync_batchnorm: synchronise batch statistics across replicas.
        aspp_dropout: dropout after the ASPP projection.
        input_shape: (H, W, 3); None for any size.

    Example:
        >>> model = build_model("deeplabv3-mobilenetv2", num_classes=21)
        >>> model(np.zeros((1, 513, 513, 3))).shape
        TensorShape([1, 513, 513, 21])
    """
    if isinstance(variant, str):
        variant = get_variant(variant)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    output_stride = variant.output_stride if output_stride is None else output_stride
    check_output_stride(output_stride)
    variant = dataclasses.replace(variant, output_stride=output_stride)

    inputs = keras.Input(shape=input_shape, name="image")
    backbone = build_backbone(
        variant.backbone,
        output_stride=output_stride,
        multi_grid=variant.multi_grid,
        cascade_blocks=variant.cascade_blocks,
        alpha=variant.alpha,
        implementation=atrous_implementation,
        bn_momentum=bn_momentum,
        sync_batchnorm=sync_batchnorm,
        input_shape=input_shape,
        weights=backbone_weights,
    )
    x = backbone(inputs)
    if variant.head == "aspp":
        x = ASPP(
            filters=variant.head_filters,
            rates=variant.aspp_rates_at(output_stride),
            image_pooling=variant.image_pooling,
            dropout=aspp_dropout,
            implementation=atrous_implementation,
            bn_momentum=bn_momentum,
            sync_batchnorm=sync_batchnorm,
            name="aspp",
        )(x)
    logits = layers.Conv2D(num_classes, 1, name="logits")(x)
    if upsample_logits:
        logits = ResizeBilinear(name="upsample")([logits, inputs])
    return keras.Model(inputs, logits, name=variant.name)


def describe_model(
    variant: str | Variant,
    num_classes: int,
    output_stride: int | None = None,
    input_size: tuple[int, int] = (513, 513),
) -> str:
    """A readable report of a variant: its settings, paper, layers, parameters and
    the logits' size for one ``input_size`` image (built and run on zeros)."""
    if isinstance(variant, str):
        variant = get_variant(variant)
    model = build_model(variant, num_classes, output_stride=output_stride, upsample_logits=False)
    lines = [f"{model.name}: {variant.paper}"]
    for field in dataclasses.fields(variant):
        if field.name not in ("name", "paper"):
            lines.append(f"  {field.name}: {getattr(variant, field.name)}")
    model.summary(print_fn=lambda line, **_: lines.append(line))
    logits = model(keras.ops.zeros((1, *input_size, 3)), training=False)
    stride = output_stride or variant.output_stride
    lines.append(
        f"input {input_size[0]}x{input_size[1]} -> logits {logits.shape[1]}x{logits.shape[2]}"
        f"x{logits.shape[3]} at output stride {stride} (upsampled to the input size in the model)"
    )
    return "\n".join(lines)
