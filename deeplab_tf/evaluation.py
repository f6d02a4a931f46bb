"""Evaluation: the scores of a :class:`~deeplab_tf.inference.Predictor` on a dataset split.

Scores come from confusion matrices accumulated over the whole split at the labels'
full resolution, with pixels labelled 255 never counted (``deeplab_tf.metrics``:
mean IoU, per-class IoU, pixel accuracy, mean class accuracy, frequency-weighted IoU).

Boundary accuracy (the "trimap" of the v1 paper, section 5, and v2, Fig. 10): the same
scores restricted to the pixels within ``w`` pixels of a boundary, for each band
width ``w``. Distances are **Euclidean** between pixel centres (a pixel is in the band
of width w when sqrt(dy^2 + dx^2) <= w to some boundary pixel; boundary pixels
themselves are at distance 0). The boundary is

* ``"ignore"``: the pixels labelled 255, for datasets whose annotations have a void
  band along object boundaries (VOC, shapes; ``DatasetSpec.void_boundaries``), as the
  papers did: "pixels that are located within a narrow band of 'void' labels";
* ``"edges"``: otherwise, both pixels of every pair of 4-neighbours with different
  label values.

``evaluate`` runs a split; training's final validation and ``evaluate.py`` both call it.
With ``crf_params`` it also scores the dense-CRF refinement (``deeplab_tf.crf``) of the
same probabilities, so one pass of the network gives the scores before and after CRF.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from deeplab_tf import crf, visualize
from deeplab_tf.data import pipeline
from deeplab_tf.data.specs import IGNORE_LABEL
from deeplab_tf.files import PartialDir, atomic_file, replace_dir, temporary_dir
from deeplab_tf.inference import InferenceError, Predictor
from deeplab_tf.metrics import MeanIoU
from deeplab_tf.progress import Progress

TRIMAP_SOURCES = ("auto", "ignore", "edges")
DEFAULT_TRIMAP_WIDTHS = (1, 2, 5, 10, 20, 40)
SCORE_KEYS = ("mean_iou", "pixel_accuracy", "mean_class_accuracy", "frequency_weighted_iou")


# === Boundaries ===


def boundary_pixels(label: np.ndarray, source: str) -> np.ndarray:
    """bool [H, W]: the boundary pixels of a label map (``"ignore"`` or ``"edges"``)."""
    label = np.asarray(label)
    if source == "ignore":
        return label == IGNORE_LABEL
    if source != "edges":
        raise ValueError(f"boundary source must be 'ignore' or 'edges', got {source!r}")
    boundary = np.zeros(label.shape, bool)
    vertical = label[1:] != label[:-1]
    horizontal = label[:, 1:] != label[:, :-1]
    boundary[1:] |= vertical
    boundary[:-1] |= vertical
    boundary[:, 1:] |= horizontal
    boundary[:, :-1] |= horizontal
    return boundary


def distance_to_boundary(boundary: np.ndarray) -> np.ndarray:
    """float [H, W]: Euclidean distance of each pixel to the nearest boundary pixel
    (0 on the boundary, inf everywhere when there is none)."""
    boundary = np.asarray(boundary, bool)
    if not boundary.any():
        return np.full(boundary.shape, np.inf)
    return ndimage.distance_transform_edt(~boundary)


def trimap_band(label: np.ndarray, width: float, source: str) -> np.ndarray:
    """bool [H, W]: the pixels within ``width`` pixels of a boundary of ``label``."""
    return distance_to_boundary(boundary_pixels(label, source)) <= width


# === Accumulating scores ===


def scores_to_json(scores: dict[str, Any]) -> dict[str, Any]:
    """``confusion_matrix_scores`` values as plain JSON (NaN -> None)."""

    def plain(value: Any) -> Any:
        value = np.asarray(value)
        if value.ndim:
            return [plain(v) for v in value]
        value = float(value)
        return None if math.isnan(value) else value

    return {key: plain(value) for key, value in scores.items()}


class Evaluator:
    """Confusion matrices of label/prediction pairs: over all pixels and per trimap band.

    Args:
        num_classes: C.
        trimap_widths: band widths in pixels (empty: no boundary scores).
        trimap_source: ``"ignore"`` or ``"edges"`` (see the module docstring).
    """

    def __init__(
        self, num_classes: int, trimap_widths: Sequence[float] = (), trimap_source: str = "edges"
    ):
        if trimap_source not in ("ignore", "edges"):
            raise ValueError(f"trimap_source must be 'ignore' or 'edges', got {trimap_source!r}")
        widths = tuple(trimap_widths)
        if any(not w > 0 for w in widths):
            raise ValueError(f"trimap widths must be positive, got {list(widths)}")
        self.num_classes = num_classes
        self.trimap_widths = widths
        self.trimap_source = trimap_source
        self.metric = MeanIoU(num_classes)
        self.trimap_metrics = {w: MeanIoU(num_classes) for w in widths}
        self.trimap_pixels = dict.fromkeys(widths, 0)

    def update(self, label: np.ndarray, prediction: np.ndarray) -> None:
        """Adds one image: label and prediction [H, W] class ids (label 255 = ignore)."""
        label = np.asarray(label)
        prediction = np.asarray(prediction)
        if label.shape != prediction.shape:
            raise ValueError(f"label {label.shape} and prediction {prediction.shape} differ")
        self.metric.update_state(label[None], prediction[None])
        if not self.trimap_widths:
            return
        distance = distance_to_boundary(boundary_pixels(label, self.trimap_source))
        counted = label != IGNORE_LABEL
        for width, metric in self.trimap_metrics.items():
            band = distance <= width
            self.trimap_pixels[width] += int((band & counted).sum())
            metric.update_state(label[None], prediction[None], sample_weight=band[None])

    def state(self) -> dict[str, np.ndarray]:
        """The counts so far (``restore`` takes them back: a resumed evaluation)."""
        state = {"confusion": self.metric.confusion_matrix.numpy()}
        for i, metric in enumerate(self.trimap_metrics.values()):
            state[f"trimap_confusion_{i}"] = metric.confusion_matrix.numpy()
        state["trimap_pixels"] = np.array(list(self.trimap_pixels.values()), np.int64)
        return state

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.metric.confusion_matrix.assign(state["confusion"])
        for i, (width, metric) in enumerate(self.trimap_metrics.items()):
            metric.confusion_matrix.assign(state[f"trimap_confusion_{i}"])
            self.trimap_pixels[width] = int(state["trimap_pixels"][i])

    def results(self) -> dict[str, Any]:
        """JSON-ready scores, confusion matrix and, with widths, the trimap scores."""
        results = {
            **scores_to_json(self.metric.scores()),
            "confusion_matrix": self.metric.confusion_matrix.numpy().astype(np.int64).tolist(),
        }
        if self.trimap_widths:
            results["trimap"] = {
                "source": self.trimap_source,
                "distance": "euclidean",
                "widths": list(self.trimap_widths),
                "scores": {
                    f"{w:g}": {**scores_to_json(m.scores()), "pixels": self.trimap_pixels[w]}
                    for w, m in self.trimap_metrics.items()
                },
            }
        return results


# === A dataset split ===


def split_for(predictor: Predictor, data_dir: str | os.PathLike, split: str):
    """(dataset spec, number of images) of a TFRecord split that ``predictor`` can score.

    Raises:
        InferenceError: no manifest or split, or the model's classes differ from the data's.
    """
    try:
        spec = pipeline.dataset_spec(data_dir)
        total = pipeline.num_examples(data_dir, split)
    except ValueError as error:  # names the manifest or the split
        raise InferenceError(str(error).splitlines()[0]) from None
    if predictor.num_classes != spec.num_classes:
        where = f"{predictor.checkpoint.path}: " if predictor.checkpoint else ""
        raise InferenceError(
            f"{where}the model predicts {predictor.num_classes} classes but dataset "
            f"{spec.name!r} in {data_dir} has {spec.num_classes}"
        )
    return spec, total


@dataclasses.dataclass
class Evaluation:
    """The outcome of :func:`evaluate`: JSON-ready ``results`` and a few picture panels
    (image | ground truth | prediction [| prediction after CRF], uint8)."""

    results: dict[str, Any]
    panels: list[np.ndarray] = dataclasses.field(default_factory=list)


def evaluate(
    predictor: Predictor,
    data_dir: str | os.PathLike,
    split: str = "val",
    *,
    trimap_widths: Sequence[float] = (),
    trimap_source: str = "auto",
    max_images: int | None = None,
    num_panels: int = 0,
    progress: bool = True,
    crf_params: crf.CRFParams | None = None,
    crf_backend: str = "auto",
    crf_workers: int | None = None,
    job: PartialDir | None = None,
) -> Evaluation:
    """Scores ``predictor`` on every image of a TFRecord split at full label resolution.

    Args:
        predictor: the model and its inference settings.
        data_dir: TFRecords with a manifest (``datasets/*.py``).
        split: split name.
        trimap_widths: band widths for boundary scores (the papers: 1..40 pixels).
        trimap_source: ``"auto"`` (the ignore band where the dataset declares one,
            else label edges), ``"ignore"`` or ``"edges"``.
        max_images: evaluate only the first images (a quick look, not a score).
        num_panels: keep picture panels of the first images.
        progress: print progress lines with an ETA.
        crf_params: also refine each image's probabilities with the dense CRF and
            score the refined labels (``results["crf"]``: the same scores and trimap,
            the parameters, backend and seconds); the network runs once per image.
        crf_backend: ``deeplab_tf.crf.BACKENDS``.
        crf_workers: images refined at once (default: the CPU count); the network's
            probabilities of that many images are held while they are refined.
        job: keep the counts in ``job.state`` after every scored image, and continue
            from them when ``job.resumed`` (``evaluate_into``).

    Raises:
        InferenceError: the model's classes do not match the dataset's, or a bad setting.
    """
    if trimap_source not in TRIMAP_SOURCES:
        raise InferenceError(f"trimap source must be one of {list(TRIMAP_SOURCES)}")
    if crf_params is not None:
        crf_backend = crf.resolve_backend(crf_backend)  # once: the log line says which
    spec, total = split_for(predictor, data_dir, split)
    if trimap_source == "auto":
        trimap_source = "ignore" if spec.void_boundaries else "edges"
    if max_images is not None:
        total = min(total, max_images)
    evaluator = Evaluator(spec.num_classes, trimap_widths, trimap_source)
    refiner = (
        None
        if crf_params is None
        else _CRFScorer(
            Evaluator(spec.num_classes, trimap_widths, trimap_source),
            crf_params,
            crf_backend,
            crf_workers,
        )
    )
    colours = visualize.palette(spec)
    saved = _EvaluationState(job, evaluator, refiner)
    done, panels, earlier_seconds = 0, [], 0.0
    if job is not None and job.resumed:
        done, panels, earlier_seconds = saved.restore()
    if done:
        print(f"continuing: {done} of {total} images already scored", flush=True)
    meter = Progress(total, "images", initial=done) if progress else None
    start = time.perf_counter()
    for image, label in pipeline.eval_examples(data_dir, split, total, skip=done):
        image, label = image[0].numpy(), label[0].numpy()
        keep_panel = done < num_panels
        done += 1
        if refiner is None:
            prediction = predictor.predict_labels(image)
            if keep_panel:
                panels.append(visualize.panels(image, [label, prediction], colours))
        else:
            probabilities = predictor.predict(image)
            prediction = probabilities.argmax(-1)
            refiner.add(image, probabilities, label, keep_panel)
        evaluator.update(label, prediction)
        if refiner is not None:
            panels += [visualize.panels(image, maps, colours) for image, maps in refiner.drawn()]
        if job is not None and (refiner is None or not refiner.pending):
            saved.save(done, panels, earlier_seconds + time.perf_counter() - start)
        if meter:
            meter.update(done)
    if refiner is not None:
        refiner.flush()
        panels += [visualize.panels(image, maps, colours) for image, maps in refiner.drawn()]
    seconds = earlier_seconds + time.perf_counter() - start
    results = {
        "dataset": spec.name,
        "data_dir": str(data_dir),
        "split": split,
        "num_images": total,
        "seconds": round(seconds, 2),
        "images_per_second": round(total / seconds, 3) if seconds > 0 else None,
        "checkpoint": str(predictor.checkpoint.path) if predictor.checkpoint else None,
        "inference": predictor.settings(),
        "class_names": list(spec.class_names),
        **evaluator.results(),
    }
    if refiner is not None:
        results["crf"] = refiner.results()
    return Evaluation(results, panels)


class _CRFScorer:
    """Refines images with the dense CRF a chunk at a time (``crf.refine_many`` runs a
    chunk in parallel workers) and scores the refined labels."""

    def __init__(
        self, evaluator: Evaluator, params: crf.CRFParams, backend: str, workers: int | None
    ):
        self.evaluator = evaluator
        self.params = params
        self.backend = backend
        self.workers = workers or os.cpu_count() or 1
        # A few images per worker keep the workers busy without holding many images.
        self.chunk = 4 * self.workers
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []
        self.panels: list[tuple[np.ndarray, list[np.ndarray]]] = []  # (image, label maps)
        self.seconds = 0.0

    def add(self, image, probabilities, label, keep_panel: bool = False) -> None:
        """Queues one image (float or uint8 RGB) with the network's probabilities;
        ``keep_panel``: keep image | label | prediction | CRF prediction in ``panels``."""
        rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        self.pending.append((rgb, probabilities, label, keep_panel))
        if len(self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        """Refines and scores the queued images."""
        if not self.pending:
            return
        start = time.perf_counter()
        images, probabilities, labels, keep = zip(*self.pending, strict=True)
        refined = crf.refine_many(images, probabilities, self.params, self.backend, self.workers)
        self.seconds += time.perf_counter() - start
        for image, p, q, label, keep_panel in zip(
            images, probabilities, refined, labels, keep, strict=True
        ):
            after = q.argmax(-1)
            self.evaluator.update(label, after)
            if keep_panel:
                self.panels.append((image, [label, p.argmax(-1), after]))
        self.pending = []

    def drawn(self) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """The panels' (image, label maps) refined since the last call."""
        drawn, self.panels = self.panels, []
        return drawn

    def results(self) -> dict[str, Any]:
        return {
            "params": self.params.to_dict(),
            "backend": self.backend,
            "seconds": round(self.seconds, 2),
            **self.evaluator.results(),
        }


class _EvaluationState:
    """An evaluation's counts, panels and time so far, in ``job.state``: written
    (atomically) after every scored image, read back by a rerun of the same job."""

    def __init__(self, job: PartialDir | None, evaluator: Evaluator, refiner: _CRFScorer | None):
        self.job = job
        self.evaluator = evaluator
        self.refiner = refiner
        self.panels_saved = 0

    def save(self, done: int, panels: list[np.ndarray], seconds: float) -> None:
        state = self.job.state
        for i in range(self.panels_saved, len(panels)):  # each panel once
            with atomic_file(state / f"panel_{i:04d}.npy", "wb") as f:
                np.save(f, panels[i])
        self.panels_saved = len(panels)
        arrays = {"done": done, "panels": len(panels), "seconds": seconds}
        arrays.update(self.evaluator.state())
        if self.refiner is not None:
            arrays.update({f"crf_{k}": v for k, v in self.refiner.evaluator.state().items()})
            arrays["crf_seconds"] = self.refiner.seconds
        with atomic_file(state / "counts.npz", "wb") as f:
            np.savez(f, **arrays)

    def restore(self) -> tuple[int, list[np.ndarray], float]:
        """(images done, their panels, seconds spent); (0, [], 0) when nothing was saved."""
        state = self.job.state
        try:
            with np.load(state / "counts.npz") as saved:
                arrays = dict(saved)
            panels = [np.load(state / f"panel_{i:04d}.npy") for i in range(int(arrays["panels"]))]
        except (OSError, ValueError, KeyError):  # none yet, or damaged: start over
            return 0, [], 0.0
        self.evaluator.restore(arrays)
        if self.refiner is not None:
            self.refiner.evaluator.restore(
                {k[len("crf_") :]: v for k, v in arrays.items() if k.startswith("crf_")}
            )
            self.refiner.seconds = float(arrays["crf_seconds"])
        self.panels_saved = len(panels)
        return int(arrays["done"]), panels, float(arrays["seconds"])


# === Reports ===


def _percent(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{100 * value:.2f}"


def format_results(results: dict[str, Any]) -> str:
    """Markdown tables: per-class IoU and the summary scores, then the trimap scores;
    with ``results["crf"]``, each score before and after the CRF side by side."""
    after = results.get("crf")
    if after:
        params = ", ".join(f"{k}={v:g}" for k, v in after["params"].items())
        lines = [
            f"Dense CRF ({after['backend']}, {params}): scores before and after it.",
            "",
            "| class | IoU | IoU + CRF |",
            "|---|---|---|",
        ]
    else:
        lines = ["| class | IoU |", "|---|---|"]

    def cells(before: dict[str, Any], refined: dict[str, Any] | None, key: str, i=None) -> str:
        values = [before] if refined is None else [before, refined]
        return " | ".join(_percent(v[key] if i is None else v[key][i]) for v in values)

    for i, name in enumerate(results["class_names"]):
        lines.append(f"| {name} | {cells(results, after, 'per_class_iou', i)} |")
    for key in SCORE_KEYS:
        lines.append(f"| **{key}** | {cells(results, after, key)} |")
    trimap = results.get("trimap")
    if trimap:
        columns = [f"{k} | {k} + CRF" if after else k for k in SCORE_KEYS]
        lines += [
            "",
            f"Boundary band (trimap; {trimap['distance']} distance to the "
            f"{'ignore band' if trimap['source'] == 'ignore' else 'label edges'}):",
            "",
            "| band width (px) | " + " | ".join(columns) + " | pixels |",
            "|---" * (len(SCORE_KEYS) * (2 if after else 1) + 2) + "|",
        ]
        for width, scores in trimap["scores"].items():
            refined = after["trimap"]["scores"][width] if after else None
            row = " | ".join(cells(scores, refined, k) for k in SCORE_KEYS)
            lines.append(f"| {width} | {row} | {scores['pixels']} |")
    return "\n".join(lines)


def trimap_plot(results: dict[str, Any]) -> np.ndarray:
    """trimap.png: mean IoU and pixel accuracy against band width (and after CRF)."""
    trimap = results["trimap"]
    widths = trimap["widths"]
    runs = {"": trimap}
    if results.get("crf"):
        runs[" + CRF"] = results["crf"]["trimap"]
    series = {}
    for key, name in (("mean_iou", "mean IoU"), ("pixel_accuracy", "pixel accuracy")):
        for suffix, run in runs.items():
            scores = [run["scores"][f"{w:g}"][key] for w in widths]
            series[name + suffix] = [100 * (v or 0.0) for v in scores]
    source = "ignore band" if trimap["source"] == "ignore" else "label edges"
    return visualize.line_plot(
        widths, series, f"Scores within a band around boundaries ({source})",
        "band width (pixels)", "%",
    )  # fmt: skip


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``output_dir`` as a Path; an existing one without ``overwrite`` is an error."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise InferenceError(f"--output-dir {output_dir} exists; pass --overwrite to replace it")
    if output_dir.exists() and not output_dir.is_dir():
        raise InferenceError(f"--output-dir {output_dir} is not a directory")
    return output_dir


def evaluate_into(
    predictor: Predictor,
    data_dir: str | os.PathLike,
    split: str,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    **options: Any,
) -> Evaluation:
    """``evaluate`` (``options`` are its keyword arguments) with its report written to
    ``output_dir`` (``write_report``), resumably: the counts so far are kept beside it
    (``files.PartialDir``), and a rerun of the same evaluation (checkpoint file,
    inference settings, data, options) after a kill continues from them.

    Raises:
        InferenceError: an existing ``output_dir`` without ``overwrite``; as ``evaluate``.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    ignored = ("progress", "crf_workers")  # change nothing in the scores
    settings = {
        "model": predictor.job_identity(),
        "data_dir": str(Path(data_dir).resolve()),
        "split": split,
        **{k: v.to_dict() if isinstance(v, crf.CRFParams) else v for k, v in options.items()
           if k not in ignored},
    }  # fmt: skip
    with PartialDir(output_dir, settings) as job:
        if job.discarded:
            print(f"discarded an unfinished evaluation of other settings: {job.path}", flush=True)
        evaluation = evaluate(predictor, data_dir, split, job=job, **options)
        write_report(evaluation, output_dir, overwrite, job)
    return evaluation


def write_report(
    evaluation: Evaluation,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    job: PartialDir | None = None,
) -> Path:
    """Writes results.json, results.md, confusion_matrix.png, trimap.png (with trimap
    scores) and panels/*.png into ``output_dir``, all at once (a temporary directory,
    or ``job``'s, renamed); with CRF scores also confusion_matrix_crf.png, and
    trimap.png shows both."""
    output_dir = check_output_dir(output_dir, overwrite)
    if job is not None:
        _write_report_files(evaluation, job.path)
        job.finish()
        return output_dir
    tmp = temporary_dir(output_dir)
    try:
        _write_report_files(evaluation, tmp)
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _write_report_files(evaluation: Evaluation, tmp: Path) -> None:
    results = evaluation.results
    (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (tmp / "results.md").write_text(format_results(results) + "\n")
    matrices = {"confusion_matrix.png": results["confusion_matrix"]}
    if results.get("crf"):
        matrices["confusion_matrix_crf.png"] = results["crf"]["confusion_matrix"]
    for name, matrix in matrices.items():
        image = visualize.confusion_matrix_image(np.array(matrix), results["class_names"])
        visualize.save_png(image, tmp / name)
    if results.get("trimap"):
        visualize.save_png(trimap_plot(results), tmp / "trimap.png")
    if evaluation.panels:
        (tmp / "panels").mkdir(exist_ok=True)
        for i, panel in enumerate(evaluation.panels):
            visualize.save_png(panel, tmp / "panels" / f"{i:04d}.png")
