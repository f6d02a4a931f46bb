"""Kill -9 every job at many points, rerun the identical command (not a test).

    python bench/kill.py [--points 5] [--jobs make_shapes,build_from_folders,...] [--work DIR]

For each job, one uninterrupted run (the reference, and its duration T), then for each
of ``--points`` moments spread over (0, T) (after the process starts, so TensorFlow's
import is part of it): start the job, SIGKILL it at that moment, rerun the identical
command to its end. One JSON line per (job, moment): when it was killed, whether the
rerun continued earlier work (its output says "continuing", "resuming" or "kept"), its
exit code and seconds (a job killed after its output was complete is refused by the
rerun, "exists; pass --overwrite": counted as finished), whether its outputs equal the
reference's (timings and paths aside), and
the temporaries or partial directories left anywhere in the work directory afterwards.

Jobs: make_shapes, build_from_folders, train, evaluate, predict, tune_crf, export. The
VOC and Cityscapes builders write through the same ``build_split`` as
build_from_folders. Small sizes: the whole run takes some minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe_machine  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # this process reads shards too
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# What a rerun says when it continues (training, partial jobs, builders, make_shapes).
CONTINUED = ("continuing", "resuming from the backup", ", kept", "reusing")


def _json(path: Path, drop: tuple[str, ...] = ()) -> object:
    """A JSON file without the keys in ``drop``, at any depth."""

    def without(value: object) -> object:
        if isinstance(value, dict):
            return {k: without(v) for k, v in value.items() if k not in drop}
        if isinstance(value, list):
            return [without(v) for v in value]
        return value

    return without(json.loads(path.read_text()))


def _tree(root: Path) -> dict[str, object]:
    """A comparable summary of an output tree: JSON files without timings or paths,
    TFRecord shards by their decoded records, other files by their bytes."""
    import tensorflow as tf

    summary: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(root))
        if path.suffix == ".json":
            summary[name] = _json(
                # timings, paths, and the sizes of SavedModel files (graphs vary)
                path,
                ("seconds", "images_per_second", "data_dir", "checkpoint", "bytes"),
            )
        elif path.suffix == ".tfrecord":  # the feature map's order varies between processes
            summary[name] = [
                sorted(tf.train.Example.FromString(r.numpy()).features.feature.items())
                for r in tf.data.TFRecordDataset(str(path))
            ]
            summary[name] = [[(k, str(v)) for k, v in rec] for rec in summary[name]]
        elif path.suffix in (".npz", ".keras", ".pb") or "variables" in name:
            # Cache keys hold paths; SavedModel graphs name functions per process.
            summary[name] = "present"
        else:
            summary[name] = path.read_bytes()
    return summary


def _leftovers(work: Path) -> list[str]:
    return sorted(
        str(p.relative_to(work))
        for p in work.rglob(".*")
        if ".tmp-" in p.name or p.name.endswith(".partial") or ".old-" in p.name
    )


def _run(command: list[str], kill_after: float | None = None) -> tuple[int, str, float]:
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if kill_after is None:
        output, _ = process.communicate()
        return process.returncode, output, time.perf_counter() - start
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    output, _ = process.communicate()
    return process.returncode, output, time.perf_counter() - start


def prepare(work: Path) -> dict[str, tuple[list[str], Path, Callable[[], None]]]:
    """The jobs: (command, output to compare, reset before each run)."""
    from PIL import Image

    py = sys.executable
    shapes = work / "shapes"
    code, output, _ = _run([py, str(ROOT / "datasets/make_shapes.py"), "--output-dir",
                            str(shapes / "raw"), "--tfrecord-dir", str(shapes / "tfrecord"),
                            "--num-train", "64", "--num-val", "32", "--image-size", "64",
                            "--quiet"])  # fmt: skip
    assert code == 0, output
    folders = work / "folders"
    (folders / "images").mkdir(parents=True)
    (folders / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        rgb = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folders / "images" / f"{i:04d}.jpg", quality=90)
        label = rng.integers(0, 21, (160, 200), dtype=np.uint8)
        Image.fromarray(label).save(folders / "masks" / f"{i:04d}.png")
    (folders / "train.txt").write_text("\n".join(f"{i:04d}" for i in range(150)) + "\n")
    (folders / "val.txt").write_text("\n".join(f"{i:04d}" for i in range(150, 300)) + "\n")
    model = work / "model"
    code, output, _ = _run([py, str(ROOT / "train.py"), "--variant", "deeplabv3-resnet10-cpu",
                            "--data-dir", str(shapes / "tfrecord"), "--model-dir", str(model),
                            "--crop-size", "64", "--batch-size", "4", "--steps", "20"])  # fmt: skip
    assert code == 0, output
    images = shapes / "raw" / "JPEGImages"
    inference = ["--checkpoint", str(model), "--scales", "0.75,1,1.25", "--flip"]
    out = work / "out"

    def clear(*paths: Path) -> Callable[[], None]:
        def reset() -> None:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
            for left in _leftovers(work):
                shutil.rmtree(work / left, ignore_errors=True)

        return reset

    return {
        "make_shapes": (
            [py, str(ROOT / "datasets/make_shapes.py"), "--output-dir", str(out / "shapes"),
             "--tfrecord-dir", str(out / "shapes-tfrecord"), "--num-train", "300",
             "--num-val", "100", "--image-size", "96"],
            out, clear(out),
        ),
        "build_from_folders": (
            [py, str(ROOT / "datasets/build_from_folders.py"), "--dataset", "pascal_voc_2012",
             "--images", str(folders / "images"), "--masks", str(folders / "masks"),
             "--split", f"train={folders / 'train.txt'}", "--split",
             f"val={folders / 'val.txt'}", "--num-shards", "4", "--output-dir",
             str(out / "tfrecord")],
            out, clear(out),
        ),
        "train": (
            [py, str(ROOT / "train.py"), "--variant", "deeplabv3-resnet10-cpu", "--data-dir",
             str(shapes / "tfrecord"), "--model-dir", str(out / "run"), "--crop-size", "64",
             "--batch-size", "4", "--steps", "60", "--checkpoint-every", "10"],
            out / "run" / "results.json", clear(out),
        ),
        "evaluate": (
            [py, str(ROOT / "evaluate.py"), *inference, "--trimap", "1,2,5",
             "--output-dir", str(out / "eval")],
            out, clear(out),
        ),
        "predict": (
            [py, str(ROOT / "predict.py"), *inference, "--output-dir", str(out / "masks"),
             str(images)],
            out, clear(out),
        ),
        "tune_crf": (
            [py, str(ROOT / "tune_crf.py"), "--checkpoint", str(model), "--num-images", "32",
             "--w1", "3:6", "--sa", "10:10:40", "--sb", "3:6", "--output-dir",
             str(out / "crf")],
            out, clear(out),
        ),
        "export": (
            [py, str(ROOT / "export.py"), "--model-dir", str(model), "--export-dir",
             str(out / "exports"), "--format", "savedmodel", "keras", "--version", "1"],
            out, clear(out),
        ),
    }  # fmt: skip


def same(job: str, reference: object, output: Path) -> bool:
    if job == "train":  # steps and files; the scores of a resumed run are not bitwise
        result = _json(output)
        return result["steps"] == reference["steps"]  # type: ignore[index]
    return _tree(output) == reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=5, help="kill moments per job")
    parser.add_argument("--jobs", help="comma-separated (default: all)")
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="deeplab-kill-"))
    jobs = prepare(work)
    chosen = args.jobs.split(",") if args.jobs else list(jobs)
    machine = {"machine": describe_machine()}
    for job in chosen:
        command, output, reset = jobs[job]
        reset()
        code, text, seconds = _run(command)
        assert code == 0, text[-2000:]
        reference = _json(output) if job == "train" else _tree(output)
        for point in range(1, args.points + 1):
            kill_after = seconds * point / (args.points + 1)
            reset()
            killed_code, _, _ = _run(command, kill_after)
            code, text, rerun_seconds = _run(command)
            error = text.strip().splitlines()[-1] if code and text.strip() else None
            # Killed after its output was complete: the rerun refuses to replace it.
            finished = code == 2 and error is not None and "exists; pass --overwrite" in error
            row = {
                "job": job,
                "uninterrupted_s": round(seconds, 2),
                "killed_at_s": round(kill_after, 2),
                "killed": killed_code == -signal.SIGKILL,
                "rerun_code": code,
                "rerun_s": round(rerun_seconds, 2),
                "continued": any(word in text for word in CONTINUED),
                "finished_before_kill": finished,
                "same_outputs": (code == 0 or finished) and same(job, reference, output),
                "leftovers": _leftovers(work),
                "error": error,
                **machine,
            }
            print(json.dumps(row), flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
