"""Builders on tiny raw trees written here: shards read back equal the sources exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from deeplab_tf.data import sources
from deeplab_tf.data.build import BadInputError, build_split
from deeplab_tf.data.specs import SPECS
from tests.data_helpers import (
    load_cli,
    make_voc_tree,
    random_image,
    random_label,
    read_records,
    write_jpeg,
    write_png,
)
from tests.test_data_specs import CITYSCAPES_OFFICIAL

build_voc2012 = load_cli("build_voc2012")
build_cityscapes = load_cli("build_cityscapes")
build_from_folders = load_cli("build_from_folders")


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    return make_voc_tree(tmp_path_factory.mktemp("raw"), np.random.default_rng(0))


def _check_records_against_sources(records, tree, expected_ids):
    assert [r["filename"] for r in records] == expected_ids
    for r in records:
        path = tree["voc"] / "JPEGImages" / f"{r['filename']}.jpg"
        assert r["image_bytes"] == path.read_bytes() and r["format"] == "jpeg"
        np.testing.assert_array_equal(r["image"], np.asarray(Image.open(path)))
        assert r["image"].shape[:2] == (r["height"], r["width"])
        assert r["classes"] == [int(c) for c in np.unique(r["label"]) if c != 255]


def test_voc_splits_and_train_aug_match_sources(voc_tree, tmp_path):
    out = tmp_path / "tfrecord"
    argv = ["--voc-root", str(voc_tree["voc"]), "--sbd-root", str(voc_tree["sbd"]),
            "--output-dir", str(out), "--no-count-check", "--quiet",
            "--splits", "train", "val", "train_aug"]  # fmt: skip
    assert build_voc2012.main(argv) == 0
    for split, ids in (("train", voc_tree["voc_train"]), ("val", voc_tree["voc_val"])):
        records = read_records(out, split)
        _check_records_against_sources(records, voc_tree, sorted(ids))
        for r in records:
            source = np.asarray(
                Image.open(voc_tree["voc"] / "SegmentationClass" / f"{r['filename']}.png")
            )
            np.testing.assert_array_equal(r["label"], source)  # palette indices, 255 band kept
    # train_aug = VOC train + SBD - VOC val, computed independently of the builder.
    aug_ids = sorted(
        set(voc_tree["voc_train"]) | set(voc_tree["sbd_ids"]) - set(voc_tree["voc_val"])
    )
    records = read_records(out, "train_aug")
    _check_records_against_sources(records, voc_tree, aug_ids)
    for r in records:
        kind, label = voc_tree["sources"][r["filename"]]
        assert kind == ("png" if r["filename"] in voc_tree["voc_train"] else "mat")
        np.testing.assert_array_equal(r["label"], label)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "pascal_voc_2012"
    entry = manifest["splits"]["train_aug"]
    labels = np.concatenate([r["label"].ravel() for r in records])
    counts = np.bincount(labels, minlength=256)
    assert entry["num_examples"] == len(aug_ids) and entry["num_skipped"] == 0
    assert entry["class_pixel_counts"] == counts[:21].tolist()
    assert entry["ignore_pixel_count"] == int(counts[255])
    np.testing.assert_allclose(  # float64 divisions of the same counts: last-bit equal
        entry["class_pixel_frequency"], counts[:21] / counts[:21].sum(), atol=1e-7
    )
    image_counts = [sum(c in r["classes"] for r in records) for c in range(21)]
    assert entry["class_image_counts"] == image_counts


def test_voc_count_check_uses_the_full_dataset_counts(voc_tree, tmp_path, capsys):
    argv = ["--voc-root", str(voc_tree["voc"]), "--sbd-root", str(voc_tree["sbd"]),
            "--output-dir", str(tmp_path), "--splits", "train_aug", "--quiet"]  # fmt: skip
    assert build_voc2012.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "split 'train_aug' lists 5 images but the full dataset has 10582" in err
    assert len(err.splitlines()) == 1
    assert sources.VOC_EXPECTED_COUNTS == {
        "train": 1464,
        "val": 1449,
        "trainval": 2913,
        "train_aug": 10582,
    }
    pairs = sources.voc2012_pairs(voc_tree["voc"], "train_aug", voc_tree["sbd"])
    build_split(pairs, SPECS["pascal_voc_2012"], tmp_path, "train_aug", expected_count=5)
    assert len(read_records(tmp_path, "train_aug")) == 5


def test_builds_are_deterministic(voc_tree, tmp_path):
    for name in ("a", "b"):
        argv = ["--voc-root", str(voc_tree["voc"]), "--output-dir", str(tmp_path / name),
                "--splits", "trainval", "--num-shards", "2", "--no-count-check"]  # fmt: skip
        assert build_voc2012.main(argv) == 0
    for f in (
        "trainval-00000-of-00002.tfrecord",
        "trainval-00001-of-00002.tfrecord",
        "manifest.json",
    ):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_cityscapes_label_ids_become_official_train_ids(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cityscapes"
    official = np.full(256, -1)
    for _, label_id, train_id, _ in CITYSCAPES_OFFICIAL:
        official[label_id] = train_id
    stems = {"train": ["aachen_000001_000019", "aachen_000000_000019", "bochum_000000_000313"],
             "val": ["frankfurt_000000_000294"]}  # fmt: skip
    label_ids = {}
    for split, names in stems.items():
        for stem in names:
            city = stem.split("_")[0]
            write_png(
                root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                random_image(rng, 16, 32),
            )
            label_ids[stem] = rng.integers(0, 34, (16, 32)).astype(np.uint8)
            write_png(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids[stem]
            )
    out = tmp_path / "tfrecord"
    argv = ["--cityscapes-root", str(root), "--output-dir", str(out), "--no-count-check", "--quiet"]
    assert build_cityscapes.main(argv) == 0
    for split, names in stems.items():
        records = read_records(out, split)
        assert [r["filename"] for r in records] == sorted(names)
        for r in records:
            city = r["filename"].split("_")[0]
            path = root / "leftImg8bit" / split / city / f"{r['filename']}_leftImg8bit.png"
            assert r["format"] == "png" and r["image_bytes"] == path.read_bytes()
            np.testing.assert_array_equal(r["label"], official[label_ids[r["filename"]]])
    assert build_cityscapes.main([*argv[:4], "--quiet"]) == 2  # count check: 3 of 2975
    # Coarse annotations (optional) are written as coarse_{split}.
    stem = "frankfurt_000000_000294"
    write_png(
        root / "gtCoarse" / "val" / "frankfurt" / f"{stem}_gtCoarse_labelIds.png",
        33 - label_ids[stem],
    )
    assert build_cityscapes.main([*argv, "--coarse", "--splits", "val"]) == 0
    (coarse,) = read_records(out, "coarse_val")
    np.testing.assert_array_equal(coarse["label"], official[33 - label_ids[stem]])


@pytest.mark.parametrize("mask_kind", ["index", "palette", "rgb"])
def test_folders_with_index_palette_and_rgb_masks(tmp_path, mask_kind):
    rng = np.random.default_rng(2)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        "name: blobs\nclass_names: [bg, a, b]\ncolors: [[0, 0, 0], [250, 10, 10], [10, 250, 10]]\n"
        "ignore_color: [255, 255, 255]\n"
    )
    colors = np.array(
        [[0, 0, 0], [250, 10, 10], [10, 250, 10]] + [[0, 0, 0]] * 252 + [[255, 255, 255]]
    )
    labels = {}
    for i in range(3):
        stem = f"img{i}"
        write_jpeg(tmp_path / "images" / f"{stem}.jpg", random_image(rng, 10, 12))
        labels[stem] = random_label(rng, 10, 12, 3)
        mask_path = tmp_path / "masks" / f"{stem}.png"
        if mask_kind == "rgb":
            write_png(mask_path, colors[labels[stem]].astype(np.uint8))
        else:
            write_png(mask_path, labels[stem], palette=mask_kind == "palette")
    (tmp_path / "val.txt").write_text("img2\n")
    out = tmp_path / "out"
    argv = ["--dataset", str(spec_file), "--images", str(tmp_path / "images"),
            "--masks", str(tmp_path / "masks"), "--output-dir", str(out), "--quiet",
            "--split", "all", "--split", f"val={tmp_path / 'val.txt'}"]  # fmt: skip
    assert build_from_folders.main(argv) == 0
    records = read_records(out, "all")
    assert [r["filename"] for r in records] == ["img0", "img1", "img2"]
    for r in records:
        np.testing.assert_array_equal(r["label"], labels[r["filename"]])
    assert [r["filename"] for r in read_records(out, "val")] == ["img2"]


def test_rgb_mask_with_unknown_colour_is_an_error(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1, 1] = (3, 4, 5)
    write_jpeg(tmp_path / "images" / "x.jpg", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "masks" / "x.png", rgb)
    pairs = sources.folder_pairs(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(BadInputError, match=r"x\.png: mask colours \(3, 4, 5\) are not colours"):
        build_split(pairs, SPECS["pascal_voc_2012"], tmp_path / "out", "train")
    with pytest.raises(BadInputError, match="label is an RGB image"):
        build_split(pairs, SPECS["pascal_voc_2012"], tmp_path / "out", "train", mask_format="index")
