"""Kill -9 a job where it has the most to lose, rerun the identical command: it continues
from what the killed run kept, ends with the same files as an uninterrupted run, and
leaves no temporary behind (issue 17, item 3).

Each job is killed once as a real subprocess (its work must be slow enough to be caught
in the middle: many images, many scales); the rerun and the uninterrupted reference run
in this process. Training (test_training) and export (test_export_cli) have their own.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import evaluate
import predict
import tune_crf
from deeplab_tf.data.shapes import ensure_shapes_tfrecords
from tests.data_helpers import (
    load_cli,
    random_image,
    random_label,
    read_records,
    write_jpeg,
    write_png,
)
from tests.helpers import ROOT, tiny_model, write_model_dir

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
# Every image at three times its size and flipped: about 20 ms per image here (one
# scale: one tracing), so the killed subprocess is caught with 24 images (0.5 s) left.
SLOW_INFERENCE = ["--scales", "3", "--flip"]
NUM_IMAGES = 32
KILL_AT = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return ensure_shapes_tfrecords(root, num_train=1, num_val=NUM_IMAGES - 1, image_size=64)


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory) -> Path:
    return write_model_dir(tiny_model(6), tmp_path_factory.mktemp("run") / "run", data)


def kill_when(script: str, args: list[str], ready: Callable[[], bool]) -> None:
    """Runs ``script`` with ``args`` in a subprocess and SIGKILLs it once ``ready()``."""
    command = [sys.executable, str(ROOT / script), *args, "--quiet"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not ready():
            if process.poll() is not None:
                stderr = process.stderr.read().decode()[-2000:]
                pytest.fail(f"{script} ended (code {process.returncode}) before the kill {stderr}")
            assert time.monotonic() < deadline, f"{script} never reached the kill point"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # Nothing of the killed job lives on: its worker processes (the CRF's pool) end
    # with it, within their one-second watch of the parent.
    deadline = time.monotonic() + 10
    while _processes_running(args[-1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_running(args[-1]), f"{script}'s processes outlived it"


def _processes_running(argument: str) -> list[int]:
    """PIDs of the processes with ``argument`` in their command line (Linux /proc)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if argument in entry.joinpath("cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return pids


def _count(path: Path, pattern: str) -> int:
    return len(list(path.glob(pattern))) if path.is_dir() else 0


def _npz_value(path: Path, key: str) -> int:
    try:
        with np.load(path) as saved:
            return int(saved[key])
    except (OSError, ValueError, KeyError):  # not written yet
        return 0


def _rerun(cli, capsys, args: list[str], quiet: bool = True) -> str:
    code = cli.main([*args, "--quiet"] if quiet else args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _without_timings(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("seconds", "images_per_second")}


def _same_files(a: Path, b: Path, compare: Callable[[Path, Path], None] | None = None) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*"))
    for name in names:
        if (a / name).is_file() and not (compare and compare(a / name, b / name)):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _no_temporaries(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


def test_evaluation_continues_from_its_counts(model_dir, tmp_path, capsys):
    args = ["--checkpoint", str(model_dir), "--trimap", "1,2", "--panels", "3", *SLOW_INFERENCE]
    _rerun(evaluate, capsys, [*args, "--output-dir", str(tmp_path / "reference")])
    out = tmp_path / "eval"
    counts = tmp_path / ".eval.partial" / ".job" / "counts.npz"
    kill_when("evaluate.py", [*args, "--output-dir", str(out)],
              lambda: _npz_value(counts, "done") >= KILL_AT)  # fmt: skip
    assert not out.exists()
    stdout = _rerun(evaluate, capsys, [*args, "--output-dir", str(out)])
    done = int(stdout.split("continuing: ")[1].split()[0])
    assert KILL_AT <= done < NUM_IMAGES, stdout

    def results_compare(a: Path, b: Path) -> bool:
        if a.name != "results.json":
            return False
        assert _without_timings(json.loads(a.read_text())) == _without_timings(
            json.loads(b.read_text())
        )
        return True

    _same_files(tmp_path / "reference", out, results_compare)
    _no_temporaries(tmp_path)


def test_folder_prediction_continues_with_the_images_left(data, model_dir, tmp_path, capsys):
    images = data.parent / "raw" / "JPEGImages"
    args = ["--checkpoint", str(model_dir), "--save-probabilities", *SLOW_INFERENCE, str(images)]
    _rerun(predict, capsys, [*args, "--output-dir", str(tmp_path / "reference")])
    out = tmp_path / "masks"
    records = tmp_path / ".masks.partial" / ".job"
    kill_when("predict.py", [*args, "--output-dir", str(out)],
              lambda: _count(records, "[0-9]*.json") >= KILL_AT)  # fmt: skip
    stdout = _rerun(predict, capsys, [*args, "--output-dir", str(out)])
    done = int(stdout.split("continuing: ")[1].split()[0])
    assert KILL_AT <= done < NUM_IMAGES, stdout

    def summary_compare(a: Path, b: Path) -> bool:
        if a.name != "summary.json":
            return False
        untimed = [json.loads(p.read_text()) for p in (a, b)]
        for summary in untimed:
            for image in summary["images"]:
                image.pop("seconds")
        assert untimed[0] == untimed[1]
        return True

    _same_files(tmp_path / "reference", out, summary_compare)
    _no_temporaries(tmp_path)


def test_crf_tuning_continues_its_search(model_dir, tmp_path, capsys):
    pytest.importorskip("pydensecrf")
    args = ["--checkpoint", str(model_dir), "--num-images", "12", "--rounds", "1",
            "--w1", "3:4", "--sa", "10:10:40", "--sb", "3:4", "--crf-workers", "1"]  # fmt: skip
    _rerun(tune_crf, capsys, [*args, "--output-dir", str(tmp_path / "reference")])
    out = tmp_path / "tuned"
    journal = out / ".crf_params.json.partial" / ".job" / "scored.json"

    def scored() -> int:
        try:
            return len(json.loads(journal.read_text()))
        except (OSError, ValueError):
            return 0

    kill_when("tune_crf.py", [*args, "--output-dir", str(out)], lambda: scored() >= 4)
    stdout = _rerun(tune_crf, capsys, [*args, "--output-dir", str(out)])
    assert "reusing the network's probabilities" in stdout
    done = int(stdout.split("continuing: ")[1].split()[0])
    assert 4 <= done < 16, stdout  # 2 x 4 x 2 sets

    def params_compare(a: Path, b: Path) -> bool:
        if a.name == "probabilities.npz":  # the key names the output directory
            with np.load(a) as x, np.load(b) as y:
                assert sorted(x) == sorted(y)
                for name in x:
                    if name != "key":
                        np.testing.assert_array_equal(x[name], y[name])
            return True
        if a.name != "crf_params.json":
            return False
        results = [json.loads(p.read_text()) for p in (a, b)]
        for r in results:
            del r["data_dir"], r["checkpoint"]
        assert results[0] == results[1]
        return True

    _same_files(tmp_path / "reference", out, params_compare)
    _no_temporaries(out)


def test_folder_build_keeps_the_finished_split_and_redoes_the_other(tmp_path, capsys):
    """Killed while writing the second split: the rerun keeps the first and writes the
    second again, byte for byte what an uninterrupted build writes."""
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    stems = [f"{i:04d}" for i in range(200)]
    for stem in stems:  # large enough that the second split takes a while to write
        write_jpeg(images / f"{stem}.jpg", random_image(rng, 192, 256))
        write_png(masks / f"{stem}.png", random_label(rng, 192, 256, 21))
    (tmp_path / "train.txt").write_text("\n".join(stems[:8]) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(stems[8:]) + "\n")
    args = ["--dataset", "pascal_voc_2012", "--images", str(images), "--masks", str(masks),
            "--split", f"train={tmp_path / 'train.txt'}", "--split",
            f"val={tmp_path / 'val.txt'}", "--num-shards", "4"]  # fmt: skip
    builder = load_cli("build_from_folders")
    _rerun(builder, capsys, [*args, "--output-dir", str(tmp_path / "reference")])
    out = tmp_path / "tfrecord"

    def train_built() -> bool:
        try:
            return "train" in json.loads((out / "manifest.json").read_text())["splits"]
        except (OSError, ValueError, KeyError):
            return False

    kill_when("datasets/build_from_folders.py", [*args, "--output-dir", str(out)], train_built)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train"]  # killed in the middle of val
    stdout = _rerun(builder, capsys, [*args, "--output-dir", str(out)], quiet=False)
    assert "split train: already built from the same images, kept" in stdout

    # Another process may serialise a record's features in another order: the shards
    # (same names) are compared record by record, decoded.
    _same_files(tmp_path / "reference", out, lambda a, b: a.suffix == ".tfrecord")
    for split in ("train", "val"):
        built, reference = read_records(out, split), read_records(tmp_path / "reference", split)
        assert len(built) == len(reference) == {"train": 8, "val": 192}[split]
        for x, y in zip(built, reference, strict=True):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    _no_temporaries(out)
