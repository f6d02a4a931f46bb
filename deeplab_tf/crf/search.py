"""The papers' coarse-to-fine grid search of the CRF's w1, sa and sb on cached probabilities
(v2 paper, section 4.1), scored by ``metrics``' confusion matrix and mean IoU."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeplab_tf.crf import pydensecrf_backend
from deeplab_tf.crf.backends import resolve_backend
from deeplab_tf.crf.mean_field import refine_tensorflow_many
from deeplab_tf.crf.params import CRFParams, check_inputs
from deeplab_tf.data.specs import IGNORE_LABEL
from deeplab_tf.files import write_json_atomic
from deeplab_tf.metrics import confusion_matrix, confusion_matrix_scores


@dataclasses.dataclass(frozen=True)
class SearchGrid:
    """Values of w1, sa and sb to try; defaults are the v2 paper's first round (section 4.1:
    w1 in [3:6], sa in [30:10:100], sb in [3:6], MATLAB notation)."""

    w1: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0)
    sa: tuple[float, ...] = tuple(float(v) for v in range(30, 101, 10))
    sb: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0)

    def __post_init__(self):
        for name in ("w1", "sa", "sb"):
            values = tuple(sorted({float(v) for v in getattr(self, name)}))
            if not values:
                raise ValueError(f"CRF search grid for {name} is empty")
            for value in values:  # CRFParams' checks: finite, sigmas > 0, weights >= 0
                CRFParams(**{name: value})
            object.__setattr__(self, name, values)

    def combinations(self, base: CRFParams) -> list[CRFParams]:
        """Every (w1, sa, sb) of the grid with ``base``'s w2, sg and iterations."""
        return [
            dataclasses.replace(base, w1=w1, sa=sa, sb=sb)
            for w1, sa, sb in itertools.product(self.w1, self.sa, self.sb)
        ]

    def around(self, best: CRFParams) -> SearchGrid:
        """The next, finer round: each axis with several values steps by half its smallest
        spacing around ``best`` (best - step/2, best, best + step/2, kept > 0 for sigmas
        and >= 0 for weights); a single-valued axis stays as it is."""
        axes = {}
        for name in ("w1", "sa", "sb"):
            values = getattr(self, name)
            centre = getattr(best, name)
            if len(values) < 2:
                axes[name] = values
                continue
            half = min(b - a for a, b in itertools.pairwise(values)) / 2
            candidates = (centre - half, centre, centre + half)
            axes[name] = tuple(v for v in candidates if v > 0 or (name == "w1" and v == 0))
        return SearchGrid(**axes)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Outcome of ``search_params``: the best parameters and every evaluated row.

    ``rows`` are dicts (w1, sa, sb, round, mean_iou, pixel_accuracy), best first;
    ``baseline_mean_iou`` is the score of the probabilities' argmax without CRF.
    """

    best: CRFParams
    best_mean_iou: float
    baseline_mean_iou: float
    rows: tuple[dict[str, float | int], ...]
    num_images: int
    backend: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``CRFParams.load`` reads its ``"params"`` entry."""
        return {
            "params": self.best.to_dict(),
            "mean_iou": self.best_mean_iou,
            "baseline_mean_iou": self.baseline_mean_iou,
            "num_images": self.num_images,
            "backend": self.backend,
            "results": list(self.rows),
        }


def write_search_result(path: str | Path, result: SearchResult, **context: Any) -> None:
    """Writes ``result.to_dict()`` (and ``context``: where the data came from) as JSON
    atomically; ``CRFParams.load`` and so ``--crf-params`` read the file."""
    write_json_atomic(path, {**result.to_dict(), **context})


def format_results_table(result: SearchResult, top: int = 10) -> str:
    """The ``top`` rows of a search as a plain-text table, best first."""
    lines = [
        f"CRF search on {result.num_images} images ({result.backend}): without CRF "
        f"mIoU {100 * result.baseline_mean_iou:.2f}; best {100 * result.best_mean_iou:.2f}",
        f"{'rank':>4} {'round':>5} {'w1':>6} {'sa':>7} {'sb':>6} {'mIoU':>7} {'pix acc':>7}",
    ]
    for rank, row in enumerate(result.rows[:top], start=1):
        lines.append(
            f"{rank:>4} {row['round']:>5} {row['w1']:>6.3g} {row['sa']:>7.4g} {row['sb']:>6.3g} "
            f"{100 * row['mean_iou']:>7.2f} {100 * row['pixel_accuracy']:>7.2f}"
        )
    return "\n".join(lines)


def search_params(
    images: Sequence[Any],
    probabilities: Sequence[Any],
    labels: Sequence[Any],
    num_classes: int,
    grid: SearchGrid | None = None,
    base: CRFParams | None = None,
    rounds: int = 2,
    backend: str = "auto",
    workers: int | None = None,
    ignore_label: int = IGNORE_LABEL,
    progress: Callable[[int, int], None] | None = None,
    known: Mapping[CRFParams, np.ndarray] | None = None,
    on_scored: Callable[[CRFParams, np.ndarray], None] | None = None,
) -> SearchResult:
    """Coarse-to-fine grid search of w1, sa, sb maximising mean IoU (v2 paper, sec. 4.1).

    Round 1 evaluates every combination of ``grid`` (the paper's ranges by default)
    with ``base``'s w2, sg and iterations (3, 3, 10: fixed in the paper); each later
    round evaluates ``grid.around(best)``, the step halved around the best so far.
    The score is the mean IoU of the confusion matrix summed over all images (the
    split's metric), so large and small images weigh by their pixels.

    Args:
        images, probabilities: the cached inputs of ``refine`` (uint8 [H, W, 3] and
            [H, W, C] per image; sizes may differ between images).
        labels: ground truth [H, W] per image; ``ignore_label`` pixels do not count.
        num_classes: C.
        rounds: 1 for the coarse grid only.
        backend: ``BACKENDS``; pydensecrf runs (combination, image) pairs in
            ``workers`` processes (default: the CPU count).
        progress: called as ``progress(done, total)`` with done = 0 when a round starts
            and after each evaluated pair.
        known: summed confusion matrices of parameter sets evaluated before (by an
            interrupted search of the same data): taken as they are, not evaluated.
        on_scored: called with each newly evaluated parameter set and its summed
            confusion matrix (to keep them for ``known``).
    """
    grid = grid or SearchGrid()
    base = base or CRFParams()
    if rounds < 1:
        raise ValueError(f"CRF search rounds must be >= 1, got {rounds}")
    if not len(images) == len(probabilities) == len(labels) or not len(images):
        raise ValueError(
            f"CRF search needs as many images, probability maps and labels (>= 1); got "
            f"{len(images)}, {len(probabilities)}, {len(labels)}"
        )
    data = []
    for i, (image, probs, label) in enumerate(zip(images, probabilities, labels, strict=True)):
        image, probs = check_inputs(image, probs)
        label = np.asarray(label)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"labels of image {i} are {list(label.shape)}, expected {list(image.shape[:2])}"
            )
        if probs.shape[-1] != num_classes:
            raise ValueError(
                f"probabilities of image {i} have {probs.shape[-1]} classes, expected {num_classes}"
            )
        bad = (label != ignore_label) & ((label < 0) | (label >= num_classes))
        if bad.any():
            raise ValueError(f"labels of image {i} hold values outside 0..{num_classes - 1}")
        data.append((image, probs, label.astype(np.int64)))
    backend = resolve_backend(backend)
    known = dict(known or {})
    baseline = sum(
        confusion_matrix(label, probs.argmax(-1), num_classes, ignore_label)
        for _, probs, label in data
    )
    scores: dict[CRFParams, tuple[int, dict[str, float]]] = {}
    best = None
    with pydensecrf_backend.worker_pool(backend, workers, data) as pool:
        for round_number in range(1, rounds + 1):
            if round_number > 1:
                grid = grid.around(best)
            todo = [p for p in grid.combinations(base) if p not in scores]
            computed = _evaluate(
                [p for p in todo if p not in known],
                data, num_classes, ignore_label, backend, pool, progress, on_scored,
            )  # fmt: skip
            for params in todo:  # in the grid's order, known or not: the same ties
                confusion = known[params] if params in known else computed[params]
                scores[params] = (round_number, _scores(confusion))
            best = max(scores, key=lambda p: scores[p][1]["mean_iou"])  # first of equals

    rows = [{"w1": p.w1, "sa": p.sa, "sb": p.sb, "round": r, **s} for p, (r, s) in scores.items()]
    rows.sort(key=lambda row: -row["mean_iou"])  # stable: evaluation order breaks ties
    return SearchResult(
        best=best,
        best_mean_iou=scores[best][1]["mean_iou"],
        baseline_mean_iou=_scores(baseline)["mean_iou"],
        rows=tuple(rows),
        num_images=len(data),
        backend=backend,
    )


def _scores(confusion: np.ndarray) -> dict[str, float]:
    scores = confusion_matrix_scores(confusion)
    return {k: float(scores[k]) for k in ("mean_iou", "pixel_accuracy")}


def _evaluate(
    todo, data, num_classes, ignore_label, backend, pool, progress, on_scored=None
) -> dict[CRFParams, np.ndarray]:
    """Summed confusion matrix of each parameter set in ``todo`` over ``data``;
    ``on_scored(params, matrix)`` as each set's last image is done."""
    if not todo:  # all known (a resumed search)
        return {}
    # The TensorFlow backend refines an image for all the sets sharing the kernels'
    # widths at once: its lattices are built once per (sa, sb, sg), not once per w1.
    groups: dict[Any, list[CRFParams]] = {}
    for params in todo:
        key = params if backend == "pydensecrf" else (params.sa, params.sb, params.sg)
        groups.setdefault(key, []).append(params)
    tasks = [(group, i) for group in groups.values() for i in range(len(data))]
    if backend == "pydensecrf":
        confusions = pool.map(
            _confusion_task,
            [group[0] for group, _ in tasks],
            [i for _, i in tasks],
            itertools.repeat(num_classes),
            itertools.repeat(ignore_label),
            chunksize=max(1, len(tasks) // 64),  # a few chunks per worker: balance
        )
        results = ([confusion] for confusion in confusions)
    else:

        def task(group, i):
            refined = refine_tensorflow_many(data[i][0], data[i][1], group)
            return [
                confusion_matrix(data[i][2], q.argmax(-1), num_classes, ignore_label)
                for q in refined
            ]

        results = pool.map(task, *zip(*tasks, strict=True))
    totals = {params: np.zeros((num_classes, num_classes), np.int64) for params in todo}
    total, done = len(todo) * len(data), 0
    if progress is not None:
        progress(0, total)  # the round starts
    for (group, i), confusions in zip(tasks, results, strict=True):
        for params, confusion in zip(group, confusions, strict=True):
            totals[params] += confusion
            if on_scored is not None and i == len(data) - 1:  # tasks come group by group
                on_scored(params, totals[params])
            done += 1
            if progress is not None:
                progress(done, total)
    return totals


def _confusion_task(params: CRFParams, index: int, num_classes: int, ignore_label: int):
    image, probabilities, label = pydensecrf_backend.WORKER_DATA[index]
    prediction = pydensecrf_backend.refine_pydensecrf(image, probabilities, params).argmax(-1)
    return confusion_matrix(label, prediction, num_classes, ignore_label)
