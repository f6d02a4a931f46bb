"""Raw dataset layouts -> sorted lists of image/label pairs for ``build.build_split``,
and the builders of whole datasets (``build_voc2012``, ``build_cityscapes``,
``build_from_folders``: the ``build_*.py`` tools' work).

Only listing happens here; reading and validation live in ``build.py``. Expected
counts of the complete datasets are kept next to each layout and asserted by the
builders unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deeplab_tf.data.build import BadInputError, Pair, build_split, read_list, require_dir
from deeplab_tf.data.specs import SPECS, DatasetSpec

VOC_SPLITS = ("train", "val", "trainval", "train_aug")
# VOC 2012 segmentation lists; train_aug = VOC train + SBD train/val - VOC val
# (v2 paper, section 4.1: "resulting in 10,582 (trainaug) training images").
VOC_EXPECTED_COUNTS = {"train": 1464, "val": 1449, "trainval": 2913, "train_aug": 10582}

CITYSCAPES_SPLITS = ("train", "val", "test", "train_extra")
# Cityscapes: fine train/val/test (v2 paper, section 4.4), coarse train_extra.
CITYSCAPES_EXPECTED_COUNTS = {
    ("gtFine", "train"): 2975,
    ("gtFine", "val"): 500,
    ("gtFine", "test"): 1525,
    ("gtCoarse", "train"): 2975,
    ("gtCoarse", "val"): 500,
    ("gtCoarse", "train_extra"): 19998,
}

# The disjoint image sets each split of a registered dataset is made of: a validation
# split must share none with its training split (``splits_share_images``; recipes are
# checked when declared). Splits not listed here are their own set.
SPLIT_PARTS: dict[str, dict[str, frozenset[str]]] = {
    "pascal_voc_2012": {
        "train": frozenset({"voc-train"}),
        "val": frozenset({"voc-val"}),
        "trainval": frozenset({"voc-train", "voc-val"}),
        "train_aug": frozenset({"voc-train", "sbd-not-in-voc-val"}),
    },
    "cityscapes": {
        "coarse_train": frozenset({"train"}),
        "coarse_val": frozenset({"val"}),
        "coarse_train_extra": frozenset({"train_extra"}),
    },
}
# Training images of the complete splits the papers trained on (their epochs per step).
EXPECTED_COUNTS: dict[tuple[str, str], int] = {
    **{("pascal_voc_2012", split): n for split, n in VOC_EXPECTED_COUNTS.items()},
    **{("cityscapes", split): n for (kind, split), n in CITYSCAPES_EXPECTED_COUNTS.items()
       if kind == "gtFine"},
}  # fmt: skip


def splits_share_images(dataset: str, a: str, b: str) -> bool:
    """Whether splits ``a`` and ``b`` of ``dataset`` hold images in common, by declaration
    (``SPLIT_PARTS``); the manifest's image names check a built directory."""
    parts = SPLIT_PARTS.get(dataset, {})
    return bool(parts.get(a, frozenset({a})) & parts.get(b, frozenset({b})))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def voc_layout_pairs(root: str | Path, split: str) -> list[Pair]:
    """Pairs of a VOC-layout tree: ``ImageSets/Segmentation/{split}.txt`` lists ids of
    ``JPEGImages/{id}.jpg`` and ``SegmentationClass/{id}.png`` (also the shapes layout)."""
    root = require_dir(root)
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    return [
        Pair(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png",
             str(list_file))
        for i in read_list(list_file)
    ]  # fmt: skip


def voc2012_pairs(
    voc_root: str | Path, split: str, sbd_root: str | Path | None = None
) -> list[Pair]:
    """Pairs of a VOC 2012 split; ``train_aug`` also needs the SBD ``dataset`` directory.

    train_aug is sorted(VOC train | SBD train | SBD val - VOC val). Its labels are the VOC
    PNGs (with their ignore band) for VOC train images and the SBD ``cls/{id}.mat``
    annotations for the rest; images come from VOC ``JPEGImages``.
    """
    if split not in VOC_SPLITS:
        raise BadInputError(f"unknown VOC split {split!r}; known: {', '.join(VOC_SPLITS)}")
    voc_root = require_dir(voc_root, "VOC 2012 directory")
    if split != "train_aug":
        return voc_layout_pairs(voc_root, split)
    if sbd_root is None:
        raise BadInputError("split 'train_aug' needs the SBD directory (--sbd-root)")
    sbd_root = require_dir(sbd_root, "SBD directory")
    sets = voc_root / "ImageSets" / "Segmentation"
    voc_train = set(read_list(sets / "train.txt"))
    voc_val = set(read_list(sets / "val.txt"))
    sbd_ids: dict[str, str] = {}
    for name in ("train.txt", "val.txt"):
        for i in read_list(sbd_root / name):
            sbd_ids.setdefault(i, str(sbd_root / name))
    pairs = []
    for i in sorted((voc_train | set(sbd_ids)) - voc_val):
        image = voc_root / "JPEGImages" / f"{i}.jpg"
        if i in voc_train:
            pairs.append(Pair(i, image, voc_root / "SegmentationClass" / f"{i}.png", str(sets)))
        else:
            pairs.append(Pair(i, image, sbd_root / "cls" / f"{i}.mat", sbd_ids[i]))
    return pairs


def cityscapes_pairs(root: str | Path, split: str, annotations: str = "gtFine") -> list[Pair]:
    """Pairs of ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with their
    ``{annotations}/{split}/{city}/*_{annotations}_labelIds.png`` (labelIds, which the
    cityscapes spec maps to train ids)."""
    if annotations not in ("gtFine", "gtCoarse"):
        raise BadInputError(f"annotations must be gtFine or gtCoarse, got {annotations!r}")
    root = require_dir(root, "Cityscapes directory")
    image_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes image directory")
    suffix = "_leftImg8bit.png"
    pairs = []
    for image in sorted(image_dir.glob(f"*/*{suffix}")):
        stem = image.name[: -len(suffix)]
        label = (
            root / annotations / split / image.parent.name / f"{stem}_{annotations}_labelIds.png"
        )
        pairs.append(Pair(stem, image, label, str(image_dir)))
    if not pairs:
        raise BadInputError(f"{image_dir}: split {split!r} is empty (no *{suffix} files)")
    return pairs


def _by_stem(directory: Path, what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(directory.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if p.stem in found:
                raise BadInputError(
                    f"{p}: two {what} files named {p.stem!r} ({found[p.stem].name})"
                )
            found[p.stem] = p
    return found


def folder_pairs(
    images_dir: str | Path, masks_dir: str | Path, list_file: str | Path | None = None
) -> list[Pair]:
    """Pairs an images directory with a masks directory by file stem.

    With ``list_file`` only the listed stems are used (a listed stem without an image
    or mask is reported as a missing file); otherwise every image is used.
    """
    images_dir = require_dir(images_dir, "images directory")
    masks_dir = require_dir(masks_dir, "masks directory")
    images = _by_stem(images_dir, "image")
    masks = _by_stem(masks_dir, "mask")
    if list_file is not None:
        stems = read_list(Path(list_file))
        source = str(list_file)
    else:
        stems = sorted(images)
        source = ""
        if not stems:
            raise BadInputError(f"{images_dir}: split is empty (no image files)")
    return [
        Pair(
            s, images.get(s, images_dir / f"{s}.jpg"), masks.get(s, masks_dir / f"{s}.png"), source
        )
        for s in stems
    ]


# === Whole datasets: the build_*.py tools ===


def build_voc2012(
    voc_root: str | Path,
    output_dir: str | Path,
    splits: Sequence[str] = ("train", "val"),
    sbd_root: str | Path | None = None,
    check_counts: bool = True,
    **options: Any,
) -> None:
    """TFRecords of PASCAL VOC 2012 ``splits`` (train_aug with SBD's ``sbd_root``);
    ``options``: ``build_split``'s."""
    for split in splits:
        pairs = voc2012_pairs(voc_root, split, sbd_root)
        expected = VOC_EXPECTED_COUNTS[split] if check_counts else None
        build_split(pairs, SPECS["pascal_voc_2012"], output_dir, split,
                    expected_count=expected, **options)  # fmt: skip


def build_cityscapes(
    cityscapes_root: str | Path,
    output_dir: str | Path,
    splits: Sequence[str] = ("train", "val"),
    coarse: bool = False,
    check_counts: bool = True,
    **options: Any,
) -> None:
    """TFRecords of Cityscapes ``splits``, fine annotations or (``coarse``) the coarse
    ones as ``coarse_SPLIT``; ``options``: ``build_split``'s."""
    annotations = "gtCoarse" if coarse else "gtFine"
    for split in splits:
        pairs = cityscapes_pairs(cityscapes_root, split, annotations)
        expected = CITYSCAPES_EXPECTED_COUNTS.get((annotations, split)) if check_counts else None
        name = f"coarse_{split}" if coarse else split
        build_split(pairs, SPECS["cityscapes"], output_dir, name,
                    expected_count=expected, **options)  # fmt: skip


def build_from_folders(
    images: str | Path,
    masks: str | Path,
    spec: DatasetSpec,
    output_dir: str | Path,
    splits: Sequence[str] = ("train",),
    **options: Any,
) -> None:
    """TFRecords of an image folder and a mask folder; each of ``splits`` is ``NAME``
    (every pair) or ``NAME=LIST_FILE`` (the pairs of the names listed)."""
    for item in splits:
        name, _, list_file = item.partition("=")
        pairs = folder_pairs(images, masks, list_file or None)
        build_split(pairs, spec, output_dir, name, **options)
