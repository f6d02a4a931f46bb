"""Training protocols as data: a page of numbers from each paper.

A ``Recipe`` holds everything ``train.py`` needs besides the architecture; every
command-line flag overrides one field. ``choose_recipe`` picks one from the variant
and the dataset a TFRecord directory was built from (its manifest): the variant's
paper protocol for that dataset, the CPU protocol of the built-in ``shapes``
dataset, or for any other dataset a fine-tuning protocol derived from the paper's
(``fine_tuning_recipe``). It also says where each number came from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deeplab_tf.data.sources import EXPECTED_COUNTS, splits_share_images
from deeplab_tf.registry import changed, lookup, make_registry
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
            ``val_split`` None: no validation during training (a split holding every
            labelled image, such as VOC trainval); it may share no image with
            ``train_split`` (refused when declared).
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
    val_split: str | None
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
        if self.val_split is not None and splits_share_images(
            self.dataset, self.train_split, self.val_split
        ):
            raise ValueError(
                f"recipe {self.name}: validation split {self.val_split!r} shares images with "
                f"training split {self.train_split!r} of {self.dataset}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_policy not in LR_POLICIES:
            raise ValueError(
                f"lr_policy must be one of {list(LR_POLICIES)}, got {self.lr_policy!r}"
            )


# v3 section 4.1: trainaug, OS16, batch 16, 513 crops, poly from 0.007, 30K steps, BN
# decay 0.9997 trained; random scale 0.5..2.0 and flips.
_V3_VOC = Recipe(
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
)
# The v1/v2 protocol (v1 section 5, v2 section 4): SGD momentum 0.9, weight decay 5e-4,
# lr 0.001 with 10x on the classifier, 321x321 crops, labels subsampled to the logits
# (output stride 8). v1 (and every v1 variant): batch 20, lr x0.1 every 2000 steps, 6000
# steps (v2 Table 2, "step": 62.25 for LargeFOV), no random scaling.
_V1_VOC = Recipe(
    name="v1-voc-step",
    paper="DeepLab v1, section 5 (training); v2 section 4.1.1 and Table 2 (step policy)",
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
_V2_VOC = changed(
    _V1_VOC,
    "v2-voc-poly",
    "DeepLab v2, section 4.1.2 (poly policy, batch 10, 20K steps; VGG-16)",
    batch_size=10,
    steps=20_000,
    lr_policy="poly",
)
# ResNet-101 (v2 Table 4): random scaling 0.5..1.5 ("Aug"); batch norm kept fixed, as
# v1/v2 did (v3 appendix A lists fine-tuning it as a v3 change).
_V2_VOC_RESNET = changed(
    _V2_VOC,
    "v2-voc-resnet101",
    "DeepLab v2, section 4.1.2 and Table 4 (ResNet-101: random scale 0.5-1.5, batch norm frozen)",
    min_scale=0.5,
    max_scale=1.5,
    freeze_bn=True,
)
# Yu-Koltun section 4: SGD, batch 14, lr 1e-3, momentum 0.9, 60K steps on VOC train_aug;
# weight decay 5e-4 and the lr policy (x0.1 every 100K steps, so constant here) are those
# of the released code (fyu/dilation train.py). Crops of 512 give the paper's 64x64
# front-end outputs. The loss is on the logits upsampled inside the model (the released
# code's --up): their pixel j covers image pixels 8j..8j+7, which the corner-aligned
# label subsampling of v1/v2 would shift by 3.5 pixels. Written as its changes of v1's
# (both are Caffe VGG-16 protocols on VOC train_aug).
_YU_KOLTUN_FRONTEND = changed(
    _V1_VOC,
    "yu-koltun-frontend",
    "Yu & Koltun 2016, section 4 (front end: batch 14, lr 1e-3, momentum 0.9, 60K)",
    crop_size=512,
    batch_size=14,
    steps=60_000,
    lr_step_size=100_000,
    classifier_lr_multiplier=1.0,
    upsample_logits=True,
)

# One row per paper protocol; a derived row says what it changes of its base.
RECIPES: dict[str, Recipe] = make_registry(
    "recipe",
    _V3_VOC,
    # v3 section 4.2 (test set): freeze BN, OS8, trainval, lr 0.001, 30K more steps,
    # images with hard classes duplicated (bootstrapping). VOC has no labelled image
    # outside trainval, so nothing is held out: no validation (the paper scored this
    # stage on the test server).
    changed(
        _V3_VOC,
        "v3-voc-trainval-os8",
        "DeepLab v3, sections 4.1-4.2, stage 2 (start from stage 1 with --init-checkpoint); "
        "trainval holds every labelled VOC image: no validation",
        train_split="trainval",
        val_split=None,
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
    changed(
        _V3_VOC,
        "shapes-cpu",
        "not a paper protocol: the v3 protocol scaled to the built-in shapes dataset",
        dataset="shapes",
        train_split="train",
        crop_size=96,
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
    # v3 appendix C: "the same training protocol as before except that we employ 90K
    # training iterations, crop size equal to 769" on the 2975 fine train images.
    changed(
        _V3_VOC,
        "v3-cityscapes",
        "DeepLab v3, appendix C (Cityscapes train fine: 90K steps, 769 crops)",
        dataset="cityscapes",
        train_split="train",
        crop_size=769,
        steps=90_000,
    ),
    _V1_VOC,
    # v1 section 4.3: "We only adjust the newly added weights, keeping the other
    # network parameters to the values learned by the method of Section 3."
    changed(
        _V1_VOC,
        "v1-voc-msc",
        "DeepLab v1, section 4.3: MSc weights only, from a deeplabv1-largefov run "
        "(--init-checkpoint)",
        train_only_new_layers=True,
    ),
    _V2_VOC,
    _V2_VOC_RESNET,
    _YU_KOLTUN_FRONTEND,
    # Section 5: the context module is trained on the front end's outputs (front end
    # frozen), lr 1e-3; the number of steps is not given (60K as the front end).
    changed(
        _YU_KOLTUN_FRONTEND,
        "yu-koltun-context",
        "Yu & Koltun 2016, section 5: context module only, on a dilation-frontend "
        "run (--init-checkpoint)",
        train_only_new_layers=True,
    ),
    # v2 section 4.4: Cityscapes at full resolution with "the same training protocol" as
    # VOC (Table 9: VGG-16 LargeFOV and ResNet-101); the paper gives no crop size: the
    # VOC 321 is kept.
    changed(
        _V2_VOC,
        "v2-cityscapes",
        "DeepLab v2, section 4.4 and Table 9 (VGG-16, VOC v2 protocol on Cityscapes; "
        "crop not given: VOC's 321)",
        dataset="cityscapes",
        train_split="train",
    ),
    changed(
        _V2_VOC_RESNET,
        "v2-cityscapes-resnet101",
        "DeepLab v2, section 4.4 and Table 9 (ResNet-101, VOC v2 protocol on Cityscapes; "
        "crop not given: VOC's 321)",
        dataset="cityscapes",
        train_split="train",
    ),
)

# Each variant's paper protocols: (on PASCAL VOC 2012, on Cityscapes or None where its
# paper has none). Cityscapes: v3 appendix C; v2 section 4.4 (Table 9: VGG-16 LargeFOV
# and the ResNet-101 systems; the VGG-16 ASPP variants get the same v2 VGG-16
# protocol). Other pairs of variant and dataset (v1, Yu-Koltun, custom data) get
# ``fine_tuning_recipe``. A variant not listed (the CPU ones) takes v3's.
_V3_PROTOCOLS = ("v3-voc-trainaug", "v3-cityscapes")
_PROTOCOLS: dict[str, tuple[str, str | None]] = {
    "deeplabv3": _V3_PROTOCOLS,
    "deeplabv3-resnet50": _V3_PROTOCOLS,
    "deeplabv3-cascade": _V3_PROTOCOLS,
    "deeplabv3-mobilenetv2": _V3_PROTOCOLS,
    # v3+ section 4 follows v3's training protocol (poly from 0.007, 513 crops, batch
    # norm fine-tuned at OS16, random scaling); TF1's g3doc/cityscapes.md trains on
    # Cityscapes with v3's 769 crops and 90K steps.
    "deeplabv3plus": _V3_PROTOCOLS,
    "deeplabv3plus-resnet50": _V3_PROTOCOLS,
    "deeplabv3plus-xception65": _V3_PROTOCOLS,
    "deeplabv3plus-mobilenetv2": _V3_PROTOCOLS,
    "deeplabv1": ("v1-voc-step", None),
    "deeplabv1-7x7": ("v1-voc-step", None),
    "deeplabv1-4x4-r8": ("v1-voc-step", None),
    "deeplabv1-largefov": ("v1-voc-step", "v2-cityscapes"),  # v2 Table 9's VGG-16 LargeFOV
    "deeplabv1-msc-largefov": ("v1-voc-msc", None),
    "deeplabv2-vgg16-aspp-s": ("v2-voc-poly", "v2-cityscapes"),
    "deeplabv2-vgg16-aspp-l": ("v2-voc-poly", "v2-cityscapes"),
    "deeplabv2-resnet101-largefov": ("v2-voc-resnet101", "v2-cityscapes-resnet101"),
    "deeplabv2-resnet101-aspp-l": ("v2-voc-resnet101", "v2-cityscapes-resnet101"),
    "deeplabv2-resnet101-msc-aspp-l": ("v2-voc-resnet101", "v2-cityscapes-resnet101"),
    "dilation-frontend": ("yu-koltun-frontend", None),
    "dilation-context-basic": ("yu-koltun-context", None),
    "dilation-context-large": ("yu-koltun-context", None),
}


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``; a ValueError lists the known ones."""
    return lookup(RECIPES, "recipe", name)


def paper_recipe(variant: str) -> Recipe:
    """The VOC protocol of ``variant``'s paper (v3's for the CPU variants)."""
    get_variant(variant)
    return RECIPES[_PROTOCOLS.get(variant, _V3_PROTOCOLS)[0]]


def default_recipe(variant: str, dataset: str | None) -> Recipe:
    """The protocol of ``variant`` on a registered dataset that has one: the shapes CPU
    recipe for ``shapes`` (or None), else the paper's (VOC; Cityscapes for v3 and the
    v2 systems). A second-stage variant (DeepLab-MSc, Yu-Koltun context) keeps its
    stage on shapes too: only its new layers train. ValueError for a dataset without a
    paper protocol for ``variant`` (``fine_tuning_recipe`` derives one)."""
    recipe = _dataset_protocol(variant, dataset or "shapes")
    if recipe is None:
        raise ValueError(f"no paper protocol for {variant} on {dataset}")
    return recipe


def _dataset_protocol(variant: str, dataset: str) -> Recipe | None:
    paper = paper_recipe(variant)
    if dataset == "shapes":
        shapes = RECIPES["shapes-cpu"]
        if paper.train_only_new_layers:
            return dataclasses.replace(shapes, train_only_new_layers=True)
        return shapes
    if dataset == "pascal_voc_2012":
        return paper
    cityscapes = _PROTOCOLS.get(variant, _V3_PROTOCOLS)[1]
    return RECIPES[cityscapes] if dataset == "cityscapes" and cityscapes else None


# Validations in a derived run: checkpoint_every = steps / this (at most the paper's).
_VALIDATIONS_PER_RUN = 10


def fine_tuning_recipe(
    variant: str, dataset: str, splits: Mapping[str, Mapping[str, Any]]
) -> tuple[Recipe, dict[str, str]]:
    """The fine-tuning protocol of ``variant`` on a dataset without a paper protocol
    (``splits``: the manifest's split entries), and where each derived field came from.

    It is the variant's paper protocol (optimizer, learning rate, lr multipliers, batch
    norm, augmentation, batch size, output stride) with the data's own numbers:

    * splits: ``train`` (else the first built) and ``val`` when built and sharing no
      image with it (else no validation);
    * steps: as many epochs as the paper's run (steps x batch / its training images:
      45 for v3 on VOC train_aug) over this split's images;
    * crop: the paper's, or the largest image side when smaller, rounded up to
      ``k * output_stride + 1`` (whole images: nothing is lost to the crop);
    * lr policy: poly (power 0.9) also for step-policy papers, whose step boundaries
      assume their own run length.
    """
    paper = paper_recipe(variant)
    if not splits:
        raise ValueError(f"dataset {dataset} has no built splits")
    train_split = "train" if "train" in splits else sorted(splits)[0]
    val_split = "val" if "val" in splits and train_split != "val" else None
    shared = set(splits[train_split].get("names", ())) & set(
        splits.get(val_split or "", {}).get("names", ())
    )
    if shared:
        val_split = None
    sources: dict[str, str] = {
        "name": "derived: the paper protocol fine-tuned on this dataset",
        "train_split": "manifest: "
        + ("its 'train' split" if train_split == "train" else "the first split built"),
        "val_split": "manifest: "
        + ("its 'val' split" if val_split else "no 'val' split apart from train: no validation"),
    }
    paper_images = EXPECTED_COUNTS[(paper.dataset, paper.train_split)]
    epochs = paper.steps * paper.batch_size / paper_images
    images = int(splits[train_split]["num_examples"])
    steps = max(1, round(epochs * images / paper.batch_size))
    sources["steps"] = (
        f"derived: {epochs:.1f} epochs as {paper.name} ({paper.steps} x {paper.batch_size} "
        f"/ {paper_images} images) over {images} images"
    )
    crop = paper.crop_size
    size = splits[train_split].get("max_image_size")
    if size:
        stride = paper.output_stride
        whole = math.ceil((max(size) - 1) / stride) * stride + 1
        if whole < crop:
            crop = whole
            sources["crop_size"] = (
                f"derived: largest image side {max(size)} (manifest) as k x {stride} + 1"
            )
    every = min(paper.checkpoint_every, max(1, math.ceil(steps / _VALIDATIONS_PER_RUN)))
    sources["checkpoint_every"] = f"derived: {_VALIDATIONS_PER_RUN} validations per run"
    if paper.lr_policy != "poly":
        sources["lr_policy"] = "derived: poly (the paper's step boundaries assume its run)"
    recipe = dataclasses.replace(
        paper,
        name=f"{paper.name}-finetune",
        paper=f"fine-tuning on {dataset}, derived from {paper.paper}",
        dataset=dataset,
        train_split=train_split,
        val_split=val_split,
        steps=steps,
        crop_size=crop,
        lr_policy="poly",
        checkpoint_every=every,
    )
    return recipe, sources


def choose_recipe(
    variant: str,
    manifest: Mapping[str, Any] | None,
    *,
    recipe: str | None = None,
    dataset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    where: str = "--data-dir",
) -> tuple[Recipe, dict[str, str]]:
    """The recipe of a run and, for each field, where its value came from.

    Args:
        variant: the variant's name.
        manifest: the data directory's ``manifest.json``; None for the built-in shapes
            dataset (no ``--data-dir``).
        recipe: ``--recipe``, a registered name; its dataset must be the manifest's.
        dataset: ``--dataset``, a spec name; it must be the manifest's.
        overrides: recipe fields set by flags (None values are ignored).
        where: how messages name the data directory.

    Raises:
        ValueError: one line naming the flag and the datasets that disagree.
    """
    built = "shapes" if manifest is None else manifest["dataset"]["name"]
    if dataset is not None and dataset != built:
        if manifest is None:
            raise ValueError(f"--data-dir is required for dataset {dataset!r}")
        raise ValueError(f"--dataset {dataset} does not match {where}, built from {built!r}")
    sources: dict[str, str] = {}
    if recipe is not None:
        chosen = get_recipe(recipe)
        if chosen.dataset != built:
            if manifest is None:
                raise ValueError(f"--data-dir is required for dataset {chosen.dataset!r}")
            raise ValueError(f"--recipe {recipe} is for {chosen.dataset}; {where} holds {built!r}")
        origin = f"recipe {chosen.name} (--recipe)"
    else:
        chosen = _dataset_protocol(variant, built)
        origin = f"recipe {getattr(chosen, 'name', '')} ({variant} on {built})"
        if chosen is None:  # a manifest, since shapes has a protocol
            chosen, sources = fine_tuning_recipe(variant, built, manifest["splits"])
            origin = f"recipe {paper_recipe(variant).name} ({variant}'s paper protocol)"
    names = [f.name for f in dataclasses.fields(Recipe)]
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown recipe fields {unknown}")
    chosen = dataclasses.replace(chosen, **overrides)
    sources["dataset"] = (
        f"manifest of {where}" if manifest is not None else "built-in (no --data-dir)"
    )
    for name in names:
        if name in overrides:
            sources[name] = f"flag --{name.replace('_', '-')}"
    return chosen, {name: sources.get(name, origin) for name in names}


def format_recipe(recipe: Recipe, sources: Mapping[str, str]) -> str:
    """The block train.py prints at start: each field, its value and its source."""
    names = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "paper")]
    width = max(map(len, names))
    lines = [f"recipe {recipe.name}: {recipe.paper}"]
    for name in names:
        value = getattr(recipe, name)
        shown = "none" if value is None else str(value)
        lines.append(f"  {name:<{width}}  {shown:<15}  {sources.get(name, '')}".rstrip())
    return "\n".join(lines)
