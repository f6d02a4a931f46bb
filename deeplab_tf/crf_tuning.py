"""``tune_crf.py``'s work: the dense CRF's parameters cross-validated on a split.

DeepLab v2 (section 4.1) fixes w2 = 3, sg = 3 and 10 mean-field iterations and finds
w1, sa and sb by a coarse-to-fine grid search on 100 validation images. Here:

1. the network's probabilities of the first N images of the split are computed once by
   a :class:`~deeplab_tf.inference.Predictor` and cached in
   ``OUTPUT_DIR/probabilities.npz`` with the images and labels; a rerun with the same
   checkpoint file, inference settings, data and N reuses them;
2. ``crf.search_params`` evaluates the grid in parallel workers, then finer rounds
   around the best (``crf.SearchGrid.around``);
3. ``OUTPUT_DIR/crf_params.json`` gets the best parameters with every evaluated row
   (``--crf-params`` of evaluate.py and predict.py reads it) and ``search.md`` the
   table of the best rows.

The grid's ranges are arguments: the paper's (sa 30..100 pixels) were chosen for
VOC's 500-pixel images; other image sizes may want others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deeplab_tf import crf
from deeplab_tf.data import pipeline
from deeplab_tf.evaluation import split_for
from deeplab_tf.files import PartialDir, atomic_file, write_json_atomic, write_text_atomic
from deeplab_tf.inference import InferenceError, Predictor
from deeplab_tf.progress import Progress

CACHE_FILE = "probabilities.npz"
PARAMS_FILE = "crf_params.json"
TABLE_FILE = "search.md"
DEFAULT_NUM_IMAGES = 100  # v2 paper, section 4.1


def parse_values(text: str, flag: str) -> tuple[float, ...]:
    """Grid values from comma-separated numbers and MATLAB ranges, the paper's notation:
    ``START:STEP:STOP`` (``30:10:100`` = 30, 40, ..., 100) or ``START:STOP`` (step 1);
    e.g. ``"3:6"``, ``"5,10,20:20:80"``."""
    values: list[float] = []
    for part in text.split(","):
        try:
            numbers = [float(v) for v in part.split(":")]
        except ValueError:
            raise ValueError(
                f"{flag} must be numbers or START:STEP:STOP ranges, got {text!r}"
            ) from None
        if len(numbers) == 1:
            values.append(numbers[0])
            continue
        if len(numbers) not in (2, 3) or not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{flag}: {part!r} is not a START:STEP:STOP range")
        start, step, stop = numbers if len(numbers) == 3 else (numbers[0], 1.0, numbers[1])
        if step <= 0 or stop < start:
            raise ValueError(f"{flag}: range {part!r} needs a positive step and STOP >= START")
        count = math.floor((stop - start) / step + 1e-9) + 1
        values.extend(start + i * step for i in range(count))
    return tuple(values)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``output_dir`` as a Path; refuses to replace earlier results without ``overwrite``
    (its cached probabilities are reused either way)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InferenceError(f"--output-dir {output_dir} is not a directory")
    if (output_dir / PARAMS_FILE).exists() and not overwrite:
        raise InferenceError(
            f"{output_dir / PARAMS_FILE} exists; pass --overwrite to replace it "
            "(the cached probabilities are reused)"
        )
    return output_dir


# === The cache of the network's probabilities ===


def _cache_key(predictor: Predictor, data_dir: str | os.PathLike, split: str, n: int):
    """What the cached probabilities depend on, as JSON; None for a model without a file."""
    model = predictor.identity()
    if model is None:
        return None
    key = {
        **model,
        "data_dir": str(Path(data_dir).resolve()),
        "split": split,
        "num_images": n,
    }
    return json.dumps(key, sort_keys=True)


def _read_cache(path: Path, key: str, n: int) -> list[tuple[np.ndarray, ...]] | None:
    """The n cached (image, probabilities, label) triples if ``path`` holds them for ``key``."""
    try:
        with np.load(path) as cache:
            if str(cache["key"]) != key:
                return None
            return [
                (cache[f"image_{i}"], cache[f"probabilities_{i}"], cache[f"label_{i}"])
                for i in range(n)
            ]
    except (OSError, ValueError, KeyError):  # damaged or of another layout: compute again
        return None


def _write_cache(path: Path, key: str, data: list[tuple[np.ndarray, ...]]) -> None:
    arrays: dict[str, Any] = {"key": np.array(key)}
    for i, (image, probabilities, label) in enumerate(data):
        arrays[f"image_{i}"], arrays[f"label_{i}"] = image, label
        arrays[f"probabilities_{i}"] = probabilities
    with atomic_file(path, "wb") as f:  # a file object: numpy adds no second suffix
        np.savez(f, **arrays)


def cached_probabilities(
    predictor: Predictor,
    data_dir: str | os.PathLike,
    split: str,
    num_images: int,
    cache_path: str | os.PathLike | None,
    progress: bool = True,
    stream=None,
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], bool]:
    """The (image uint8 [H, W, 3], probabilities float32 [H, W, C], label [H, W]) of the
    first ``num_images`` images of a split, and whether they came from ``cache_path``.

    Computed with ``predictor`` unless ``cache_path`` holds them for the same checkpoint
    file (path, size, modification time), inference settings, data and count; then
    written there (atomically; not for a predictor without a checkpoint file).
    """
    stream = stream or sys.stdout
    key = _cache_key(predictor, data_dir, split, num_images)
    path = None if cache_path is None or key is None else Path(cache_path)
    if path is not None and path.is_file():
        data = _read_cache(path, key, num_images)
        if data is not None:
            print(f"reusing the network's probabilities cached in {path}", file=stream, flush=True)
            return data, True
        print(f"{path} holds other probabilities; computing them again", file=stream, flush=True)
    # Each image's triple is kept as it comes (files.PartialDir): a rerun after a kill
    # computes only the images not kept yet.
    job = None if path is None else PartialDir(path, {"key": key})
    data = [] if job is None else _read_partial(job)
    if data:
        print(f"continuing: {len(data)} of {num_images} images already computed", file=stream)
    print(f"computing the network's probabilities of {num_images} images", file=stream, flush=True)
    meter = Progress(num_images, "images", stream=stream, initial=len(data)) if progress else None
    for image, label in pipeline.eval_examples(data_dir, split, num_images, skip=len(data)):
        image = np.clip(np.rint(image[0].numpy()), 0, 255).astype(np.uint8)
        data.append((image, predictor.predict(image), label[0].numpy().astype(np.uint8)))
        if job is not None:
            with atomic_file(job.state / f"{len(data) - 1:06d}.npz", "wb") as f:
                np.savez(f, *data[-1])
        if meter:
            meter.update()
    if path is not None:
        _write_cache(path, key, data)
        job.discard()
    return data, False


def _read_partial(job: PartialDir) -> list[tuple[np.ndarray, ...]]:
    """The triples an interrupted run kept, in order, up to the first missing one."""
    data = []
    if job.resumed:
        for i, path in enumerate(sorted(job.state.glob("[0-9]*.npz"))):
            if path.name != f"{i:06d}.npz":
                break
            with np.load(path) as saved:
                data.append(tuple(saved[f"arr_{k}"] for k in range(3)))
    return data


# === The search ===


def _search_progress(stream) -> Callable[[int, int], None]:
    """A ``search_params`` progress callback: one Progress meter per round."""
    meter: Progress | None = None

    def update(done: int, total: int) -> None:
        nonlocal meter
        if done == 0:  # a round starts
            meter = Progress(total, "CRF runs", stream=stream)
        else:
            meter.update(done)

    return update


def check_job(output_dir: str | os.PathLike, overwrite: bool, num_images: int, top: int) -> Path:
    """The checks of ``tune_crf`` that need no model, so that a command line fails before
    loading one: ``output_dir`` as a Path (``check_output_dir``), positive
    ``num_images`` and ``top``.

    Raises:
        InferenceError: a bad setting or existing results without ``overwrite``.
    """
    if num_images < 1:
        raise InferenceError(f"--num-images must be positive, got {num_images}")
    if top < 1:
        raise InferenceError(f"--top must be positive, got {top}")
    return check_output_dir(output_dir, overwrite)


def tune_crf(
    predictor: Predictor,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str = "val",
    *,
    num_images: int = DEFAULT_NUM_IMAGES,
    grid: crf.SearchGrid | None = None,
    base: crf.CRFParams | None = None,
    rounds: int = 2,
    backend: str = "auto",
    workers: int | None = None,
    overwrite: bool = False,
    top: int = 10,
    progress: bool = True,
    stream=None,
) -> crf.SearchResult:
    """Cross-validates w1, sa and sb on the first ``num_images`` images of a split (see
    the module docstring) and writes ``crf_params.json`` and ``search.md``.

    Args:
        predictor: the model and its inference settings (those of the evaluation the
            parameters are for).
        data_dir, split: TFRecords with the split's labels.
        output_dir: where the cache and results go.
        num_images: N; a split with fewer images gives all of them.
        grid: the first round (default: the v2 paper's w1 3..6, sa 30..100, sb 3..6).
        base: w2, sg and iterations (default ``CRFParams()``: 3, 3, 10).
        rounds: 1 + the number of refinements around the best.
        backend, workers: as ``crf.search_params``.
        overwrite: replace earlier results in ``output_dir``.
        top: rows of the printed table.
        progress: print progress lines with an ETA.
        stream: where the progress, messages and table go (stdout).

    Raises:
        InferenceError: bad settings, data, or existing results without ``overwrite``;
        ValueError: bad search settings.
    """
    stream = stream or sys.stdout
    output_dir = check_job(output_dir, overwrite, num_images, top)
    backend = crf.resolve_backend(backend)
    _, total = split_for(predictor, data_dir, split)
    num_images = min(num_images, total)
    data, _ = cached_probabilities(
        predictor, data_dir, split, num_images, output_dir / CACHE_FILE, progress, stream
    )
    images, probabilities, labels = zip(*data, strict=True)
    grid = grid or crf.SearchGrid()
    base = base or crf.CRFParams()
    # The parameter sets evaluated so far are kept as they come (files.PartialDir): a
    # rerun after a kill evaluates only the others, and ends with the same table.
    key = _cache_key(predictor, data_dir, split, num_images)
    job = None
    if key is not None:
        search = {"grid": dataclasses.asdict(grid), "base": base.to_dict(), "rounds": rounds}
        job = PartialDir(output_dir / PARAMS_FILE, {"key": key, **search, "backend": backend})
    journal = _Journal(job)
    if journal.known:
        print(f"continuing: {len(journal.known)} parameter sets already evaluated", file=stream)
    result = crf.search_params(
        images,
        probabilities,
        labels,
        predictor.num_classes,
        grid=grid,
        base=base,
        rounds=rounds,
        backend=backend,
        workers=workers,
        progress=_search_progress(stream) if progress else None,
        known=journal.known,
        on_scored=journal.add if job is not None else None,
    )
    table = crf.format_results_table(result, top)
    context = {
        "checkpoint": str(predictor.checkpoint.path) if predictor.checkpoint else None,
        "data_dir": str(data_dir),
        "split": split,
        "inference": predictor.settings(),
        "grid": {"w1": grid.w1, "sa": grid.sa, "sb": grid.sb},
        "rounds": rounds,
    }
    write_text_atomic(output_dir / TABLE_FILE, f"```\n{table}\n```\n")
    if job is not None:
        # Before the results: a kill between the two loses the journal (a rerun searches
        # again), never leaves it beside finished results (a rerun would refuse them).
        job.discard()
    crf.write_search_result(output_dir / PARAMS_FILE, result, **context)
    print(table, file=stream, flush=True)
    return result


class _Journal:
    """The summed confusion matrix of each evaluated parameter set, in ``job.state``."""

    def __init__(self, job: PartialDir | None):
        self.path = None if job is None else job.state / "scored.json"
        self.rows: list[dict[str, Any]] = []
        if job is not None and job.resumed and self.path.is_file():
            self.rows = json.loads(self.path.read_text())
        self.known = {
            crf.CRFParams.from_dict(row["params"]): np.array(row["confusion"]) for row in self.rows
        }

    def add(self, params: crf.CRFParams, confusion: np.ndarray) -> None:
        self.rows.append({"params": params.to_dict(), "confusion": confusion.tolist()})
        write_json_atomic(self.path, self.rows, indent=None)
