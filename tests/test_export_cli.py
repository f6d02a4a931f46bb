import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import export
from tests.helpers import ROOT, tiny_model, write_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model directory as training leaves it (crop size 96 in its config.json)."""
    return write_model_dir(tiny_model(6), tmp_path_factory.mktemp("run") / "run", data_dir=None)


def _run(capsys, *args):
    code = export.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _one_line_error(capsys, *args) -> str:
    code, _, err = _run(capsys, *args)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (code, err)
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "onnx"], "--format must be one or more of savedmodel, tflite, keras, all"),
        (["--format", "tflite", "--quantize", "int4"], "--quantize must be one or more of"),
        (["--format", "tflite", "--input-size", "0"], "--input-size must be H or H,W"),
        (["--format", "tflite", "--quantize", "int8"], "--data-dir is required for int8"),
        (["--format", "keras", "--input-size", "64"], "apply to --format tflite only"),
        (["--version", "0", "--format", "keras"], "--version must be a positive integer"),
        (["--name", "a/b"], "--name must be a plain directory name"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, model_dir, tmp_path, args, message):
    err = _one_line_error(capsys, "--model-dir", model_dir, "--export-dir", tmp_path, *args)
    assert message in err, err
    assert not list(tmp_path.rglob("*.keras")) and not list(tmp_path.rglob("*.pb"))


def test_missing_checkpoint(capsys, tmp_path):
    err = _one_line_error(capsys, "--model-dir", tmp_path / "nope", "--export-dir", tmp_path)
    assert "--model-dir" in err and "nope" in err


def test_crf_and_max_image_size_reach_the_savedmodel(capsys, model_dir, tmp_path):
    import tensorflow as tf

    args = ["--model-dir", model_dir, "--export-dir", tmp_path, "--crf", "--max-image-size", "64"]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    version = tmp_path / "tiny" / "1"
    manifest = json.loads((version / "export.json").read_text())
    assert manifest["inference"]["crf"] is True and "with the dense CRF" in out
    assert manifest["formats"]["savedmodel"]["max_image_size"] == 64
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    assert serve(images=tf.zeros([1, 64, 40, 3], tf.uint8))["labels"].shape == (1, 64, 40)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1 <= H, W <= 64"):
        serve(images=tf.zeros([1, 65, 40, 3], tf.uint8))


def test_versions_are_never_replaced_without_overwrite(capsys, model_dir, tmp_path):
    version = tmp_path / "tiny" / "1"
    version.mkdir(parents=True)
    (version / "saved_model.pb").write_text("mine")
    args = ["--model-dir", model_dir, "--export-dir", tmp_path, "--format", "keras", "tflite"]

    err = _one_line_error(capsys, *args, "--version", "1")
    assert "--version 1" in err and "pass --overwrite" in err
    assert [p.name for p in version.iterdir()] == ["saved_model.pb"]
    assert (version / "saved_model.pb").read_text() == "mine"

    code, out, err = _run(capsys, *args, "--version", "1", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in version.iterdir()) == [
        "export.json", "model.keras", "model_float32.tflite",
    ]  # fmt: skip
    assert f"TFLite float32: {version / 'model_float32.tflite'}" in out  # paths are printed
    assert f"Keras: {version / 'model.keras'}" in out and "input 96x96" in out  # crop size
    manifest = json.loads((version / "export.json").read_text())
    assert manifest["formats"]["tflite"]["input_size"] == [96, 96]
    assert manifest["class_names"] == [f"class {i}" for i in range(6)]  # no dataset known

    code, out, err = _run(capsys, "--model-dir", model_dir, "--export-dir", tmp_path,
                          "--format", "keras", "--output-stride", "8")  # fmt: skip
    assert code == 0, err  # the next version
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["1", "2"]
    rebuilt = keras.models.load_model(tmp_path / "tiny" / "2" / "model.keras")
    assert rebuilt.get_layer("aspp").rates == (12, 24, 36)  # OS8 rates of the same weights
    x = np.random.default_rng(0).uniform(0, 255, (1, 37, 45, 3)).astype("float32")
    assert rebuilt(x).shape == (1, 37, 45, 6)
    assert not list((tmp_path / "tiny").glob(".*"))  # no temporary directory left


def test_killed_export_leaves_no_version_directory(model_dir, tmp_path, capsys):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "export.py"), "--model-dir", str(model_dir),
               "--export-dir", str(tmp_path), "--format", "savedmodel"]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = tmp_path / "tiny"
    try:
        deadline = time.monotonic() + 120
        while not (base.is_dir() and list(base.glob(".1.tmp-*"))):
            assert process.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline, "the export never started writing"
            time.sleep(0.05)
        time.sleep(0.5)  # in the middle of tracing and writing the SavedModel
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (base / "1").exists()
    assert [p.name for p in base.iterdir() if not p.name.startswith(".")] == []

    code, _, err = _run(capsys, "--model-dir", model_dir, "--export-dir", tmp_path,
                        "--format", "keras")  # fmt: skip
    assert code == 0, err  # the leftover temporary directory is no version
    assert (base / "1" / "model.keras").is_file()
    assert not list(base.glob(".*"))  # and the rerun removed the killed one's temporary
