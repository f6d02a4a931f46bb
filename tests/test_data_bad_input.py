"""Every bad input of the issue: a one-line error naming the file (exit code 2), or with
--skip-bad a warning and a count in the manifest; nothing already written is lost."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from deeplab_tf.data import sources
from deeplab_tf.data.build import BadInputError, build_split
from deeplab_tf.data.specs import SPECS
from tests.data_helpers import load_cli, random_image, read_records, write_jpeg, write_png

build_from_folders = load_cli("build_from_folders")
build_voc2012 = load_cli("build_voc2012")
SPEC = SPECS["shapes"]  # 6 classes


@pytest.fixture
def folder(tmp_path):
    """images/ + masks/ with three good pairs a, b, c (8x6, classes 0..5)."""
    rng = np.random.default_rng(0)
    for stem in "abc":
        write_jpeg(tmp_path / "images" / f"{stem}.jpg", random_image(rng, 6, 8))
        write_png(tmp_path / "masks" / f"{stem}.png", rng.integers(0, 6, (6, 8)).astype(np.uint8))
    return tmp_path


def _run(folder, capsys, *extra):
    argv = ["--dataset", "shapes", "--images", str(folder / "images"),
            "--masks", str(folder / "masks"), "--output-dir", str(folder / "out"),
            "--quiet", *extra]  # fmt: skip
    rc = build_from_folders.main(argv)
    err = capsys.readouterr().err.strip()
    if rc:
        assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return rc, err


def test_corrupt_image_fails_or_is_skipped_and_counted(folder, capsys, caplog):
    good = (folder / "images" / "b.jpg").read_bytes()
    (folder / "images" / "b.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    rc, err = _run(folder, capsys)
    assert rc == 2 and "b.jpg: cannot read image" in err
    assert not (folder / "out" / "manifest.json").exists()
    with caplog.at_level(logging.WARNING, logger="deeplab_tf.data"):
        rc, _ = _run(folder, capsys, "--skip-bad")
    assert rc == 0 and "b.jpg: cannot read image" in caplog.text
    entry = json.loads((folder / "out" / "manifest.json").read_text())["splits"]["train"]
    assert (entry["num_examples"], entry["num_skipped"]) == (2, 1)
    assert (
        entry["skipped"][0]["name"] == "b" and "cannot read image" in entry["skipped"][0]["reason"]
    )
    assert [r["filename"] for r in read_records(folder / "out", "train")] == ["a", "c"]


def test_image_and_label_of_different_sizes(folder, capsys):
    write_png(folder / "masks" / "c.png", np.zeros((6, 9), np.uint8))
    rc, err = _run(folder, capsys)
    assert rc == 2 and "c.jpg: image is 8x6 but its label c.png is 9x6" in err


def test_label_values_outside_the_classes_are_reported(folder, capsys):
    mask = np.zeros((6, 8), np.uint8)
    mask[0, :3] = (7, 6, 255)
    write_png(folder / "masks" / "a.png", mask)
    rc, err = _run(folder, capsys)
    assert rc == 2 and "a.png: label values [6, 7] are not classes of 'shapes'" in err


def test_missing_files_in_a_list(folder, capsys, tmp_path):
    (tmp_path / "list.txt").write_text("a\nghost\n")
    rc, err = _run(folder, capsys, "--split", f"train={tmp_path / 'list.txt'}")
    # One line of at most 200 characters: a long path keeps its first and last parts.
    assert rc == 2 and "images/ghost.jpg: file does not exist (listed in /" in err
    assert err.strip().endswith(f"{tmp_path.name}/list.txt)") and len(err.strip()) <= 200
    (folder / "masks" / "b.png").unlink()
    rc, err = _run(folder, capsys)
    assert rc == 2 and "b.png: file does not exist" in err


def test_missing_voc_label_names_the_file_and_list(tmp_path, capsys):
    voc = tmp_path / "VOC2012"
    write_jpeg(voc / "JPEGImages" / "x.jpg", np.zeros((4, 4, 3), np.uint8))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("x\n")
    argv = ["--voc-root", str(voc), "--splits", "val", "--output-dir", str(tmp_path / "o"),
            "--no-count-check", "--quiet"]  # fmt: skip
    assert build_voc2012.main(argv) == 2
    err = capsys.readouterr().err
    assert "SegmentationClass/x.png: file does not exist (listed in" in err and "val.txt" in err


def test_grayscale_and_rgba_images_are_converted_to_rgb(folder, capsys):
    from PIL import Image

    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    rgba = np.random.default_rng(1).integers(0, 256, (6, 8, 4), dtype=np.uint8)
    (folder / "images" / "a.jpg").unlink()
    Image.fromarray(gray).save(folder / "images" / "a.png")
    Image.fromarray(rgba).save(folder / "images" / "b.png")
    (folder / "images" / "b.jpg").unlink()
    assert _run(folder, capsys)[0] == 0
    records = {r["filename"]: r for r in read_records(folder / "out", "train")}
    np.testing.assert_array_equal(records["a"]["image"], np.stack([gray] * 3, -1))
    np.testing.assert_array_equal(records["b"]["image"], rgba[..., :3])


def test_empty_split(folder, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    rc, err = _run(folder, capsys, "--split", f"train={tmp_path / 'empty.txt'}")
    assert rc == 2 and "empty.txt: split is empty" in err
    for p in (folder / "images").iterdir():
        p.unlink()
    rc, err = _run(folder, capsys)
    assert rc == 2 and "images: split is empty" in err
    with pytest.raises(BadInputError, match="split 'x' is empty"):
        build_split([], SPEC, folder / "out", "x")


def test_all_pairs_bad_is_an_empty_split(folder, capsys):
    for p in (folder / "masks").iterdir():
        write_png(p, np.full((6, 8), 9, np.uint8))
    rc, err = _run(folder, capsys, "--skip-bad")
    assert rc == 2 and "split 'train' is empty: all 3 pairs were bad" in err
    assert not (folder / "out").exists() or not any((folder / "out").iterdir())


def test_dataset_directory_that_does_not_exist(tmp_path, capsys):
    rc = build_voc2012.main(
        ["--voc-root", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")]
    )
    assert (
        rc == 2
        and f"{tmp_path / 'nope'}: VOC 2012 directory does not exist" in capsys.readouterr().err
    )
    with pytest.raises(BadInputError, match="images directory does not exist"):
        sources.folder_pairs(tmp_path / "none", tmp_path)
    with pytest.raises(BadInputError, match="Cityscapes directory does not exist"):
        sources.cityscapes_pairs(tmp_path / "none", "train")


def test_existing_output_needs_overwrite_and_failed_rebuild_keeps_it(folder, capsys):
    assert _run(folder, capsys)[0] == 0
    out = folder / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _ = _run(folder, capsys)  # the same command again: the built split is kept
    assert rc == 0 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_jpeg(folder / "images" / "d.jpg", np.full((6, 8, 3), 9, np.uint8))
    write_png(folder / "masks" / "d.png", np.zeros((6, 8), np.uint8))
    rc, err = _run(folder, capsys)  # other images: rebuilding needs --overwrite
    assert rc == 2 and "train-00000-of-00001.tfrecord: split 'train' already exists" in err
    for path in (folder / "images" / "d.jpg", folder / "masks" / "d.png"):
        path.unlink()
    (folder / "images" / "c.jpg").write_bytes(b"not an image")
    rc, err = _run(folder, capsys, "--overwrite")
    assert rc == 2 and "c.jpg: cannot read image" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files left either
    write_jpeg(folder / "images" / "c.jpg", np.full((6, 8, 3), 9, np.uint8))
    assert _run(folder, capsys, "--overwrite")[0] == 0
    assert read_records(out, "train")[2]["image"].max() < 30


def test_output_directory_of_another_dataset_is_refused_before_writing(folder, capsys):
    assert _run(folder, capsys)[0] == 0
    out = folder / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    pairs = sources.folder_pairs(folder / "images", folder / "masks")
    with pytest.raises(BadInputError, match="holds dataset 'shapes'; use another output"):
        build_split(pairs, SPECS["pascal_voc_2012"], out, "val")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
