"""Helpers of the data tests: tiny raw trees written with PIL/scipy, shards read back."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import tensorflow as tf
from PIL import Image

from deeplab_tf.data import tfrecord
from deeplab_tf.data.specs import voc_colormap


def load_cli(name: str) -> ModuleType:
    """Imports ``datasets/{name}.py`` by path (a pip package may also be called datasets)."""
    path = Path(__file__).resolve().parents[1] / "datasets" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"deeplab_datasets_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=90)


def write_png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    """Writes an index PNG (mode L), a palette PNG (mode P, VOC colours) or an RGB PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array, np.uint8)
    if palette:
        im = Image.frombytes("P", array.shape[::-1], array.tobytes())
        im.putpalette(voc_colormap(256).ravel().tolist())
    else:
        im = Image.fromarray(array)
    im.save(path)


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def random_label(rng: np.random.Generator, h: int, w: int, num_classes: int) -> np.ndarray:
    """Blocky labels with a 255 band, like VOC annotations."""
    label = rng.integers(0, num_classes, (h // 4 + 1, w // 4 + 1), dtype=np.uint8)
    label = np.kron(label, np.ones((4, 4), np.uint8))[:h, :w]
    label[:, w // 2] = 255
    return label


def read_records(data_dir: Path, split: str) -> list[dict]:
    """Every example of a split, decoded: filename, image, label, classes, raw bytes."""
    out = []
    for serialized in tf.data.TFRecordDataset(tfrecord.list_shards(data_dir, split)):
        parsed = tfrecord.parse_example(serialized)
        image, label = tfrecord.decode_example(parsed)
        out.append(
            {
                "filename": parsed[tfrecord.IMAGE_FILENAME].numpy().decode(),
                "image_bytes": parsed[tfrecord.IMAGE_ENCODED].numpy(),
                "format": parsed[tfrecord.IMAGE_FORMAT].numpy().decode(),
                "height": int(parsed[tfrecord.IMAGE_HEIGHT]),
                "width": int(parsed[tfrecord.IMAGE_WIDTH]),
                "image": image.numpy(),
                "label": label.numpy(),
                "classes": parsed[tfrecord.CLASSES_PRESENT].numpy().tolist(),
            }
        )
    return out


def make_voc_tree(root: Path, rng: np.random.Generator) -> dict:
    """A VOC 2012 tree (4 segmentation ids) and an SBD tree (5 ids, 2 shared with VOC)."""
    voc, sbd = root / "VOC2012", root / "SBD"
    voc_train, voc_val = ["2007_000001", "2007_000002"], ["2007_000003", "2008_000004"]
    sbd_train, sbd_val = (
        ["2007_000001", "2008_000010", "2008_000004"],
        ["2009_000020", "2009_000030"],
    )
    ids = sorted(set(voc_train + voc_val + sbd_train + sbd_val))
    sources = {}
    for i, name in enumerate(ids):
        h, w = 20 + 2 * i, 24 + i
        image = random_image(rng, h, w)
        write_jpeg(voc / "JPEGImages" / f"{name}.jpg", image)
        if name in voc_train + voc_val:
            label = random_label(rng, h, w, 21)
            write_png(voc / "SegmentationClass" / f"{name}.png", label, palette=True)
            sources[name] = ("png", label)
        if name in sbd_train + sbd_val:
            seg = rng.integers(0, 21, (h, w)).astype(np.uint8)  # SBD has no 255 band
            write_sbd_mat(sbd / "cls" / f"{name}.mat", seg)
            sources.setdefault(name, ("mat", seg))
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, names in (("train", voc_train), ("val", voc_val), ("trainval", voc_train + voc_val)):
        (sets / f"{split}.txt").write_text("\n".join(reversed(names)) + "\n")  # unsorted on disk
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")
    return {"voc": voc, "sbd": sbd, "voc_train": voc_train, "voc_val": voc_val,
            "sbd_ids": sbd_train + sbd_val, "sources": sources}  # fmt: skip


def write_sbd_mat(path: Path, seg: np.ndarray) -> None:
    """An SBD ``cls`` annotation: struct GTcls with Segmentation, Boundaries, CategoriesPresent."""
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8)
    savemat(
        path,
        {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1), "CategoriesPresent": present}},
    )
