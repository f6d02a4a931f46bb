"""The one tf.Example schema of the project, its sharded atomic writer, parser and manifest.

Writers (``deeplab_tf.data.build``) and readers (``deeplab_tf.data.pipeline``) both use
the keys below, so the two cannot drift. Each split of a dataset directory is a set of
shards ``{split}-{i:05d}-of-{n:05d}.tfrecord`` plus an entry in ``manifest.json``.

Schema (one example per image):

=====================================  ======  ==========================================
key                                    type    value
=====================================  ======  ==========================================
image/encoded                          bytes   JPEG or PNG bytes, RGB
image/format                           bytes   b"jpeg" or b"png"
image/filename                         bytes   the image's stem, e.g. b"2007_000032"
image/height, image/width              int64   image size in pixels
image/segmentation/class/encoded       bytes   single-channel PNG of class ids, 255 = ignore
image/segmentation/class/format        bytes   b"png"
image/segmentation/class/present       int64[] sorted class ids present (255 excluded), so
                                               bootstrapping can oversample without decoding
=====================================  ======  ==========================================
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from deeplab_tf.files import move_into_place, temporary_dir, write_json_atomic

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_FILENAME = "image/filename"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
LABEL_ENCODED = "image/segmentation/class/encoded"
LABEL_FORMAT = "image/segmentation/class/format"
CLASSES_PRESENT = "image/segmentation/class/present"

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1

FEATURES = {
    IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
    IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value=b"jpeg"),
    IMAGE_FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=b""),
    IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    LABEL_ENCODED: tf.io.FixedLenFeature([], tf.string),
    LABEL_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value=b"png"),
    CLASSES_PRESENT: tf.io.VarLenFeature(tf.int64),
}


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def make_example(
    image_bytes: bytes,
    image_format: str,
    filename: str,
    height: int,
    width: int,
    label_png: bytes,
    classes_present: Sequence[int],
) -> bytes:
    """Serialises one image + label pair in the schema above."""
    feature = {
        IMAGE_ENCODED: _bytes([image_bytes]),
        IMAGE_FORMAT: _bytes([image_format.encode()]),
        IMAGE_FILENAME: _bytes([filename.encode()]),
        IMAGE_HEIGHT: _ints([height]),
        IMAGE_WIDTH: _ints([width]),
        LABEL_ENCODED: _bytes([label_png]),
        LABEL_FORMAT: _bytes([b"png"]),
        CLASSES_PRESENT: _ints(sorted(classes_present)),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialised example without decoding the images.

    Returns a dict with the schema's keys; ``CLASSES_PRESENT`` is a dense int64 vector.
    """
    parsed = tf.io.parse_single_example(serialized, FEATURES)
    parsed[CLASSES_PRESENT] = tf.sparse.to_dense(parsed[CLASSES_PRESENT])
    return parsed


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG or PNG bytes -> RGB uint8 [H, W, 3] (the decoder of the readers and of the
    exported serving signatures)."""
    # INTEGER_ACCURATE: TF's default fast IDCT differs from PIL/libjpeg by a few levels.
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(encoded, channels=3),
    )
    image.set_shape([None, None, 3])
    return image


def decode_example(parsed: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Decodes a parsed example to (image uint8 [H, W, 3], label uint8 [H, W])."""
    image = decode_image(parsed[IMAGE_ENCODED])
    label = tf.io.decode_png(parsed[LABEL_ENCODED], channels=1)
    label = tf.reshape(label, tf.shape(label)[:2])
    return image, label


# === Shards ===

_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord$")


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def _existing_shards(data_dir: Path, split: str) -> list[Path]:
    if not data_dir.is_dir():
        return []
    found = []
    for p in data_dir.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and m["split"] == split:
            found.append(p)
    return sorted(found)


def list_shards(data_dir: str | Path, split: str) -> list[str]:
    """Sorted shard paths of ``split`` in ``data_dir``; ValueError if there are none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: TFRecord directory does not exist")
    shards = _existing_shards(data_dir, split)
    if not shards:
        raise ValueError(f"{data_dir}: no shards for split {split!r} ({shard_name(split, 0, 1)})")
    counts = {_SHARD_RE.match(p.name)["n"] for p in shards}  # type: ignore[index]
    if len(counts) != 1 or len(shards) != int(counts.pop()):
        raise ValueError(f"{data_dir}: the shards of split {split!r} are incomplete or mixed")
    return [str(p) for p in shards]


def find_corrupt_shard(data_dir: str | Path, splits: Sequence[str]) -> tuple[str, str] | None:
    """The first shard of ``splits`` that cannot be read to its end, with TensorFlow's
    reason (a truncated record, a bad checksum), or None. Reads every record: call it
    after a ``DataLossError`` to name the file."""
    for split in splits:
        for shard in list_shards(data_dir, split):
            try:
                for _ in tf.data.TFRecordDataset(shard):
                    pass
            except tf.errors.DataLossError as error:
                return shard, error.message.splitlines()[0]
    return None


def corrupt_shard_error(
    data_dir: str | Path, splits: Sequence[str], error: Exception, then: str = ""
) -> ValueError:
    """A one-line ValueError naming the shard behind a ``DataLossError`` and what to do."""
    found = find_corrupt_shard(data_dir, splits)
    if found is None:
        return ValueError(f"{data_dir}: unreadable TFRecord data ({error})")
    shard, reason = found
    return ValueError(
        f"{shard}: truncated or corrupt ({reason}); rebuild the dataset with --overwrite"
        + (f", then {then}" if then else "")
    )


class ShardedWriter:
    """Writes a split's shards under a temporary name and renames them when complete.

    Use as a context manager: on a clean exit the shards replace the split's old ones
    (only allowed with ``overwrite=True``); on an exception nothing in ``out_dir``
    changes. ``write(record, shard)`` expects shard indices in non-decreasing order.
    """

    def __init__(
        self, out_dir: str | Path, split: str, num_shards: int, overwrite: bool = False
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.num_shards = num_shards
        self.overwrite = overwrite
        existing = _existing_shards(self.out_dir, split)
        if existing and not overwrite:
            raise FileExistsError(
                f"{existing[0]}: split {split!r} already exists; pass --overwrite to replace it"
            )
        self._tmp = self.out_dir / split  # replaced by a temporary name on entry
        self._writer: tf.io.TFRecordWriter | None = None
        self._shard = -1

    def __enter__(self) -> ShardedWriter:
        self._tmp = temporary_dir(self.out_dir / self.split)  # and a killed run's go
        return self

    def _open(self, shard: int) -> None:
        if self._writer is not None:
            self._writer.close()
        self._shard = shard
        self._writer = tf.io.TFRecordWriter(
            str(self._tmp / shard_name(self.split, shard, self.num_shards))
        )

    def write(self, record: bytes, shard: int) -> None:
        if not self._shard <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of order or range (0..{self.num_shards - 1})")
        if shard != self._shard:
            self._open(shard)
        self._writer.write(record)  # type: ignore[union-attr]

    def files(self) -> list[str]:
        return [shard_name(self.split, i, self.num_shards) for i in range(self.num_shards)]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._writer is not None:
            self._writer.close()
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        for name in self.files():  # shards that got no record still exist, empty
            (self._tmp / name).touch()
        new = set(self.files())
        for old in _existing_shards(self.out_dir, self.split):
            if old.name not in new:
                old.unlink()
        for name in self.files():
            move_into_place(self._tmp / name, self.out_dir / name)
        self._tmp.rmdir()


# === Manifest ===


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a TFRecord directory (ValueError if missing)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: manifest does not exist (build the dataset first)")
    return json.loads(path.read_text())


def check_manifest_dataset(data_dir: str | Path, dataset: dict[str, Any]) -> dict[str, Any]:
    """The directory's manifest (or a new empty one); ValueError if it holds another dataset."""
    path = Path(data_dir) / MANIFEST
    manifest = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "splits": {}}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("dataset") != dataset:
            name = old.get("dataset", {}).get("name")
            raise ValueError(f"{path}: holds dataset {name!r}; use another output directory")
        manifest["splits"] = old.get("splits", {})
    return manifest


def write_manifest_split(
    data_dir: str | Path, dataset: dict[str, Any], split: str, entry: dict[str, Any]
) -> dict[str, Any]:
    """Adds or replaces one split's entry in ``manifest.json`` (atomic replace).

    ``dataset`` is the spec's ``to_dict()``; a directory holds one dataset only.
    """
    path = Path(data_dir) / MANIFEST
    manifest = check_manifest_dataset(data_dir, dataset)
    manifest["splits"][split] = entry
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    write_json_atomic(path, manifest, indent=1)
    return manifest
