"""Shared builder logic: read and validate image + label pairs, write shards and manifest.

Every raw dataset (``deeplab_tf.data.sources``) becomes a sorted list of :class:`Pair`
and goes through :func:`build_split`, so validation, atomic output, statistics and
``--skip-bad`` behave the same for VOC, SBD, Cityscapes, folders and shapes.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deeplab_tf.data import tfrecord
from deeplab_tf.data.specs import IGNORE_LABEL, DatasetSpec
from deeplab_tf.progress import Progress

logger = logging.getLogger("deeplab_tf.data")

MASK_FORMATS = ("auto", "index", "rgb")
DEFAULT_EXAMPLES_PER_SHARD = 256


class BadInputError(ValueError):
    """A raw file or directory that cannot be used; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One image and its label file; ``listed_in`` names the list file it came from."""

    name: str
    image: Path
    label: Path
    listed_in: str = ""


# === Reading and validating ===


def read_image(path: Path) -> tuple[bytes, str, np.ndarray]:
    """Returns (encoded bytes, "jpeg" | "png", RGB uint8 pixels) for an image file.

    RGB JPEG and PNG files are stored byte for byte; grayscale, palette, RGBA and CMYK
    images are converted to RGB and stored as (lossless) PNG.
    """
    try:
        with Image.open(path) as im:
            im.load()
            fmt, mode = im.format, im.mode
            if fmt in ("JPEG", "PNG") and mode == "RGB":
                return path.read_bytes(), fmt.lower(), np.asarray(im)
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise BadInputError(f"{path}: image file does not exist") from None
    except Exception as e:
        raise BadInputError(f"{path}: cannot read image ({_one_line(e)})") from None
    return encode_png(np.asarray(rgb)), "png", np.asarray(rgb)


def read_label(path: Path, spec: DatasetSpec, mask_format: str = "auto") -> np.ndarray:
    """Reads a label file and returns class ids (uint8 [H, W], 255 = ignore).

    ``.mat`` files are SBD ``GTcls`` annotations. Index and palette PNGs hold raw values
    mapped through the spec; RGB colour masks are mapped back through ``spec.colors``.
    ``mask_format`` forces "index" or "rgb" reading instead of deciding by image mode.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    try:
        if path.suffix.lower() == ".mat":
            raw = read_sbd_mat(path)
            rgb = None
        else:
            with Image.open(path) as im:
                im.load()
                use_rgb = mask_format == "rgb" or (
                    mask_format == "auto" and im.mode in ("RGB", "RGBA")
                )
                if use_rgb:
                    rgb, raw = np.asarray(im.convert("RGB")), None
                elif im.mode in ("RGB", "RGBA"):
                    raise BadInputError(f"{path}: label is an RGB image, not an index mask")
                else:
                    rgb, raw = None, np.asarray(im)
    except BadInputError:
        raise
    except FileNotFoundError:
        raise BadInputError(f"{path}: label file does not exist") from None
    except Exception as e:
        raise BadInputError(f"{path}: cannot read label ({_one_line(e)})") from None
    try:
        if rgb is not None:
            return spec.colors_to_labels(rgb)
        if raw.ndim != 2:
            raise ValueError(f"label has shape {raw.shape}, expected [H, W]")
        return spec.map_raw_labels(raw)
    except ValueError as e:
        raise BadInputError(f"{path}: {e}") from None


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class segmentation of an SBD ``cls/*.mat`` file (``GTcls.Segmentation``)."""
    from scipy.io import loadmat  # SBD files are MATLAB v5, which scipy reads

    gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
    return np.asarray(gt.Segmentation)


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 [H, W] or [H, W, 3] array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def load_pair(pair: Pair, spec: DatasetSpec, mask_format: str = "auto") -> tuple[bytes, np.ndarray]:
    """Reads and validates one pair; returns (serialised tf.Example, label class ids)."""
    image_bytes, image_format, pixels = read_image(pair.image)
    label = read_label(pair.label, spec, mask_format)
    if pixels.shape[:2] != label.shape:
        (h, w), (lh, lw) = pixels.shape[:2], label.shape
        raise BadInputError(
            f"{pair.image}: image is {w}x{h} but its label {pair.label.name} is {lw}x{lh}"
        )
    present = [int(c) for c in np.unique(label) if c != IGNORE_LABEL]
    record = tfrecord.make_example(
        image_bytes, image_format, pair.name, label.shape[0], label.shape[1],
        encode_png(label), present,
    )  # fmt: skip
    return record, label


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# === Building a split ===


def build_split(
    pairs: Sequence[Pair],
    spec: DatasetSpec,
    out_dir: str | Path,
    split: str,
    *,
    num_shards: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    expected_count: int | None = None,
    mask_format: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Validates ``pairs`` and writes them as sharded TFRecords plus a manifest entry.

    Args:
        pairs: the split's pairs, already in the (sorted) order to write.
        spec: the dataset's label space.
        out_dir: the TFRecord directory (one dataset per directory).
        split: split name used in shard names and the manifest.
        num_shards: default ceil(len(pairs) / 256).
        skip_bad: skip unreadable or invalid pairs with a warning (counted in the
            manifest) instead of failing on the first one.
        overwrite: replace the split if its shards already exist.
        expected_count: the number of pairs a complete dataset lists for this split.
        mask_format: "auto", "index" or "rgb" (see :func:`read_label`).
        progress: show progress (``deeplab_tf.progress``).

    Returns:
        The split's manifest entry.

    Raises:
        BadInputError: one line naming the file and what is wrong.
    """
    if not pairs:
        raise BadInputError(f"split {split!r} is empty: no images listed")
    if expected_count is not None and len(pairs) != expected_count:
        raise BadInputError(
            f"split {split!r} lists {len(pairs)} images but the full dataset has "
            f"{expected_count} (incomplete download? pass --no-count-check to build anyway)"
        )
    missing = [p for p in pairs if not p.image.is_file() or not p.label.is_file()]
    if missing and not skip_bad:
        p = missing[0]
        path = p.image if not p.image.is_file() else p.label
        where = f" (listed in {p.listed_in})" if p.listed_in else ""
        more = f"; {len(missing)} pairs have missing files" if len(missing) > 1 else ""
        raise BadInputError(f"{path}: file does not exist{where}{more}")
    try:  # before anything is written: one dataset per output directory
        manifest = tfrecord.check_manifest_dataset(out_dir, spec.to_dict())
    except ValueError as e:
        raise BadInputError(str(e)) from None
    built = manifest["splits"].get(split)
    if not overwrite and built is not None and _same_pairs(built, pairs, out_dir, split):
        # A rerun of the same command (after a kill in a later split): done already.
        if progress:
            print(f"split {split}: already built from the same images, kept", flush=True)
        return built
    num_shards = num_shards or max(1, math.ceil(len(pairs) / DEFAULT_EXAMPLES_PER_SHARD))
    num_shards = min(num_shards, len(pairs))
    n = spec.num_classes
    pixel_counts = np.zeros(256, np.int64)
    image_counts = np.zeros(256, np.int64)
    skipped: list[dict[str, str]] = []
    names: list[str] = []
    max_size = np.zeros(2, np.int64)
    bar = Progress(len(pairs), "images", enabled=progress, title=f"building split {split}")
    try:
        writer = tfrecord.ShardedWriter(out_dir, split, num_shards, overwrite)
    except FileExistsError as e:
        raise BadInputError(str(e)) from None
    with writer:
        for i, pair in enumerate(pairs):
            try:
                record, label = load_pair(pair, spec, mask_format)
            except BadInputError as e:
                if not skip_bad:
                    raise
                logger.warning("skipping: %s", e)
                skipped.append({"name": pair.name, "reason": str(e)})
                continue
            finally:
                bar.update(i + 1)
            writer.write(record, i * num_shards // len(pairs))
            names.append(pair.name)
            max_size = np.maximum(max_size, label.shape)
            counts = np.bincount(label.ravel(), minlength=256)
            pixel_counts += counts
            image_counts += counts > 0
        if len(skipped) == len(pairs):
            raise BadInputError(f"split {split!r} is empty: all {len(pairs)} pairs were bad")
    labelled = int(pixel_counts[:n].sum())
    entry = {
        "num_examples": len(pairs) - len(skipped),
        "num_shards": num_shards,
        "files": writer.files(),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "class_pixel_counts": pixel_counts[:n].tolist(),
        "class_pixel_frequency": [round(c / max(labelled, 1), 8) for c in pixel_counts[:n]],
        "class_image_counts": image_counts[:n].tolist(),
        "ignore_pixel_count": int(pixel_counts[IGNORE_LABEL]),
        # The largest height and width (a fine-tuning recipe's crop) and the image names
        # (training refuses a validation split sharing images with its training split).
        "max_image_size": max_size.tolist(),
        "names": names,
    }
    tfrecord.write_manifest_split(out_dir, spec.to_dict(), split, entry)
    return entry


def _same_pairs(entry: dict[str, Any], pairs: Sequence[Pair], out_dir, split: str) -> bool:
    """Whether a manifest entry was built from exactly ``pairs`` and its shards are all
    there (manifests before image names were recorded: no)."""
    if "names" not in entry:
        return False
    names = entry["names"] + [skipped["name"] for skipped in entry.get("skipped", [])]
    try:
        shards = tfrecord.list_shards(out_dir, split)
    except ValueError:
        return False
    return sorted(names) == sorted(p.name for p in pairs) and len(shards) == entry["num_shards"]


def require_dir(path: str | Path, what: str = "dataset directory") -> Path:
    """Returns ``path`` as a Path, or raises BadInputError if it is not a directory."""
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"{path}: {what} does not exist")
    return path


def read_list(path: Path) -> list[str]:
    """Ids from a list file (first token per line, blank lines ignored), sorted, unique."""
    if not path.is_file():
        raise BadInputError(f"{path}: list file does not exist")
    ids = sorted({line.split()[0] for line in path.read_text().splitlines() if line.strip()})
    if not ids:
        raise BadInputError(f"{path}: split is empty (the list file names no images)")
    return ids


# === CLI plumbing shared by datasets/*.py ===
