"""Backbones: ResNet-50/101, MobileNetV2, aligned Xception-65 and the small resnet10_cpu
with output-stride control; VGG-16 (v1/v2, Yu-Koltun)."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from deeplab_tf.backbones.features import FeatureInfo, feature_extractor
from deeplab_tf.backbones.mobilenet_v2 import build_mobilenet_v2
from deeplab_tf.backbones.output_stride import OUTPUT_STRIDES, check_output_stride
from deeplab_tf.backbones.resnet import RESNET_UNITS, build_resnet, build_resnet10_cpu
from deeplab_tf.backbones.vgg import VGG_BACKBONES, build_vgg16, build_vgg16_frontend
from deeplab_tf.backbones.weights import (
    TransferReport,
    WeightsUnavailableError,
    check_weights,
    load_backbone_weights,
    transfer_weights,
    weights_source,
)
from deeplab_tf.backbones.xception import build_xception65

BACKBONES = (*RESNET_UNITS, "mobilenetv2", "resnet10_cpu", "xception65", *VGG_BACKBONES)


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
    msc_taps: bool = False,
) -> keras.Model:
    """Builds a backbone by name and optionally fills it with ImageNet weights.

    ``multi_grid``, ``cascade_blocks`` and ``implementation`` apply to ResNets
    (``multi_grid`` and ``implementation`` to Xception-65 too),
    ``alpha`` to MobileNetV2, ``msc_taps`` to ``vgg16``; see ``build_resnet``,
    ``build_mobilenet_v2``, ``build_resnet10_cpu``, ``build_vgg16`` and
    ``build_vgg16_frontend`` (resnet10_cpu and VGG-16: ``implementation`` too).
    ``weights`` is as in ``load_backbone_weights``; for VGG it fills the convolutions
    (``vgg.load_vgg16_weights`` also fills fc6/fc7).
    """
    if arch not in BACKBONES:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {arch!r}")
    if msc_taps and arch != "vgg16":
        raise ValueError(f"msc_taps (DeepLab-MSc) applies to vgg16 only, not {arch}")
    if cascade_blocks and arch not in RESNET_UNITS:
        raise ValueError(f"cascade_blocks applies to ResNet backbones only, not {arch}")
    check_weights(arch, weights)
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
        model = build_mobilenet_v2(
            alpha=alpha,
            output_stride=output_stride,
            bn_momentum=bn_momentum,
            sync_batchnorm=sync_batchnorm,
            input_shape=input_shape,
        )
    elif arch == "resnet10_cpu":
        model = build_resnet10_cpu(
            output_stride=output_stride,
            implementation=implementation,
            bn_momentum=bn_momentum,
            sync_batchnorm=sync_batchnorm,
            input_shape=input_shape,
        )
    elif arch == "xception65":
        model = build_xception65(
            output_stride=output_stride,
            multi_grid=multi_grid,
            implementation=implementation,
            bn_momentum=bn_momentum,
            sync_batchnorm=sync_batchnorm,
            input_shape=input_shape,
        )
    elif arch == "vgg16":
        model = build_vgg16(output_stride, implementation, input_shape, msc_taps=msc_taps)
    else:
        model = build_vgg16_frontend(output_stride, implementation, input_shape)
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
    "check_weights",
    "feature_extractor",
    "load_backbone_weights",
    "transfer_weights",
    "weights_source",
]
