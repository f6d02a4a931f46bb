"""The command-line tools as a user meets them: no TensorFlow log line on stderr,
only our own lines; DEEPLAB_TF_VERBOSE=1 brings TensorFlow's lines back."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

from deeplab_tf.console import VERBOSE_ENV, is_tensorflow_log_line
from tests.helpers import ROOT, tiny_model, write_model_dir

# No TF_CPP_MIN_LOG_LEVEL: a user's shell does not set it.
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", VERBOSE_ENV)},
    "PYTHONPATH": str(ROOT),
}


@pytest.mark.parametrize(
    "line",
    [
        "I0000 00:00:1796241638.296290    2766 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1796246672.470027    6197 cuda_platform.cc:52] failed call to cuInit: X",
        "W0000 00:00:1796246672.470027    6197 local_rendezvous.cc:405] Local rendezvous is "
        "aborting with status: OUT_OF_RANGE: End of sequence",
        "2024-01-01 10:00:00.123456: W tensorflow/core/framework/op_kernel.cc:1840] x",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild",
        "WARNING:absl:Found untraced functions such as _jit_compiled_convolution_op",
    ],
)
def test_tensorflow_log_lines_are_recognised(line):
    assert is_tensorflow_log_line(line.encode() + b"\n")


@pytest.mark.parametrize(
    "line",
    [
        "error: unknown variant 'deeplabv9'",
        "WARNING:deeplab_tf.training:class weights ignored",
        "Traceback (most recent call last):",
        "I0000 is not a log line without the rest",
    ],
)
def test_our_lines_pass(line):
    assert not is_tensorflow_log_line(line.encode() + b"\n")


def _run(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tiny_model(6), tmp_path_factory.mktemp("run"), data_dir=None)


# Every tool's --help through its installed entry point (``cli``), in one process (one
# TensorFlow import instead of one per tool); each exits with code 0.
HELP_ALL = """
import importlib, sys
from deeplab_tf.console import VERBOSE_ENV
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    try:
        importlib.import_module(f"deeplab_tf.cli.{name}").cli()
    except SystemExit as done:
        assert done.code == 0, (name, done.code)
"""


def test_a_cli_prints_only_its_own_output():
    # The installed scripts (pyproject.toml) name the tools.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    tools = sorted(target.split(":")[0].rsplit(".", 1)[1] for target in scripts.values())
    assert len(tools) == 10
    done = _run("-c", HELP_ALL, *tools)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == "", done.stderr[-2000:]
    helps = done.stdout.split("usage: ")[1:]
    assert len(helps) == len(tools)
    assert all(VERBOSE_ENV in text for text in helps)  # --help names the switch
    described = _run("describe.py", "--variant", "deeplabv3-resnet10-cpu")
    assert described.returncode == 0 and described.stderr == "", described.stderr[-2000:]


def test_predict_on_a_tiny_model_prints_nothing_on_stderr(model_dir, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    done = _run(
        "predict.py", "--checkpoint", str(model_dir), str(tmp_path / "photo.png"),
        "--output-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert (tmp_path / "out" / "photo.png").is_file()


def test_an_error_is_our_one_line():
    done = _run("train.py", "--variant", "deeplabv9")
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: unknown variant 'deeplabv9'"), done.stderr


def test_the_verbose_switch_brings_tensorflow_lines_back():
    # The import only: in an app, TensorFlow's first op still logs cuInit's failure on a
    # machine without a GPU (initialising devices during the import would break
    # MultiWorkerMirroredStrategy, which must be created first).
    code = "import deeplab_tf"
    quiet = _run("-c", code)
    loud = _run("-c", code, env={**ENV, VERBOSE_ENV: "1"})
    assert quiet.returncode == loud.returncode == 0
    assert quiet.stderr == "", quiet.stderr  # import deeplab_tf in an app: quiet import
    assert any(is_tensorflow_log_line(line.encode()) for line in loud.stderr.splitlines())
