"""Named model configurations, as data, each with its paper section and reference mIoU."""

from __future__ import annotations

from dataclasses import dataclass

from deeplab_tf.backbones import BACKBONES, check_output_stride
from deeplab_tf.backbones.resnet import MAX_CASCADE_BLOCKS
from deeplab_tf.backbones.vgg import VGG_BACKBONES
from deeplab_tf.layers import CONTEXT_WIDTHS
from deeplab_tf.registry import changed, lookup, make_registry

# aspp: v3 ASPP then a 1x1 classifier; none: the classifier alone; vgg_fc: VGG's fc6 ->
# fc7 -> classifier, one branch per rate, summed (v1; v2 ASPP on VGG-16); atrous_logits:
# 3x3 atrous convolutions straight to the classes, summed (v2 LargeFOV/ASPP on ResNet-101).
HEADS = ("aspp", "none", "vgg_fc", "atrous_logits")
CONTEXT_MODULES = ("none", *CONTEXT_WIDTHS)


@dataclass(frozen=True)
class Variant:
    """One architecture of the papers.

    Attributes:
        name: registry key (``python train.py --variant NAME``).
        backbone: one of ``deeplab_tf.backbones.BACKBONES``.
        output_stride: training output stride (8, 16 or 32).
        multi_grid: unit rates of block4 and the cascaded blocks (ResNet only).
        cascade_blocks: copies of block4 after it (3 = block7).
        head: ``"aspp"`` (v3 ASPP, then the classifier), ``"none"`` (the 1x1
            classifier straight on the backbone features, as the cascaded model),
            ``"vgg_fc"`` (VGG-16's fc6 -> fc7 -> 1x1 classifier branches, one per rate
            of ``head_rates``, logits summed: v1 with one, v2 ASPP with four) or
            ``"atrous_logits"`` (one ``head_kernel_size`` convolution to the classes
            per rate, summed: v2 on ResNet-101, LargeFOV with one rate, ASPP with four).
        aspp_rates: ASPP rates at output stride 16; scaled by 16 / output_stride.
        image_pooling: image-level features in the ASPP.
        head_filters: width of the ASPP branches (v3) or of fc6/fc7 (``vgg_fc``:
            4096, or 1024 for LargeFOV and ASPP).
        head_kernel_size: kernel of fc6 (``vgg_fc``: 7, 4 or 3) or of the atrous
            classifiers (``atrous_logits``).
        head_rates: the ``vgg_fc``/``atrous_logits`` rates at output stride 8 (v1/v2
            and Yu-Koltun train at 8 only); scaled by 8 / output_stride.
        multiscale_features: DeepLab-MSc (v1 section 4.3): two-layer MLPs on the
            image and pool1..pool4, 640 channels, classified and added to the logits.
        input_scales: multi-scale inputs (v2 MSC): the network runs with shared
            weights at each scale (the first is 1) and the logits are max-fused.
        context_module: Yu-Koltun ``"basic"`` or ``"large"`` context module on the
            front end's logits, or ``"none"``.
        alpha: MobileNetV2 width multiplier.
        decoder: the v3+ decoder (v3+ section 3.1) on the ASPP and the backbone's
            stride-4 features; the logits are then at stride 4. Its 3x3 convolutions
            are ``head_filters`` wide.
        decoder_low_level_filters: channels of the low-level projection (48, v3+
            Table 1).
        separable: the ASPP's and the decoder's 3x3 convolutions as atrous separable
            convolutions (v3+ sections 3.1-3.2, its Xception model).
        paper: where the configuration comes from.
        reference_miou: (setting, mIoU) pairs reported by the paper (or its code's model
            zoo): on PASCAL VOC 2012 val unless the setting names Cityscapes val.
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
    head_kernel_size: int = 3
    head_rates: tuple[int, ...] = ()
    multiscale_features: bool = False
    input_scales: tuple[float, ...] = ()
    context_module: str = "none"
    alpha: float = 1.0
    decoder: bool = False
    decoder_low_level_filters: int = 48
    separable: bool = False
    reference_miou: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {self.head!r}")
        check_output_stride(self.output_stride)
        if self.cascade_blocks not in range(MAX_CASCADE_BLOCKS + 1):
            raise ValueError(f"cascade_blocks must be in 0..{MAX_CASCADE_BLOCKS}")
        vgg = self.backbone in VGG_BACKBONES
        if vgg != (self.head == "vgg_fc"):
            raise ValueError(f"head 'vgg_fc' goes with the backbones {list(VGG_BACKBONES)} only")
        if self.head in ("vgg_fc", "atrous_logits") and not self.head_rates:
            raise ValueError(f"head {self.head!r} needs head_rates (one rate per branch)")
        if self.multiscale_features and self.backbone != "vgg16":
            raise ValueError("multiscale_features (DeepLab-MSc) needs the vgg16 backbone")
        if self.context_module not in CONTEXT_MODULES:
            raise ValueError(
                f"context_module must be one of {list(CONTEXT_MODULES)}, "
                f"got {self.context_module!r}"
            )
        if self.context_module != "none" and self.backbone != "vgg16_frontend":
            raise ValueError("a context module needs the vgg16_frontend backbone (Yu-Koltun)")
        if (self.decoder or self.separable) and self.head != "aspp":
            raise ValueError("decoder and separable go with the 'aspp' head (DeepLabv3+)")
        if self.input_scales and (
            self.input_scales[0] != 1.0 or not all(s > 0 for s in self.input_scales)
        ):
            raise ValueError(
                f"input_scales must be positive and start with 1.0, got {self.input_scales!r}"
            )

    def aspp_rates_at(self, output_stride: int) -> tuple[int, ...]:
        """ASPP rates at ``output_stride``: doubled at 8, halved at 32 (v3 paper 3.3)."""
        check_output_stride(output_stride)
        return tuple(max(1, round(rate * 16 / output_stride)) for rate in self.aspp_rates)

    def head_rates_at(self, output_stride: int) -> tuple[int, ...]:
        """``head_rates`` (given at output stride 8) at ``output_stride``."""
        check_output_stride(output_stride)
        return tuple(max(1, round(rate * 8 / output_stride)) for rate in self.head_rates)


# DeepLab v3 (section 4.2, Tables 5-6): ResNet-101, multi-grid (1, 2, 4), ASPP + image
# pooling at output stride 16.
_DEEPLABV3 = Variant(
    name="deeplabv3",
    backbone="resnet101",
    multi_grid=(1, 2, 4),
    paper="DeepLab v3, section 4.2, Tables 5-6 (ResNet-101, ASPP + image pooling)",
    reference_miou=(("OS16", 77.21), ("OS8 eval, MS + flip", 79.77)),
)
_DEEPLABV3PLUS = changed(
    _DEEPLABV3,
    "deeplabv3plus",
    "DeepLabv3+, sections 3.1 and 4.2-4.3 (ResNet-101 encoder as v3, decoder: 48-channel "
    "stride-4 projection, two 3x3 convolutions of 256)",
    decoder=True,
)
# The quickstart model (``make quickstart``, recipe shapes-cpu): the v3 head, narrow and
# with rates scaled to 96-pixel images (at output stride 8 the features are 12x12, where
# the paper's rates 12/24/36 would see only padding), on a small basic-block ResNet that
# a 2-core CPU trains from scratch in minutes.
_V3_CPU = Variant(
    name="deeplabv3-resnet10-cpu",
    backbone="resnet10_cpu",
    output_stride=8,
    head_filters=64,
    aspp_rates=(1, 2, 3),
    paper="not a paper model: the v3 head on a ResNet-10 sized for a 2-core CPU",
)
# DeepLab v1 (ICLR 2015): VGG-16 at output stride 8 with the fc6 configurations of Table
# 2 (v2 paper Table 1 gives the same with before/after-CRF val figures).
_DEEPLABV1 = Variant(
    name="deeplabv1",
    backbone="vgg16",
    output_stride=8,
    head="vgg_fc",
    head_kernel_size=4,
    head_rates=(4,),
    head_filters=4096,
    paper="DeepLab v1, sections 3.1-3.2, Table 2 (DeepLab(-CRF): fc6 4x4, input stride 4)",
    reference_miou=(("before CRF", 59.80), ("after CRF", 63.74)),
)
_LARGEFOV = changed(
    _DEEPLABV1,
    "deeplabv1-largefov",
    "DeepLab v1, section 5, Table 2 (DeepLab-LargeFOV: fc6 3x3, rate 12, 1024 filters)",
    head_kernel_size=3,
    head_rates=(12,),
    head_filters=1024,
    reference_miou=(("before CRF", 62.25), ("after CRF", 67.64)),
)
# DeepLab v2 (TPAMI 2017) on ResNet-101 (section 4.1.2, Table 4), at output stride 8:
# 3x3 atrous convolutions straight to the classes, one per rate, summed.
_V2_RESNET_LARGEFOV = Variant(
    name="deeplabv2-resnet101-largefov",
    backbone="resnet101",
    output_stride=8,
    head="atrous_logits",
    head_rates=(12,),
    paper="DeepLab v2, section 4.1.2, Table 4 (ResNet-101 + LargeFOV: one 3x3 rate-12 "
    "convolution to the classes; the paper's figures include MSC)",
)
_V2_RESNET_ASPP_L = changed(
    _V2_RESNET_LARGEFOV,
    "deeplabv2-resnet101-aspp-l",
    "DeepLab v2, section 4.1.2, Table 4 (ResNet-101 + ASPP-L: 3x3 convolutions to the "
    "classes, rates 6/12/18/24, summed; the paper's figures include MSC)",
    head_rates=(6, 12, 18, 24),
)
# Yu & Koltun (ICLR 2016): the front end (section 4) and the context modules (section 3),
# trained on the frozen front end (section 5, recipe yu-koltun-context). Their figures
# come from front ends trained on VOC + COCO (section 5, Table 3).
_FRONTEND = Variant(
    name="dilation-frontend",
    backbone="vgg16_frontend",
    output_stride=8,
    head="vgg_fc",
    head_kernel_size=7,
    head_rates=(4,),
    head_filters=4096,
    paper="Yu & Koltun 2016, section 4 (front end: VGG-16 without pool4/pool5, no padding)",
    reference_miou=(("VOC + COCO training", 69.8),),
)

# One row per paper configuration; a derived row says what it changes of its base.
VARIANTS: dict[str, Variant] = make_registry(
    "variant",
    _DEEPLABV3,
    changed(
        _DEEPLABV3,
        "deeplabv3-resnet50",
        "DeepLab v3, section 4.2 with the ResNet-50 of section 4.1 (no paper figure)",
        backbone="resnet50",
    ),
    changed(
        _DEEPLABV3,
        "deeplabv3-cascade",
        "DeepLab v3, section 4.1, Tables 3-4 (ResNet-101, block7, MG (1, 2, 1))",
        multi_grid=(1, 2, 1),
        cascade_blocks=3,
        head="none",
        reference_miou=(("OS8 eval, MS + flip", 79.35),),
    ),
    Variant(
        name="deeplabv3-mobilenetv2",
        backbone="mobilenetv2",
        paper="DeepLab v3 head on MobileNetV2 (Sandler et al. 2018, section 6.3; no v3 figure)",
    ),
    _V3_CPU,
    # The same head on a half-width MobileNetV2 (for mobile export; on a 2-core CPU it
    # trains slower per image and learns less per step than deeplabv3-resnet10-cpu).
    changed(
        _V3_CPU,
        "deeplabv3-mobilenetv2-cpu",
        "not a paper model: the v3 head on a half-width MobileNetV2 sized for a 2-core CPU",
        backbone="mobilenetv2",
        alpha=0.5,
    ),
    # DeepLabv3+ (ECCV 2018): the v3 network as the encoder, the decoder at stride 4
    # (section 3.1), trained with v3's protocol (section 4).
    _DEEPLABV3PLUS,
    changed(
        _DEEPLABV3PLUS,
        "deeplabv3plus-resnet50",
        "DeepLabv3+, section 3.1 on the ResNet-50 of v3 section 4.1 (no paper figure)",
        backbone="resnet50",
    ),
    # The paper's flagship (section 3.2 and 4.3-4.4): aligned Xception-65, separable
    # ASPP and decoder. Figures of the TF1 model zoo (g3doc/model_zoo.md,
    # xception_coco_voc_trainaug: COCO-pretrained, VOC train_aug).
    changed(
        _DEEPLABV3PLUS,
        "deeplabv3plus-xception65",
        "DeepLabv3+, sections 3.1-3.2 (aligned Xception-65, atrous separable ASPP and "
        "decoder); TF1 model zoo xception_coco_voc_trainaug, xception_cityscapes_trainfine",
        backbone="xception65",
        multi_grid=(1, 1, 1),
        separable=True,
        reference_miou=(
            ("OS16, COCO + VOC train_aug (TF1 zoo)", 82.20),
            ("OS8 eval, MS + flip (TF1 zoo)", 83.58),
            # ImageNet-pretrained, Cityscapes train fine; MS scales 0.75, 1.0, 1.25.
            ("Cityscapes val, OS16 (TF1 zoo)", 78.79),
            ("Cityscapes val, OS8 eval, MS 0.75-1.25 + flip (TF1 zoo)", 80.42),
        ),
    ),
    # As the TF1 model zoo builds DeepLab on MobileNetV2 (g3doc/model_zoo.md,
    # mobilenetv2_coco_voc_trainaug): "MobileNet-v2 based models do not employ ASPP and
    # decoder modules for fast computation": image pooling and a 1x1 branch only, no
    # decoder. Kept under the zoo's DeepLabv3+ release; deeplabv3-mobilenetv2 has the
    # full ASPP, and a decoder on its block_2_add would be a variant of one line.
    Variant(
        name="deeplabv3plus-mobilenetv2",
        backbone="mobilenetv2",
        aspp_rates=(),
        paper="DeepLabv3+ release, TF1 model zoo mobilenetv2_coco_voc_trainaug and "
        "mobilenetv2_coco_cityscapes_trainfine (MobileNetV2, image pooling + 1x1, no atrous "
        "branches, no decoder)",
        reference_miou=(
            ("OS16, COCO + VOC train_aug (TF1 zoo)", 75.32),
            ("OS8 eval, MS + flip (TF1 zoo)", 77.33),
            ("Cityscapes val, OS16, COCO-pretrained (TF1 zoo)", 70.71),
            ("Cityscapes val, OS8 eval, MS 0.75-1.25 + flip (TF1 zoo)", 73.57),
        ),
    ),
    # The quickstart model with the decoder (the paper's claim on the shapes data: the
    # decoder sharpens boundaries); the low-level projection scaled as the head,
    # 48 x 64 / 256 = 12 channels.
    changed(
        _V3_CPU,
        "deeplabv3plus-resnet10-cpu",
        "not a paper model: deeplabv3-resnet10-cpu with the v3+ decoder at stride 4",
        decoder=True,
        decoder_low_level_filters=12,
    ),
    _DEEPLABV1,
    changed(
        _DEEPLABV1,
        "deeplabv1-7x7",
        "DeepLab v1, section 5, Table 2 (DeepLab-CRF-7x7: fc6 7x7, input stride 4)",
        head_kernel_size=7,
        reference_miou=(("before CRF", 64.38), ("after CRF", 67.64)),
    ),
    changed(
        _DEEPLABV1,
        "deeplabv1-4x4-r8",
        "DeepLab v1, section 5, Table 2 (DeepLab-CRF-4x4: fc6 4x4, input stride 8)",
        head_rates=(8,),
        reference_miou=(("before CRF (v2 Table 1)", 63.41), ("after CRF", 67.14)),
    ),
    _LARGEFOV,
    # Trained from a deeplabv1-largefov run, only the MSc weights (recipe v1-voc-msc).
    changed(
        _LARGEFOV,
        "deeplabv1-msc-largefov",
        "DeepLab v1, sections 4.3 and 5, Table 1 (DeepLab-MSc-LargeFOV)",
        multiscale_features=True,
        reference_miou=(("before CRF", 64.21), ("after CRF", 68.70)),
    ),
    # DeepLab v2 ASPP on VGG-16 (section 4.1.2, Table 3): LargeFOV's fc6-fc7-fc8 as one
    # branch per rate.
    changed(
        _LARGEFOV,
        "deeplabv2-vgg16-aspp-s",
        "DeepLab v2, section 4.1.2, Table 3 (ASPP-S: fc6-fc7-fc8 branches, rates 2/4/8/12)",
        head_rates=(2, 4, 8, 12),
        reference_miou=(("before CRF", 66.98), ("after CRF", 69.73)),
    ),
    changed(
        _LARGEFOV,
        "deeplabv2-vgg16-aspp-l",
        "DeepLab v2, section 4.1.2, Table 3 (ASPP-L: fc6-fc7-fc8 branches, rates 6/12/18/24)",
        head_rates=(6, 12, 18, 24),
        reference_miou=(("before CRF", 68.96), ("after CRF", 71.57)),
    ),
    _V2_RESNET_LARGEFOV,
    _V2_RESNET_ASPP_L,
    changed(
        _V2_RESNET_ASPP_L,
        "deeplabv2-resnet101-msc-aspp-l",
        "DeepLab v2, sections 3.2 and 4.1.2, Table 4 (ResNet-101, MSC with max fusion, ASPP-L)",
        input_scales=(1.0, 0.75, 0.5),
        reference_miou=(("MSC + COCO + aug", 75.54), ("MSC + COCO + aug + CRF", 77.69)),
    ),
    _FRONTEND,
    changed(
        _FRONTEND,
        "dilation-context-basic",
        "Yu & Koltun 2016, sections 3 and 5, Tables 1 and 3 (front end + Basic context)",
        context_module="basic",
        reference_miou=(("VOC + COCO training", 71.3),),
    ),
    changed(
        _FRONTEND,
        "dilation-context-large",
        "Yu & Koltun 2016, sections 3 and 5, Tables 1 and 3 (front end + Large context)",
        context_module="large",
        reference_miou=(("VOC + COCO training", 72.1),),
    ),
)


def get_variant(name: str) -> Variant:
    """The registered variant ``name``; a ValueError lists the known ones."""
    return lookup(VARIANTS, "variant", name)
