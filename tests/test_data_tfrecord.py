"""The tf.Example schema round trip, the sharded atomic writer and the manifest."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deeplab_tf.data import tfrecord
from deeplab_tf.data.build import encode_png
from tests.data_helpers import read_records


def _record(
    name: str, rng: np.random.Generator, fmt: str = "png"
) -> tuple[bytes, np.ndarray, np.ndarray]:
    image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 3, 255], np.uint8), (7, 9))
    if fmt == "png":
        data = encode_png(image)
    else:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
        image = np.asarray(Image.open(io.BytesIO(data)))  # what PIL decodes
    present = [int(c) for c in np.unique(label) if c != 255]
    return tfrecord.make_example(data, fmt, name, 7, 9, encode_png(label), present), image, label


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_example_round_trip_is_exact(tmp_path, fmt):
    rng = np.random.default_rng(0)
    record, image, label = _record("a", rng, fmt)
    with tfrecord.ShardedWriter(tmp_path, "train", 1) as writer:
        writer.write(record, 0)
    (got,) = read_records(tmp_path, "train")
    # JPEG decoding must agree with PIL/libjpeg's accurate IDCT, PNG bit for bit.
    np.testing.assert_array_equal(got["image"], image)
    np.testing.assert_array_equal(got["label"], label)
    assert (got["filename"], got["height"], got["width"], got["format"]) == ("a", 7, 9, fmt)
    assert got["classes"] == [0, 3]


def test_writer_shards_and_lists_splits_apart(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("train_aug", 2)):
        with tfrecord.ShardedWriter(tmp_path, split, 2) as writer:
            for i in range(n):
                writer.write(_record(f"{split}{i}", rng)[0], i * 2 // n)
    assert [p.rsplit("/", 1)[1] for p in tfrecord.list_shards(tmp_path, "train")] == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    assert [r["filename"] for r in read_records(tmp_path, "train")] == [
        f"train{i}" for i in range(5)
    ]
    assert len(read_records(tmp_path, "train_aug")) == 2
    with pytest.raises(ValueError, match="no shards for split 'val'"):
        tfrecord.list_shards(tmp_path, "val")


def test_failed_write_leaves_nothing_and_existing_split_needs_overwrite(tmp_path):
    rng = np.random.default_rng(2)
    with tfrecord.ShardedWriter(tmp_path, "val", 3) as writer:
        writer.write(_record("old", rng)[0], 0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match=r"val-00000-of-00003\.tfrecord: split 'val' already"):
        tfrecord.ShardedWriter(tmp_path, "val", 1)
    with (
        pytest.raises(RuntimeError),
        tfrecord.ShardedWriter(tmp_path, "val", 1, overwrite=True) as w,
    ):
        w.write(_record("new", rng)[0], 0)
        raise RuntimeError("interrupted build")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp dir either
    with tfrecord.ShardedWriter(tmp_path, "val", 1, overwrite=True) as writer:
        writer.write(_record("new", rng)[0], 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-00000-of-00001.tfrecord"]
    assert [r["filename"] for r in read_records(tmp_path, "val")] == ["new"]


def test_manifest_merges_splits_and_refuses_another_dataset(tmp_path):
    tfrecord.write_manifest_split(tmp_path, {"name": "a"}, "val", {"num_examples": 1})
    tfrecord.write_manifest_split(tmp_path, {"name": "a"}, "train", {"num_examples": 2})
    manifest = tfrecord.read_manifest(tmp_path)
    assert manifest["splits"] == {"train": {"num_examples": 2}, "val": {"num_examples": 1}}
    with pytest.raises(ValueError, match="holds dataset 'a'"):
        tfrecord.write_manifest_split(tmp_path, {"name": "b"}, "x", {})
    with pytest.raises(ValueError, match="manifest does not exist"):
        tfrecord.read_manifest(tmp_path / "nowhere")
