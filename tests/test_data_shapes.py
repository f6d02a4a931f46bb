"""The built-in shapes dataset: deterministic, VOC layout, and a real segmentation problem."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from deeplab_tf.data import shapes, tfrecord
from tests.data_helpers import load_cli

make_shapes = load_cli("make_shapes")
NUM_CLASSES = shapes.SPEC.num_classes


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "raw"
    start = time.perf_counter()
    shapes.generate_shapes(root, num_train=60, num_val=20, seed=0)
    elapsed = time.perf_counter() - start
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    images = np.stack([np.asarray(Image.open(root / "JPEGImages" / f"{i}.jpg")) for i in ids])
    labels = np.stack(
        [np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids]
    )
    return {"root": root, "images": images, "labels": labels, "seconds": elapsed}


def test_defaults_are_small_and_generation_takes_seconds(tree):
    d = shapes.DEFAULTS
    assert d["num_train"] <= 10_000 and 50 <= d["num_val"] <= 200 and d["image_size"] <= 160
    assert tree["seconds"] < 8  # 80 images; the default 8100 take about a minute


def test_voc_layout_with_palette_labels(tree):
    root = tree["root"]
    for split, n in (("train", 60), ("val", 20)):
        ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert ids == sorted(ids) and len(ids) == n
        with Image.open(root / "JPEGImages" / f"{ids[0]}.jpg") as im:
            size = shapes.DEFAULTS["image_size"]
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (size, size))
        with Image.open(root / "SegmentationClass" / f"{ids[0]}.png") as lab:
            assert lab.mode == "P"
            assert lab.getpalette()[3:6] == [128, 0, 0] and lab.getpalette()[765:768] == [
                224,
                224,
                192,
            ]
    assert set(np.unique(tree["labels"])) == {*range(NUM_CLASSES), 255}


def test_same_seed_same_bytes_and_splits_independent_of_counts(tree, tmp_path):
    shapes.generate_shapes(tmp_path / "again", num_train=60, num_val=20, seed=0)
    shapes.generate_shapes(tmp_path / "fewer", num_train=5, num_val=20, seed=0)
    shapes.generate_shapes(tmp_path / "other", num_train=5, num_val=1, seed=1)
    for path in sorted(tree["root"].rglob("*.*")):
        rel = path.relative_to(tree["root"])
        assert (tmp_path / "again" / rel).read_bytes() == path.read_bytes()
    for rel in ("JPEGImages/val_00019.jpg", "SegmentationClass/val_00019.png"):
        assert (tmp_path / "fewer" / rel).read_bytes() == (tree["root"] / rel).read_bytes()
    other = tmp_path / "other" / "JPEGImages" / "train_00000.jpg"
    assert other.read_bytes() != (tree["root"] / "JPEGImages" / "train_00000.jpg").read_bytes()


def test_class_cannot_be_read_from_colour(tree, tmp_path):
    """A colour -> class lookup fitted on train objects is near chance on held-out ones."""
    images, labels = tree["images"], tree["labels"]
    fg = (labels > 0) & (labels < 255)
    bins = (images // 32).astype(np.int64)
    keys = bins[..., 0] * 64 + bins[..., 1] * 8 + bins[..., 2]
    train, test = np.arange(len(labels)) < 40, np.arange(len(labels)) >= 40
    table = np.zeros((512, NUM_CLASSES), np.int64)
    np.add.at(table, (keys[train][fg[train]], labels[train][fg[train]]), 1)
    predicted = table.argmax(1)[keys[test][fg[test]]]
    accuracy = (predicted == labels[test][fg[test]]).mean()
    assert accuracy < 0.45  # 5 shape classes; chance ~0.2 to 0.3


def test_objects_range_from_tiny_to_half_the_image_and_overlap(tree):
    labels = tree["labels"]
    extents, overlapping = [], 0
    for lab in labels:
        near = {}
        for c in range(1, NUM_CLASSES):
            components, _ = ndimage.label(lab == c)
            for box in ndimage.find_objects(components):
                extents.append(max(box[0].stop - box[0].start, box[1].stop - box[1].start))
            near[c] = ndimage.binary_dilation(lab == c, iterations=3)
        overlapping += any(
            (near[a] & (lab == b)).any() for a in near for b in near if a != b
        )  # different classes touching across the ignore band
    # 16 px (two cells of output stride 8; less where occluded) up to about half the
    # image (48 px at the default 96).
    assert min(extents) <= 16 and max(extents) >= 0.375 * shapes.DEFAULTS["image_size"]
    assert np.mean(np.array(extents) >= 13) > 0.75  # smaller: occluded parts
    assert overlapping >= 3


def test_thin_ignore_band_separates_every_class_boundary(tree):
    labels = tree["labels"].astype(np.int32)
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[:, :, 1:], labels[:, :, :-1])):
        differ = (a != b) & (a != 255) & (b != 255)
        assert not differ.any()
    band = (labels == 255).mean()
    assert 0.005 < band < 0.1
    has_object = ((labels > 0) & (labels < 255)).any(axis=(1, 2))
    assert ((labels == 255).any(axis=(1, 2)) == has_object).all()


def test_backgrounds_are_textured(tree):
    stds = [img[lab == 0].std() for img, lab in zip(tree["images"], tree["labels"], strict=True)]
    assert np.mean(np.array(stds) > 20) > 0.4


def test_ensure_builds_once_and_rebuilds_on_other_parameters(tmp_path):
    small = {"num_train": 6, "num_val": 3, "image_size": 48}
    out = shapes.ensure_shapes_tfrecords(tmp_path, **small)
    splits = tfrecord.read_manifest(out)["splits"]
    assert (splits["train"]["num_examples"], splits["val"]["num_examples"]) == (6, 3)
    stamp = (out / "train-00000-of-00001.tfrecord").stat().st_mtime_ns
    assert shapes.ensure_shapes_tfrecords(tmp_path, **small) == out
    assert (out / "train-00000-of-00001.tfrecord").stat().st_mtime_ns == stamp
    shapes.ensure_shapes_tfrecords(tmp_path, **{**small, "num_train": 4})
    assert tfrecord.read_manifest(out)["splits"]["train"]["num_examples"] == 4
    # a tree from an older generator design is regenerated, even with equal parameters
    params_file = tmp_path / "raw" / shapes.PARAMS_FILE
    params = json.loads(params_file.read_text())
    params_file.write_text(json.dumps({**params, "generator_version": 1}))
    stamp = (out / "train-00000-of-00001.tfrecord").stat().st_mtime_ns
    shapes.ensure_shapes_tfrecords(tmp_path, **{**small, "num_train": 4})
    assert (out / "train-00000-of-00001.tfrecord").stat().st_mtime_ns != stamp
    assert json.loads(params_file.read_text())["generator_version"] == shapes.GENERATOR_VERSION
    with pytest.raises(ValueError, match="unknown shapes parameters"):
        shapes.ensure_shapes_tfrecords(tmp_path, size=3)


def test_cli_reruns_continue_and_other_settings_need_overwrite(tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path / "raw"), "--num-train", "2", "--num-val", "1",
            "--tfrecord-dir", str(tmp_path / "tf")]  # fmt: skip
    assert make_shapes.main(argv) == 0
    assert (tmp_path / "tf" / "manifest.json").is_file()
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    # The same command again (as after a kill): everything done is kept, nothing left over.
    shutil.rmtree(tmp_path / "tf")  # killed before the TFRecords were written
    assert make_shapes.main(argv) == 0
    assert "already generated with these settings, kept" in capsys.readouterr().out
    assert {p: files[p] for p in files if "raw" in p.parts} == {
        p: p.stat().st_mtime_ns for p in files if "raw" in p.parts
    }
    assert (tmp_path / "tf" / "manifest.json").is_file()
    assert not [p for p in tmp_path.rglob(".*")]
    other = [*argv[:3], "3", *argv[4:]]  # --num-train 3
    assert make_shapes.main(other) == 2
    assert "raw: already exists; pass --overwrite" in capsys.readouterr().err
    assert make_shapes.main([*other, "--overwrite"]) == 0
