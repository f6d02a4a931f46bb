"""Training protocols as data: a page of numbers from each paper.

A ``Recipe`` holds everything ``train.py`` needs besides the architecture; every
command-line flag overrides one field. ``default_recipe(variant, dataset)`` picks
the paper's protocol for a variant, or the CPU protocol of the built-in
``shapes`` dataset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deeplab_tf.registry import lookup, make_registry
from deeplab_tf.variants import get_variant

LR_POLICIES = ("poly", "step")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """One training protocol.

    Attributes:
        name: registry key (``train.py --recipe NAME``).
        paper: where the numbers come from.
        dataset, train_split, val_split: data (a spec name; splits of its TFRecords).
        crop_size: training crop (513 in v3; 321 in v1/v2).
        batch_size: global batch size.
        steps: training iterations.
        output_stride: training output stride.
        optimizer: ``"sgd"`` (momentum SGD, every paper) or ``"adam"`` (CPU recipes;
            no weight decay or classifier lr multiplier).
        learning_rate, lr_policy, lr_power: poly: lr (1 - step / steps) ^ power.
        lr_step_size, lr_step_gamma: step policy: lr * gamma ^ (step // step_size).
        momentum, weight_decay: SGD momentum; L2 on convolution kernels.
        classifier_lr_multiplier: learning-rate factor of the final classifier.
        bn_momentum, freeze_bn: batch norm decay; freeze (inference mode) in fine-tuning.
        min_scale, max_scale, scale_step: random scale augmentation.
        upsample_logits: v3: logits upsampled to the labels for the loss; v1/v2:
            labels subsampled to the logits.
        bootstrap_hard_classes: duplicate images with the dataset's hard classes (v3).
        train_only_new_layers: second stage of a two-stage protocol: start from
            ``--init-checkpoint`` and train only the layers the variant adds to it
            (``deeplab_tf.model.added_layer_names``: DeepLab-MSc's MLPs, the Yu-Koltun
            context module); the rest is frozen (and its dropout off).
        checkpoint_every: steps between backups, logs and validations.
    """

    name: str
    paper: str
    dataset: str
    train_split: str
    val_split: str
    crop_size: int
    batch_size: int
    steps: int
    output_stride: int
    learning_rate: float
    optimizer: str = "sgd"
    lr_policy: str = "poly"
    lr_power: float = 0.9
    lr_step_size: int = 2000
    lr_step_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    classifier_lr_multiplier: float = 1.0
    bn_momentum: float = 0.9997
    freeze_bn: bool = False
    min_scale: float = 0.5
    max_scale: float = 2.0
    scale_step: float = 0.25
    upsample_logits: bool = True
    bootstrap_hard_classes: bool = False
    train_only_new_layers: bool = False
    checkpoint_every: int = 1000

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_policy not in LR_POLICIES:
            raise ValueError(
                f"lr_policy must be one of {list(LR_POLICIES)}, got {self.lr_policy!r}"
            )


RECIPES: dict[str, Recipe] = make_registry(
    "recipe",
    # v3 section 4.1: trainaug, OS16, batch 16, 513 crops, poly from 0.007, 30K steps,
    # BN decay 0.9997 trained; random scale 0.5..2.0 and flips.
    Recipe(
        name="v3-voc-trainaug",
        paper="DeepLab v3, section 4.1 (training protocol), stage 1",
        dataset="pascal_voc_2012",
        train_split="train_aug",
        val_split="val",
        crop_size=513,
        batch_size=16,
        steps=30_000,
        output_stride=16,
        learning_rate=0.007,
    ),
    # v3 section 4.2 (test set): freeze BN, OS8, trainval, lr 0.001, 30K more steps,
    # images with hard classes duplicated (bootstrapping).
    Recipe(
        name="v3-voc-trainval-os8",
        paper="DeepLab v3, sections 4.1-4.2, stage 2 (start from stage 1 with --init-checkpoint)",
        dataset="pascal_voc_2012",
        train_split="trainval",
        val_split="val",
        crop_size=513,
        batch_size=16,
        steps=30_000,
        output_stride=8,
        learning_rate=0.001,
        freeze_bn=True,
        bootstrap_hard_classes=True,
    ),
    # The built-in dataset on a 2-core CPU (``make quickstart``, variant
    # deeplabv3-resnet10-cpu): whole 96x96 images at output stride 8 (at 16 the 6x6
    # logits cap the mean IoU of even perfect features near 0.8), Adam from scratch,
    # batch norm decay short enough for the moving statistics to follow. No random
    # scaling: the generator already draws object sizes from 16 to 48 pixels, and
    # crops of enlarged images would cut the large objects whose shape is the cue.
    Recipe(
        name="shapes-cpu",
        paper="not a paper protocol: the v3 protocol scaled to the built-in shapes dataset",
        dataset="shapes",
        train_split="train",
        val_split="val",
        crop_size=96,
        batch_size=16,
        steps=2700,
        output_stride=8,
        optimizer="adam",
        learning_rate=0.002,
        weight_decay=0.0,  # Adam here takes none
        bn_momentum=0.9,
        min_scale=1.0,
        max_scale=1.0,
        checkpoint_every=900,
    ),
)

# The v1/v2 protocol (v1 section 5, v2 section 4): SGD momentum 0.9, weight decay 5e-4,
# lr 0.001 with 10x on the classifier, 321x321 crops, labels subsampled to the logits
# (output stride 8). v1 (and every v1 variant): batch 20, lr x0.1 every 2000 steps, 6000
# steps (v2 Table 2, "step": 62.25 for LargeFOV), no random scaling.
_V1 = dict(
    dataset="pascal_voc_2012",
    train_split="train_aug",
    val_split="val",
    crop_size=321,
    batch_size=20,
    steps=6000,
    output_stride=8,
    learning_rate=0.001,
    lr_policy="step",
    lr_step_size=2000,
    lr_step_gamma=0.1,
    weight_decay=5e-4,
    classifier_lr_multiplier=10.0,
    min_scale=1.0,
    max_scale=1.0,
    upsample_logits=False,
)
# v2 section 4.1.2: "poly" (power 0.9), batch 10, 20K steps (Table 2: 65.88 for LargeFOV).
_V2 = dict(_V1, batch_size=10, steps=20_000, lr_policy="poly")
# Yu-Koltun section 4: SGD, batch 14, lr 1e-3, momentum 0.9, 60K steps on VOC train_aug;
# weight decay 5e-4 and the lr policy (x0.1 every 100K steps, so constant here) are those
# of the released code (fyu/dilation train.py). Crops of 512 give the paper's 64x64
# front-end outputs. The loss is on the logits upsampled inside the model (the released
# code's --up): their pixel j covers image pixels 8j..8j+7, which the corner-aligned
# label subsampling of v1/v2 would shift by 3.5 pixels.
_YU_KOLTUN = dict(
    dataset="pascal_voc_2012",
    train_split="train_aug",
    val_split="val",
    crop_size=512,
    batch_size=14,
    steps=60_000,
    output_stride=8,
    learning_rate=0.001,
    lr_policy="step",
    lr_step_size=100_000,
    weight_decay=5e-4,
    min_scale=1.0,
    max_scale=1.0,
)

# The v1/v2 and Yu-Koltun protocols, added to the table above (make_registry refuses a
# name declared twice).
RECIPES = make_registry(
    "recipe",
    *RECIPES.values(),
    Recipe(
        name="v1-voc-step",
        paper="DeepLab v1, section 5 (training); v2 section 4.1.1 and Table 2 (step policy)",
        **_V1,
    ),
    # v1 section 4.3: "We only adjust the newly added weights, keeping the other
    # network parameters to the values learned by the method of Section 3."
    Recipe(
        name="v1-voc-msc",
        paper="DeepLab v1, section 4.3: MSc weights only, from a deeplabv1-largefov run "
        "(--init-checkpoint)",
        train_only_new_layers=True,
        **_V1,
    ),
    Recipe(
        name="v2-voc-poly",
        paper="DeepLab v2, section 4.1.2 (poly policy, batch 10, 20K steps; VGG-16)",
        **_V2,
    ),
    # ResNet-101 (v2 Table 4): random scaling 0.5..1.5 ("Aug"); batch norm kept fixed,
    # as v1/v2 did (v3 appendix A lists fine-tuning it as a v3 change).
    Recipe(
        name="v2-voc-resnet101",
        paper="DeepLab v2, section 4.1.2 and Table 4 (ResNet-101: random scale 0.5-1.5, "
        "batch norm frozen)",
        **dict(_V2, min_scale=0.5, max_scale=1.5, freeze_bn=True),
    ),
    Recipe(
        name="yu-koltun-frontend",
        paper="Yu & Koltun 2016, section 4 (front end: batch 14, lr 1e-3, momentum 0.9, 60K)",
        **_YU_KOLTUN,
    ),
    # Section 5: the context module is trained on the front end's outputs (front end
    # frozen), lr 1e-3; the number of steps is not given (60K as the front end).
    Recipe(
        name="yu-koltun-context",
        paper="Yu & Koltun 2016, section 5: context module only, on a dilation-frontend "
        "run (--init-checkpoint)",
        train_only_new_layers=True,
        **_YU_KOLTUN,
    ),
)

# The paper protocol of each variant.
_VARIANT_RECIPES = {
    "deeplabv3": "v3-voc-trainaug",
    "deeplabv3-resnet50": "v3-voc-trainaug",
    "deeplabv3-cascade": "v3-voc-trainaug",
    "deeplabv3-mobilenetv2": "v3-voc-trainaug",
    "deeplabv1": "v1-voc-step",
    "deeplabv1-7x7": "v1-voc-step",
    "deeplabv1-4x4-r8": "v1-voc-step",
    "deeplabv1-largefov": "v1-voc-step",
    "deeplabv1-msc-largefov": "v1-voc-msc",
    "deeplabv2-vgg16-aspp-s": "v2-voc-poly",
    "deeplabv2-vgg16-aspp-l": "v2-voc-poly",
    "deeplabv2-resnet101-largefov": "v2-voc-resnet101",
    "deeplabv2-resnet101-aspp-l": "v2-voc-resnet101",
    "deeplabv2-resnet101-msc-aspp-l": "v2-voc-resnet101",
    "dilation-frontend": "yu-koltun-frontend",
    "dilation-context-basic": "yu-koltun-context",
    "dilation-context-large": "yu-koltun-context",
}


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``; a ValueError lists the known ones."""
    return lookup(RECIPES, "recipe", name)


def default_recipe(variant: str, dataset: str | None) -> Recipe:
    """The shapes CPU recipe when no dataset (or ``shapes``) is given, else the
    paper protocol of ``variant``. A second-stage variant (DeepLab-MSc, Yu-Koltun
    context) keeps its stage on shapes too: only its new layers train."""
    get_variant(variant)
    paper = RECIPES[_VARIANT_RECIPES.get(variant, "v3-voc-trainaug")]
    if dataset in (None, "shapes"):
        shapes = RECIPES["shapes-cpu"]
        if paper.train_only_new_layers:
            return dataclasses.replace(shapes, train_only_new_layers=True)
        return shapes
    return paper
