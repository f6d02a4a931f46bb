"""A user's run end to end on data laid out as the real datasets are: raw VOC 2012 + SBD
and Cityscapes trees -> the builder -> train.py with the dataset's paper recipe (only
steps, crop and batch overridden) -> evaluate.py -> export.py -> the SavedModel's
image-bytes signature on one image file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import scipy.sparse
import tensorflow as tf
from PIL import Image
from scipy import ndimage
from scipy.io import savemat

import evaluate as evaluate_cli
import export as export_cli
import train as train_cli
from deeplab_tf.cli import build_cityscapes, build_voc2012
from deeplab_tf.data.specs import SPECS, voc_colormap
from deeplab_tf.inference import Predictor
from deeplab_tf.recipes import get_recipe
from tests.tolerances import decided, model_probability_atol, network_rtol, sum_to_one_atol

VARIANT = "deeplabv3-resnet10-cpu"
# Cityscapes runs the v3+ model: the decoder through the builder, train.py, evaluate.py,
# export.py and the served signature.
V3PLUS_VARIANT = "deeplabv3plus-resnet10-cpu"
# What the test overrides; every other recipe field must be the paper's.
OVERRIDES = {"steps": 12, "crop_size": 97, "batch_size": 4}
# VOC JPEGImages sizes (height, width): 500x375 landscape is the most common.
VOC_SIZES = [(375, 500)] * 4 + [(333, 500), (500, 375), (281, 500)]


def _scene(rng: np.random.Generator, size, classes, background: int):
    """A noisy image with discs of ``classes[0]`` and squares of ``classes[1]``, each
    class in its own colour (learnable from a pixel), and its label map."""
    h, w = size
    image = rng.normal(110, 25, (h, w, 3))
    label = np.full((h, w), background, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(rng.integers(2, 5)):
        kind = rng.integers(0, 2)
        r = rng.integers(min(h, w) // 10, min(h, w) // 4)
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        inside = (
            (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            if kind == 0
            else (abs(yy - cy) < r) & (abs(xx - cx) < r)
        )
        image[inside] = (220, 40, 40) if kind == 0 else (40, 60, 220)
        label[inside] = classes[kind]
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    return image, label


def _void_band(label: np.ndarray, width: int = 2) -> np.ndarray:
    """VOC's annotation: 255 on a band along every object boundary."""
    edges = ndimage.maximum_filter(label, 3) != ndimage.minimum_filter(label, 3)
    band = ndimage.binary_dilation(edges, iterations=width - 1)
    return np.where(band, 255, label).astype(np.uint8)


def _write_voc_tree(root: Path, rng: np.random.Generator) -> dict[str, list[str]]:
    """VOC2012 (JPEGImages, palette SegmentationClass with 255 borders, ImageSets) and
    SBD (cls/*.mat GTcls structs, train.txt, val.txt) as the downloads lay them out."""
    voc, sbd = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE" / "dataset"
    ids = [f"2008_{i:06d}" for i in range(30)]
    lists = {
        "voc_train": ids[:8],
        "voc_val": ids[8:16],
        "sbd_train": ids[4:8] + ids[16:26],  # 4 also in VOC train
        "sbd_val": ids[14:16] + ids[26:30],  # 2 also in VOC val: left out of train_aug
    }
    classes = (15, 7)  # person discs, car squares
    for i, name in enumerate(ids):
        image, label = _scene(rng, VOC_SIZES[i % len(VOC_SIZES)], classes, background=0)
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
        if name in lists["voc_train"] + lists["voc_val"]:
            png = Image.fromarray(_void_band(label), mode="P")
            png.putpalette(voc_colormap(256).ravel().tolist())
            (voc / "SegmentationClass").mkdir(exist_ok=True)
            png.save(voc / "SegmentationClass" / f"{name}.png")
        if name in lists["sbd_train"] + lists["sbd_val"]:
            boundaries = np.empty((20, 1), object)  # one sparse edge map per class
            for c in range(20):
                boundaries[c, 0] = scipy.sparse.csc_matrix(label.shape, dtype=np.float64)
            present = np.array(sorted(set(np.unique(label)) - {0}), np.uint8)
            (sbd / "cls").mkdir(parents=True, exist_ok=True)
            gt = {"Segmentation": label, "Boundaries": boundaries, "CategoriesPresent": present}
            savemat(sbd / "cls" / f"{name}.mat", {"GTcls": gt})
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(lists["voc_train"]) + "\n")
    (sets / "val.txt").write_text("\n".join(lists["voc_val"]) + "\n")
    (sets / "trainval.txt").write_text("\n".join(lists["voc_train"] + lists["voc_val"]) + "\n")
    (sbd / "train.txt").write_text("\n".join(lists["sbd_train"]) + "\n")
    (sbd / "val.txt").write_text("\n".join(lists["sbd_val"]) + "\n")
    return {"voc": voc, "sbd": sbd, **lists}


# Cityscapes labelIds: road 7 (train id 0), person 24 (11), car 26 (13), ego vehicle 1
# (ignored).
def _write_cityscapes_tree(root: Path, rng: np.random.Generator) -> None:
    """leftImg8bit/{split}/{city}/*_leftImg8bit.png and gtFine/.../*_gtFine_labelIds.png
    (at a quarter of the 1024x2048 size, to keep the test short)."""
    for split, cities, count in (("train", ("aachen", "bochum"), 8), ("val", ("lindau",), 4)):
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            image, label = _scene(rng, (256, 512), (24, 26), background=7)
            label[-20:] = 1  # the ego vehicle at the bottom
            for kind, array, suffix in (
                ("leftImg8bit", image, "leftImg8bit"),
                ("gtFine", label, "gtFine_labelIds"),
            ):
                folder = root / kind / split / city
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(folder / f"{stem}_{suffix}.png")


def _label_counts(paths: list[Path], spec_name: str) -> np.ndarray:
    """Ground-truth pixels per class read straight from the raw label files."""
    spec = SPECS[spec_name]
    counts = np.zeros(spec.num_classes, np.int64)
    for path in paths:
        ids = spec.map_raw_labels(np.asarray(Image.open(path)))
        counts += np.bincount(ids[ids != 255].ravel(), minlength=spec.num_classes)
    return counts


def _run_user_path(
    tmp_path: Path, build_args: list[str], builder, recipe_name: str, spec: str, variant: str
):
    data, run = tmp_path / "data", tmp_path / "run"
    assert (
        builder.main([*build_args, "--output-dir", str(data), "--no-count-check", "--quiet"]) == 0
    )
    overrides = [f"--{k.replace('_', '-')}={v}" for k, v in OVERRIDES.items()]
    args = ["--variant", variant, "--data-dir", str(data), "--model-dir", str(run), "--quiet"]
    assert train_cli.main([*args, *overrides]) == 0
    config = json.loads((run / "config.json").read_text())
    paper = dataclasses.asdict(get_recipe(recipe_name))
    assert config["recipe"] == {**paper, **OVERRIDES}  # every other value is the paper's
    sources = config["recipe_sources"]
    assert {k: sources[k] for k in OVERRIDES} == {
        k: f"flag --{k.replace('_', '-')}" for k in OVERRIDES
    }
    assert sources["learning_rate"] == f"recipe {recipe_name} ({variant} on {spec})"
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 2  # one validation: the recipe's interval is past --steps

    assert evaluate_cli.main(["--model-dir", str(run), "--quiet", "--panels", "0"]) == 0
    scores = json.loads((run / "eval-val" / "results.json").read_text())
    export = ["--model-dir", str(run), "--format", "savedmodel", "--export-dir", str(tmp_path)]
    assert export_cli.main([*export, "--name", "served", "--version", "1"]) == 0
    signature = tf.saved_model.load(str(tmp_path / "served" / "1")).signatures["predict_encoded"]
    return scores, signature, Predictor(run)


def _check_served(signature, predictor: Predictor, image_file: Path) -> None:
    """The image-bytes signature's labels are the Predictor's wherever float32
    differences (another graph, the resize inside it) cannot flip them."""
    served = signature(image_bytes=tf.constant([image_file.read_bytes()]))
    image = np.asarray(Image.open(image_file).convert("RGB"))
    h, w = image.shape[:2]
    assert (int(served["heights"][0]), int(served["widths"][0])) == (h, w)
    labels = served["labels"].numpy()[0, :h, :w]
    probabilities = predictor.predict(image)
    np.testing.assert_allclose(
        served["probabilities"].numpy()[0, :h, :w].sum(-1), 1, atol=sum_to_one_atol(3)
    )
    # resnet10_cpu: 10 convolutions, the ASPP's 2 and the classifier in series (and the
    # decoder's 3), sums of at most 3x3x128 terms.
    layers = 13 + (3 if predictor.checkpoint.variant.decoder else 0)
    atol = model_probability_atol(predictor.model, image[None], network_rtol(layers, 9 * 128))
    sure = decided(probabilities, atol)
    assert sure.mean() > 0.5
    np.testing.assert_array_equal(labels[sure], probabilities.argmax(-1)[sure])


def test_voc_format_end_to_end(tmp_path):
    tree = _write_voc_tree(tmp_path / "raw", np.random.default_rng(0))
    build = ["--voc-root", str(tree["voc"]), "--sbd-root", str(tree["sbd"])]
    build += ["--splits", "train_aug", "val"]
    scores, signature, predictor = _run_user_path(
        tmp_path, build, build_voc2012, "v3-voc-trainaug", "pascal_voc_2012", VARIANT
    )
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())["splits"]
    # train_aug = VOC train + SBD train/val - VOC val (v2 section 4.1): 8 + 10 + 4.
    expected = set(tree["voc_train"]) | set(tree["sbd_train"]) | set(tree["sbd_val"])
    assert set(manifest["train_aug"]["names"]) == expected - set(tree["voc_val"])
    assert len(manifest["train_aug"]["names"]) == 22
    # Scored at the labels' full resolution, 255 borders left out: the confusion
    # matrix's rows are the ground truth's pixels per class, read from the PNGs here.
    voc = tree["voc"]
    truth = _label_counts(
        [voc / "SegmentationClass" / f"{i}.png" for i in tree["voc_val"]], "pascal_voc_2012"
    )
    np.testing.assert_array_equal(np.array(scores["confusion_matrix"]).sum(1), truth)
    assert scores["num_images"] == 8
    _check_served(signature, predictor, voc / "JPEGImages" / f"{tree['voc_val'][0]}.jpg")


def test_cityscapes_format_end_to_end(tmp_path):
    _write_cityscapes_tree(tmp_path / "cityscapes", np.random.default_rng(1))
    build = ["--cityscapes-root", str(tmp_path / "cityscapes"), "--splits", "train", "val"]
    scores, signature, predictor = _run_user_path(
        tmp_path, build, build_cityscapes, "v3-cityscapes", "cityscapes", V3PLUS_VARIANT
    )
    assert predictor.checkpoint.variant.decoder  # the v3+ model was served
    labels = sorted((tmp_path / "cityscapes" / "gtFine" / "val").glob("*/*_labelIds.png"))
    truth = _label_counts(labels, "cityscapes")
    assert truth[[0, 11, 13]].all() and truth.sum() == truth[[0, 11, 13]].sum()
    np.testing.assert_array_equal(np.array(scores["confusion_matrix"]).sum(1), truth)
    image = next((tmp_path / "cityscapes" / "leftImg8bit" / "val").glob("*/*.png"))
    _check_served(signature, predictor, image)
