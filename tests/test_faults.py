"""Bad input, as a user meets it: every tool answers with exit code 2 and one line of
at most 200 characters naming the flag or file and what is wrong, and a user file
beside the inputs is never touched. Also the public API's own checks."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import describe as describe_cli
import evaluate as evaluate_cli
import export as export_cli
import predict as predict_cli
import train as train_cli
import tune_crf as tune_crf_cli
from deeplab_tf import build_model, crf
from deeplab_tf.cli import build_cityscapes, build_from_folders, build_voc2012, make_shapes
from deeplab_tf.cli.common import MAX_ERROR_CHARS
from deeplab_tf.data.shapes import ensure_shapes_tfrecords
from deeplab_tf.data.tfrecord import list_shards
from deeplab_tf.inference import InferenceError, Predictor
from tests.helpers import tiny_model, write_model_dir

TOOLS = {
    "train": train_cli,
    "evaluate": evaluate_cli,
    "predict": predict_cli,
    "export": export_cli,
    "tune_crf": tune_crf_cli,
    "describe": describe_cli,
    "build_voc2012": build_voc2012,
    "build_cityscapes": build_cityscapes,
    "build_from_folders": build_from_folders,
    "make_shapes": make_shapes,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Tiny shapes TFRecords, a model directory, a copy of the data with a truncated
    val shard, a truncated .keras file, an image folder, and a user file beside them."""
    root = tmp_path_factory.mktemp("faults")
    data = ensure_shapes_tfrecords(root / "shapes", num_train=6, num_val=2, image_size=48)
    run = write_model_dir(tiny_model(6), root / "run", data_dir=data)
    corrupt = root / "corrupt"
    shutil.copytree(data, corrupt)
    (shard,) = list_shards(corrupt, "val")
    Path(shard).write_bytes(Path(shard).read_bytes()[:-50])
    truncated = root / "truncated.keras"
    truncated.write_bytes((run / "best.keras").read_bytes()[:4000])
    photos = root / "photos"
    photos.mkdir()
    (photos / "notes.txt").write_text("the user's own file\n")
    # One image: predict's checks of the model come after those of its inputs.
    tf.io.write_file(str(photos / "photo.jpg"), tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)))
    bad_yaml = root / "mine.yaml"
    bad_yaml.write_text("name: mine\nclasses: [background, thing\n  colours: x\n")
    return {
        "root": root,
        "data": data,
        "run": run,
        "corrupt": corrupt,
        "truncated": truncated,
        "photos": photos,
        "bad_yaml": bad_yaml,
    }


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# (tool, arguments with {placeholders} from the world fixture, words of the line)
CASES = [
    ("train", ["--variant", "deeplabv9"], "unknown variant 'deeplabv9'"),
    ("train", ["--data-dir", "{data}", "--batch-size", "0"], "--batch-size must be positive"),
    ("train", ["--data-dir", "{data}", "--crop-size", "0"], "--crop-size must be positive"),
    ("train", ["--data-dir", "{data}", "--crop-size", "100000"], "GiB of activations"),
    ("train", ["--data-dir", "{data}", "--crop-size", "3800"], "GiB of activations"),
    ("train", ["--data-dir", "{root}/nowhere"], "nowhere: no such directory"),
    ("train", ["--data-dir", "{photos}"], "manifest.json: manifest does not exist"),
    ("train", ["--data-dir", "{data}", "--dataset", "cityscapes"], "does not match"),
    ("train", ["--data-dir", "{data}", "--recipe", "v3-voc-trainaug"], "is for pascal_voc"),
    ("train", ["--data-dir", "{data}", "--val-split", "train"], "shares images"),
    ("train", ["--data-dir", "{data}", "--train-split", "test"], "no split 'test'"),
    (
        "train",
        ["--variant", "deeplabv1-largefov", "--data-dir", "{data}", "--output-stride", "16"],
        "deeplabv1-largefov runs at output stride 8 only",
    ),
    ("train", ["--data-dir", "{data}", "--class-weights", "x,y"], "--class-weights must be"),
    ("train", ["--data-dir", "{data}", "--strategy", "tpu"], "--strategy must be one of"),
    ("train", ["--data-dir", "{data}", "--epochs", "0"], "--epochs must be positive"),
    ("train", ["--steps", "abc"], "invalid int value: 'abc'"),
    ("train", ["--data-dir", "{data}", "--backbone-weights", "{root}/nope.h5"], "nope.h5"),
    ("train", ["--data-dir", "{data}", "--backbone-weights", "imagenet"], "no keras.applications"),
    (
        "train",
        ["--variant", "deeplabv3", "--data-dir", "{data}", "--backbone-weights", "{bad_yaml}"],
        "weights file (.h5, .weights.h5) or a .keras model, got",
    ),
    ("evaluate", ["--checkpoint", "{root}/missing"], "missing"),
    ("evaluate", ["--checkpoint", "{truncated}"], "not a complete .keras file"),
    ("evaluate", ["--checkpoint", "{run}", "--split", "test"], "no split 'test'"),
    ("evaluate", ["--checkpoint", "{run}", "--max-images", "0"], "--max-images must be positive"),
    ("evaluate", ["--checkpoint", "{run}", "--scales", "1,x"], "--scales"),
    ("evaluate", ["--checkpoint", "{run}", "--data-dir", "{corrupt}"], "truncated or corrupt"),
    ("evaluate", ["--checkpoint", "{run}", "--trimap", "1,a"], "--trimap must be"),
    # Checked before the model is loaded: the truncated file is not read.
    ("predict", ["--checkpoint", "{truncated}", "{photos}", "--alpha", "2"], "--alpha must be in"),
    ("predict", ["--checkpoint", "{run}", "{photos}/*.png"], "no images to predict"),
    ("predict", ["--checkpoint", "{run}", "{photos}", "--dataset", "cityscapes"], "19"),
    ("predict", ["--checkpoint", "{truncated}", "{photos}"], "not a complete .keras file"),
    ("export", ["--model-dir", "{run}", "--format", "onnx"], "--format"),
    ("export", ["--model-dir", "{run}", "--max-image-size", "0"], "--max-image-size must be"),
    ("export", ["--model-dir", "{run}", "--calibration-images", "0"], "--calibration-images must"),
    ("export", ["--model-dir", "{run}", "--quantize", "int4"], "--quantize"),
    ("export", ["--model-dir", "{run}", "--input-size", "a"], "--input-size"),
    ("export", ["--model-dir", "{root}/missing"], "missing"),
    ("tune_crf", ["--checkpoint", "{run}", "--w1", "3:x"], "--w1"),
    ("tune_crf", ["--checkpoint", "{truncated}", "--num-images", "0"], "--num-images must be"),
    ("describe", ["deeplabv9"], "unknown variant 'deeplabv9'"),
    ("describe", ["deeplabv3", "--input-size", "1", "2", "3"], "--input-size takes H or H W"),
    ("build_voc2012", ["--voc-root", "{root}/voc", "--output-dir", "{root}/o"], "does not exist"),
    (
        "build_voc2012",
        ["--voc-root", "{root}", "--splits", "train_aug", "--output-dir", "{root}/o"],
        "needs the SBD directory",
    ),
    ("build_cityscapes", ["--cityscapes-root", "{photos}", "--output-dir", "{root}/o"], "photos"),
    (
        "build_from_folders",
        [
            "--dataset",
            "{bad_yaml}",
            "--images",
            "{photos}",
            "--masks",
            "{photos}",
            "--output-dir",
            "{root}/o",
        ],
        "mine.yaml: cannot parse dataset declaration (line",
    ),
    (
        "build_from_folders",
        [
            "--dataset",
            "shapes",
            "--images",
            "{root}/none",
            "--masks",
            "{photos}",
            "--output-dir",
            "{root}/o",
        ],
        "none: images directory does not exist",
    ),
    ("make_shapes", ["--output-dir", "{root}/s", "--image-size", "8"], "image_size >= 32"),
    ("make_shapes", ["--output-dir", "{root}/shapes/raw"], "already exists; pass --overwrite"),
]


@pytest.mark.parametrize(
    "tool, args, words", CASES, ids=[f"{i}-{case[0]}" for i, case in enumerate(CASES)]
)
def test_one_line_naming_the_cause(world, capsys, tool, args, words):
    args = [arg.format(**world) for arg in args]
    if tool == "train":  # the quickstart's small model unless the case names another
        args += ["--model-dir", str(world["root"] / "train-run")]
        if "--variant" not in args:
            args += ["--variant", "deeplabv3-resnet10-cpu"]
    before = _digest(world["root"])
    try:
        code = TOOLS[tool].main(args)
    except SystemExit as done:  # argparse's own errors (our one-line form)
        code = done.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and len(err) <= MAX_ERROR_CHARS, err
    assert words in err, err
    # Nothing the user had (data, runs, the file beside the photos) was changed.
    after = _digest(world["root"])
    assert {k: v for k, v in after.items() if k in before} == before


def test_verbose_adds_the_traceback(world, capsys):
    code = evaluate_cli.main(["--checkpoint", str(world["truncated"]), "--verbose"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_public_api_checks(world):
    with pytest.raises(InferenceError, match=r"not a complete \.keras file"):
        Predictor(world["truncated"])
    with pytest.raises(ValueError, match="deeplabv1 runs at output stride 8 only"):
        build_model("deeplabv1", 3, output_stride=16)
    image = np.zeros((1, 8, 8, 3), np.uint8)
    nan = np.full((1, 8, 8, 2), np.nan, np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="CRF probabilities must be finite"):
        crf.crf_tensorflow(image, nan)
    with pytest.raises(ValueError, match="finite"):
        crf.refine(image[0], nan[0], backend="tensorflow")
    logits = np.full((1, 8, 8, 2), 3.0, np.float32)  # not probabilities
    with pytest.raises(tf.errors.InvalidArgumentError, match="must sum to 1"):
        crf.crf_tensorflow(image, logits)
