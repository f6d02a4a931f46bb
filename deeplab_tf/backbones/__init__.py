"""Backbones: ResNet-50/101 and MobileNetV2 with output-stride control."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from deeplab_tf.backbones.features import FeatureInfo, feature_extractor
from deeplab_tf.backbones.mobilenet_v2 import build_mobilenet_v2
from deeplab_tf.backbones.output_stride import OUTPUT_STRIDES, check_output_stride
from deeplab_tf.backbones.resnet import RESNET_UNITS, build_resnet
from deeplab_tf.backbones.weights import (
    TransferReport,
    WeightsUnavailableError,
    load_backbone_weights,
    transfer_weights,
)

BACKBONES = (*RESNET_UNITS, "mobilenetv2")


def build_backbone(
    arch: str,
    output_stride: int = 16,
    multi_grid: Sequence[int] = (1, 1, 1),
    cascade_blocks: int = 0,
    alpha: float = 1.0,
    implementation: str = "dilated",
    bn_momentum: float = 0.9997,
    sync_batchnorm: bool = False,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    weights: str | None = None,
) -> keras.Model:
    """Builds a backbone by name and optionally fills it with ImageNet weights.

    ``multi_grid``, ``cascade_blocks`` and ``implementation`` apply to ResNets,
    ``alpha`` to MobileNetV2; see ``build_resnet`` and ``build_mobilenet_v2``.
    ``weights`` is as in ``load_backbone_weights``.
    """
    if arch in RESNET_UNITS:
        model = build_resnet(
            arch,
            output_stride=output_stride,
            multi_grid=multi_grid,
            cascade_blocks=cascade_blocks,
            implementation=implementation,
            bn_momentum=bn_momentum,
            sync_batchnorm=sync_batchnorm,
            input_shape=input_shape,
        )
    elif arch == "mobilenetv2":
        if cascade_blocks:
            raise ValueError("cascade_blocks applies to ResNet backbones only, not mobilenetv2")
        model = build_mobilenet_v2(
            alpha=alpha,
            output_stride=output_stride,
            bn_momentum=bn_momentum,
            sync_batchnorm=sync_batchnorm,
            input_shape=input_shape,
        )
    else:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {arch!r}")
    load_backbone_weights(model, arch, weights, alpha)
    return model


__all__ = [
    "BACKBONES",
    "OUTPUT_STRIDES",
    "FeatureInfo",
    "TransferReport",
    "WeightsUnavailableError",
    "build_backbone",
    "check_output_stride",
    "feature_extractor",
    "load_backbone_weights",
    "transfer_weights",
]
