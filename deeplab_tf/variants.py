"""Named model configurations, as data, each with its paper section and reference mIoU."""

from __future__ import annotations

from dataclasses import dataclass

from deeplab_tf.backbones import BACKBONES, check_output_stride
from deeplab_tf.backbones.resnet import MAX_CASCADE_BLOCKS
from deeplab_tf.registry import lookup, make_registry

HEADS = ("aspp", "none")


@dataclass(frozen=True)
class Variant:
    """One architecture of the papers.

    Attributes:
        name: registry key (``python train.py --variant NAME``).
        backbone: one of ``deeplab_tf.backbones.BACKBONES``.
        output_stride: training output stride (8, 16 or 32).
        multi_grid: unit rates of block4 and the cascaded blocks (ResNet only).
        cascade_blocks: copies of block4 after it (3 = block7).
        head: ``"aspp"`` (v3 ASPP, then the classifier) or ``"none"`` (the 1x1
            classifier straight on the backbone features, as the cascaded model).
        aspp_rates: ASPP rates at output stride 16; scaled by 16 / output_stride.
        image_pooling: image-level features in the ASPP.
        head_filters: width of the ASPP branches.
        alpha: MobileNetV2 width multiplier.
        paper: where the configuration comes from.
        reference_miou: (setting, VOC 2012 val mIoU) pairs reported by the paper.
    """

    name: str
    backbone: str
    paper: str
    output_stride: int = 16
    multi_grid: tuple[int, ...] = (1, 1, 1)
    cascade_blocks: int = 0
    head: str = "aspp"
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    image_pooling: bool = True
    head_filters: int = 256
    alpha: float = 1.0
    reference_miou: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {self.head!r}")
        check_output_stride(self.output_stride)
        if self.cascade_blocks not in range(MAX_CASCADE_BLOCKS + 1):
            raise ValueError(f"cascade_blocks must be in 0..{MAX_CASCADE_BLOCKS}")

    def aspp_rates_at(self, output_stride: int) -> tuple[int, ...]:
        """ASPP rates at ``output_stride``: doubled at 8, halved at 32 (v3 paper 3.3)."""
        check_output_stride(output_stride)
        return tuple(max(1, round(rate * 16 / output_stride)) for rate in self.aspp_rates)


VARIANTS: dict[str, Variant] = make_registry(
    "variant",
    Variant(
        name="deeplabv3",
        backbone="resnet101",
        multi_grid=(1, 2, 4),
        paper="DeepLab v3, section 4.2, Tables 5-6 (ResNet-101, ASPP + image pooling)",
        reference_miou=(("OS16", 77.21), ("OS8 eval, MS + flip", 79.77)),
    ),
    Variant(
        name="deeplabv3-resnet50",
        backbone="resnet50",
        multi_grid=(1, 2, 4),
        paper="DeepLab v3, section 4.2 with the ResNet-50 of section 4.1 (no paper figure)",
    ),
    Variant(
        name="deeplabv3-cascade",
        backbone="resnet101",
        multi_grid=(1, 2, 1),
        cascade_blocks=3,
        head="none",
        paper="DeepLab v3, section 4.1, Tables 3-4 (ResNet-101, block7, MG (1, 2, 1))",
        reference_miou=(("OS8 eval, MS + flip", 79.35),),
    ),
    Variant(
        name="deeplabv3-mobilenetv2",
        backbone="mobilenetv2",
        paper="DeepLab v3 head on MobileNetV2 (Sandler et al. 2018, section 6.3; no v3 figure)",
    ),
    # The quickstart model (``make quickstart``, recipe shapes-cpu): MobileNetV2 at half
    # width, a narrow ASPP and rates scaled to 96-pixel images (at output stride 8 the
    # features are 12x12, where the paper's rates 12/24/36 would see only padding).
    Variant(
        name="deeplabv3-mobilenetv2-cpu",
        backbone="mobilenetv2",
        output_stride=8,
        alpha=0.5,
        head_filters=64,
        aspp_rates=(1, 2, 3),
        paper="not a paper model: the v3 head on a half-width MobileNetV2 sized for a 2-core CPU",
    ),
)


def get_variant(name: str) -> Variant:
    """The registered variant ``name``; a ValueError lists the known ones."""
    return lookup(VARIANTS, "variant", name)
