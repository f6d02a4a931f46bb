"""The built-in ``shapes`` dataset: a small, deterministic, real segmentation problem.

Each image shows one to five objects of five shape classes (disk, square, triangle,
ring, cross) on a textured background. Colours and textures (solid, noise, gradient)
are drawn independently of the class and shared by the background, so only shape
tells the classes apart. Objects range from 16 pixels (two cells of output stride 8)
to half the image, are rotated and overlap (later ones occlude earlier ones, each
stays >= 40% visible). As in VOC, a thin band of ignore label 255 runs along every
object border.

The design keeps the quickstart's problem one that a CPU learns in minutes (README,
Quickstart): objects of 10 pixels were below what 12x12 logits resolve, and stripe
and checker textures with 4..12-pixel periods hid the outline of small objects; with
both, a from-scratch model was far from converged after 10 minutes on 2 cores.

The tree is in VOC layout (``JPEGImages/*.jpg``, palette ``SegmentationClass/*.png``,
``ImageSets/Segmentation/{train,val}.txt``), so it goes through the same builder as
VOC. :func:`ensure_shapes_tfrecords` generates and builds it on first use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deeplab_tf.data import tfrecord
from deeplab_tf.data.build import BadInputError, build_split
from deeplab_tf.data.sources import voc_layout_pairs
from deeplab_tf.data.specs import IGNORE_LABEL, SPECS
from deeplab_tf.files import replace_dir, temporary_dir
from deeplab_tf.progress import track

SPEC = SPECS["shapes"]
PARAMS_FILE = "shapes.json"
# 8000 training images: with 400, a quickstart-sized model fitted them (train mIoU
# 0.63 against 0.31 on val after 900 steps), and the quickstart takes 2700.
DEFAULTS = {"num_train": 8000, "num_val": 100, "image_size": 96, "seed": 0}
# Written with the parameters: a tree made by an older design is regenerated.
# 2: no stripe/checker textures, objects from 16 px (1: 400 images, from 10 px).
GENERATOR_VERSION = 2
TEXTURES = ("solid", "noise", "gradient")
MIN_RADIUS = 8  # extent radius in pixels: 16-pixel objects at the smallest
_SPLIT_STREAMS = {"train": 0, "val": 1}  # independent random streams per split


# === Rendering ===


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random RGB texture [size, size, 3] (float, 0..255): two random colours in a pattern."""
    kind = rng.choice(TEXTURES)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == "solid":
        t = np.zeros((size, size, 1), np.float32)
    elif kind == "noise":
        t = np.clip(rng.normal(0.5, 0.25, (size, size, 1)), 0, 1)
    else:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        t = (x * np.cos(angle) + y * np.sin(angle)) / size
        t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
    return (1 - t) * c1 + t * c2


def _shape_mask(cls: int, size: int, cy: float, cx: float, r: float, theta: float) -> np.ndarray:
    """Boolean [size, size] mask of shape class ``cls`` (1..5) with extent radius ``r``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    dy, dx = y - cy, x - cx
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    d2 = u * u + v * v
    name = SPEC.class_names[cls]
    if name == "disk":
        return d2 <= r * r
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if name == "triangle":  # equilateral, circumradius r: inside all three edges
        inside = np.ones_like(u, bool)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5 * r
        return inside
    if name == "ring":
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if name == "cross":
        arm = 0.32 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape class {cls}")


def ignore_band(label: np.ndarray) -> np.ndarray:
    """Sets to 255 every pixel whose 3x3 neighbourhood holds another class (VOC-style)."""
    padded = np.pad(label, 1, mode="edge")
    h, w = label.shape
    border = np.zeros(label.shape, bool)
    for oy in range(3):
        for ox in range(3):
            border |= padded[oy : oy + h, ox : ox + w] != label
    return np.where(border, IGNORE_LABEL, label).astype(np.uint8)


def render_example(
    rng: np.random.Generator, size: int = DEFAULTS["image_size"]
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 [size, size, 3]) and its label (uint8 [size, size], 255 band)."""
    background = _texture(rng, size)
    image = background.copy()
    label = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1, np.int32)  # which object is visible where
    areas: list[int] = []
    bg_mean = background.mean(axis=(0, 1))
    for _ in range(int(rng.integers(1, 6))):
        for _attempt in range(20):
            cls = int(rng.integers(1, SPEC.num_classes))
            # Extent radius uniform in [MIN_RADIUS, size/4]: diameters from 16 px to half
            # the image (log-uniform was too dominated by tiny objects for a
            # from-scratch CPU model).
            r = float(rng.uniform(MIN_RADIUS, size / 4))
            cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
            mask = _shape_mask(cls, size, cy, cx, r, rng.uniform(0, 2 * np.pi))
            trial = np.where(mask, len(areas), owner)
            visible_ok = (
                all((trial == k).sum() >= 0.4 * a for k, a in enumerate(areas)) and mask.sum() >= 12
            )
            if visible_ok:
                break
        else:
            continue
        texture = _texture(rng, size)
        # Keep the object visible against the background: contrast in mean colour.
        for _attempt in range(10):
            if np.abs(texture.mean(axis=(0, 1)) - bg_mean).sum() >= 90:
                break
            texture = _texture(rng, size)
        image[mask] = texture[mask]
        label[mask] = cls
        owner = trial
        areas.append(int(mask.sum()))
    image += rng.normal(0, 4, image.shape)  # sensor noise
    return np.clip(np.round(image), 0, 255).astype(np.uint8), ignore_band(label)


# === Writing the VOC-layout tree ===


def generate_shapes(
    root: str | Path,
    *,
    num_train: int = DEFAULTS["num_train"],
    num_val: int = DEFAULTS["num_val"],
    image_size: int = DEFAULTS["image_size"],
    seed: int = DEFAULTS["seed"],
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Writes the shapes dataset in VOC layout under ``root`` and returns ``root``.

    Deterministic in ``seed``: the i-th image of a split depends only on (seed, split,
    i). Written to a temporary directory and renamed when complete; an existing
    ``root`` needs ``overwrite=True``.
    """
    root = Path(root)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root}: already exists; pass --overwrite to replace it")
    if min(num_train, num_val) < 1 or image_size < 32:
        raise ValueError("need num_train >= 1, num_val >= 1 and image_size >= 32")
    tmp = temporary_dir(root)  # and a killed run's temporary goes
    (tmp / "JPEGImages").mkdir()
    (tmp / "SegmentationClass").mkdir()
    (tmp / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = SPEC.palette().ravel().tolist()
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            ids = []
            title = f"generating shapes {split}"
            for i in track(range(count), count, "images", enabled=progress, title=title):
                rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], i])
                image, label = render_example(rng, image_size)
                name = f"{split}_{i:05d}"
                Image.fromarray(image).save(tmp / "JPEGImages" / f"{name}.jpg", quality=92)
                png = Image.frombytes("P", (image_size, image_size), label.tobytes())
                png.putpalette(palette)
                png.save(tmp / "SegmentationClass" / f"{name}.png")
                ids.append(name)
            (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        params = {
            "num_train": num_train,
            "num_val": num_val,
            "image_size": image_size,
            "seed": seed,
            "generator_version": GENERATOR_VERSION,
        }
        (tmp / PARAMS_FILE).write_text(json.dumps(params) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, root)
    return root


def generated_with(root: str | Path, **params: Any) -> bool:
    """Whether ``root`` holds a complete tree generated with ``params`` (the defaults
    for the others) by this ``GENERATOR_VERSION``."""
    params_file = Path(root) / PARAMS_FILE
    wanted = {**DEFAULTS, **params, "generator_version": GENERATOR_VERSION}
    return params_file.is_file() and json.loads(params_file.read_text()) == wanted


def make_shapes(
    raw_root: str | Path,
    tfrecord_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **params: Any,
) -> None:
    """``make_shapes.py``: generates the raw tree (kept when it was already generated
    with ``params``, say by a run killed while its TFRecords were built) and, with
    ``tfrecord_dir``, builds its TFRecords."""
    if not overwrite and generated_with(raw_root, **params):
        print(f"{raw_root}: already generated with these settings, kept")
    else:
        try:
            generate_shapes(raw_root, overwrite=overwrite, progress=progress, **params)
        except FileExistsError as e:
            raise BadInputError(str(e)) from None
    if tfrecord_dir is not None:
        build_shapes_tfrecords(raw_root, tfrecord_dir, overwrite, progress=progress)


def build_shapes_tfrecords(
    raw_root: str | Path, out_dir: str | Path, overwrite: bool = False, progress: bool = False
) -> Path:
    """Builds the train and val TFRecords of a generated shapes tree."""
    for split in ("train", "val"):
        pairs = voc_layout_pairs(raw_root, split)
        build_split(pairs, SPEC, out_dir, split, overwrite=overwrite, progress=progress)
    return Path(out_dir)


def ensure_shapes_tfrecords(root: str | Path, progress: bool = False, **params: Any) -> Path:
    """Returns ``root/tfrecord`` holding the shapes TFRecords, generating them first if
    they are missing or were made with other ``params`` (see :func:`generate_shapes`)
    or another ``GENERATOR_VERSION``.

    ``root/raw`` keeps the VOC-layout tree. Takes about a minute the first time with
    the defaults.
    """
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown shapes parameters {unknown}; known: {sorted(DEFAULTS)}")
    wanted = {**DEFAULTS, **params}
    root = Path(root)
    raw, out = root / "raw", root / "tfrecord"
    if generated_with(raw, **wanted):
        try:
            splits = tfrecord.read_manifest(out)["splits"]
            if {"train", "val"} <= set(splits):
                return out
        except ValueError:
            pass
    else:  # a tree killed while the TFRecords were built is kept
        generate_shapes(raw, overwrite=True, progress=progress, **wanted)
    return build_shapes_tfrecords(raw, out, overwrite=True, progress=progress)
