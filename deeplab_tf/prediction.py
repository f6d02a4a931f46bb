"""``predict.py``'s work: images in, masks, overlays and probabilities out.

For each readable image (files, folders, glob patterns) the output directory gets

    NAME.png                 indexed PNG: pixel values are class ids, shown in the palette
    NAME_overlay.jpg         the image with class colours blended in, and a legend of
                             the classes present beside it (``legend="overlay"``)
    NAME_probabilities.npy   float32 [H, W, C] (with ``save_probabilities``), written
                             band by band through a memory map

plus ``legend.png`` (every class) and ``summary.json`` (settings, outputs, skipped
inputs). With ``crf_params`` the masks are the dense CRF's refinement of the network's
probabilities (``deeplab_tf.crf.refine``; the saved probabilities are then the refined
ones, and each image's probabilities are held whole in memory while it is refined).
Everything is written into ``.OUTPUT_DIR.partial`` (``files.PartialDir``) renamed
at the end, so an interrupted run leaves no half-filled output, and rerunning it
continues with the images it had not finished; an existing directory is replaced only
with ``overwrite``. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from deeplab_tf import crf, visualize
from deeplab_tf.data import pipeline
from deeplab_tf.data.specs import DatasetSpec, get_spec
from deeplab_tf.evaluation import check_output_dir
from deeplab_tf.files import PartialDir, write_json_atomic
from deeplab_tf.inference import InferenceError, Predictor
from deeplab_tf.progress import Progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LEGENDS = ("overlay", "file", "none")


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image paths from files, folders (their images, sorted) and glob patterns.

    Returns (paths in order, without repeats; [(input, reason)] for inputs that name
    nothing).
    """
    paths: list[Path] = []
    missing: list[tuple[str, str]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                missing.append((text, "no images in this folder"))
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
            if not found:
                missing.append((text, "no file matches this pattern"))
            paths.extend(found)
        else:
            missing.append((text, "no such file or directory"))
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return unique, missing


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB [H, W, 3], turned upright by its EXIF orientation; OSError if unreadable."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(str(error).splitlines()[0] if str(error) else type(error).__name__) from None


def resolve_spec(predictor: Predictor, dataset: str | None) -> DatasetSpec | None:
    """The dataset of the class names and colours: ``dataset`` (a spec name or file),
    else the one the checkpoint was trained on (its config.json's TFRecords), else None."""
    if dataset is not None:
        return get_spec(dataset)
    data_dir = predictor.checkpoint.data_dir if predictor.checkpoint else None
    if data_dir and (Path(data_dir) / "manifest.json").is_file():
        return pipeline.dataset_spec(data_dir)
    return None


def _output_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:  # two inputs with one name (from different folders)
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def check_job(
    inputs: Sequence[str],
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    alpha: float = 0.5,
    legend: str = "overlay",
) -> tuple[Path, list[Path], list[tuple[str, str]]]:
    """The checks of ``predict_files`` that need no model, so that a command line fails
    before loading one: ``(output_dir, the images of inputs, the inputs skipped with
    why)``.

    Raises:
        InferenceError: a bad ``alpha`` or ``legend``, an existing ``output_dir`` without
            ``overwrite``, one that holds an input, or no image in ``inputs``.
    """
    if legend not in LEGENDS:
        raise InferenceError(f"--legend must be one of {list(LEGENDS)}, got {legend!r}")
    if not 0.0 <= alpha <= 1.0:
        raise InferenceError(f"--alpha must be in [0, 1], got {alpha}")
    output_dir = check_output_dir(output_dir, overwrite)
    paths, skipped = expand_inputs(inputs)
    resolved_out = output_dir.resolve()
    inside = [p for p in paths if resolved_out in p.parents]
    if inside:
        raise InferenceError(
            f"--output-dir {output_dir} contains input {inside[0]}; choose another directory"
        )
    if not paths:
        reasons = "; ".join(f"{text}: {reason}" for text, reason in skipped)
        raise InferenceError(f"no images to predict ({reasons})")
    return output_dir, paths, skipped


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str],
    output_dir: str | os.PathLike,
    spec: DatasetSpec | None = None,
    *,
    overwrite: bool = False,
    save_probabilities: bool = False,
    alpha: float = 0.5,
    legend: str = "overlay",
    stream=None,
    crf_params: crf.CRFParams | None = None,
    crf_backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Predicts every image of ``inputs`` into ``output_dir`` (see the module docstring).

    Args:
        predictor: model and inference settings.
        inputs: files, folders and glob patterns.
        output_dir: created (or replaced, with ``overwrite``) when all is done.
        spec: the dataset (class names, palette); None: "class N" and the VOC colours.
        save_probabilities: also write ``NAME_probabilities.npy``.
        alpha: opacity of the colours in the overlay.
        legend: ``"overlay"`` (beside each overlay, and legend.png), ``"file"``
            (legend.png only) or ``"none"``.
        stream: where progress and skipped inputs are reported (stderr for skips).
        crf_params: refine each image's probabilities with the dense CRF (None: no CRF).
        crf_backend: ``deeplab_tf.crf.BACKENDS``.
        progress: show progress (``deeplab_tf.progress``; per image: summary.json).

    Returns:
        The summary also written as ``summary.json``.

    Raises:
        InferenceError: nothing to predict, a bad setting, an existing ``output_dir``
            without ``overwrite``, or the model's classes do not match ``spec``.
    """
    stream = stream or sys.stdout
    if spec is not None and spec.num_classes != predictor.num_classes:
        where = f"{predictor.checkpoint.path}: " if predictor.checkpoint else ""
        raise InferenceError(
            f"{where}the model predicts {predictor.num_classes} classes but dataset "
            f"{spec.name!r} has {spec.num_classes}"
        )
    output_dir, paths, skipped = check_job(inputs, output_dir, overwrite, alpha, legend)
    for text, reason in skipped:
        print(f"skipped {text}: {reason}", file=sys.stderr, flush=True)
    if crf_params is not None:
        crf_backend = crf.resolve_backend(crf_backend)  # once: the log line says which

    class_names = (
        list(spec.class_names) if spec else [f"class {i}" for i in range(predictor.num_classes)]
    )
    colours = visualize.palette(spec)
    settings = {
        "model": predictor.job_identity(),
        "inputs": [_file_identity(path) for path in paths],
        "dataset": spec.name if spec else None,
        "save_probabilities": save_probabilities,
        "alpha": alpha,
        "legend": legend,
        "crf": None if crf_params is None else [crf_params.to_dict(), crf_backend],
    }
    written: list[dict[str, Any]] = []
    used: set[str] = set()
    with PartialDir(output_dir, settings) as job:
        tmp = job.path
        done = {int(p.stem): p for p in job.state.glob("[0-9]*.json")}
        if done:
            print(f"continuing: {len(done)} of {len(paths)} images already predicted", file=stream)
        if legend != "none":
            visualize.save_png(visualize.legend(class_names, colours), tmp / "legend.png")
        meter = Progress(len(paths), "images", enabled=progress, stream=stream, initial=len(done))
        for index, path in enumerate(paths, 1):
            if index in done:  # predicted by an interrupted run of the same job
                written.append(json.loads(done[index].read_text()))
                used.add(_output_stem(path, used))
                continue
            start = time.perf_counter()
            try:
                image = read_image(path)
            except OSError as error:
                skipped.append((str(path), f"unreadable image ({error})"))
                print(f"skipped {path}: unreadable image ({error})", file=sys.stderr, flush=True)
                meter.update(index)
                continue
            stem = _output_stem(path, used)
            outputs = {"mask": f"{stem}.png", "overlay": f"{stem}_overlay.jpg"}
            probabilities = None
            if save_probabilities:
                outputs["probabilities"] = f"{stem}_probabilities.npy"
                probabilities = np.lib.format.open_memmap(
                    tmp / outputs["probabilities"],
                    mode="w+",
                    dtype=np.float32,
                    shape=(*image.shape[:2], predictor.num_classes),
                )
            if crf_params is None:
                labels = predictor.predict_labels(image, probabilities_out=probabilities)
            else:
                refined = crf.refine(image, predictor.predict(image), crf_params, crf_backend)
                labels = refined.argmax(-1).astype(np.uint8)
                if probabilities is not None:
                    probabilities[:] = refined
            if probabilities is not None:
                probabilities.flush()
                del probabilities
            visualize.indexed_png(labels, colours).save(tmp / outputs["mask"])
            picture = visualize.overlay(image, labels, colours, alpha)
            present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(class_names)))
            if legend == "overlay":
                picture = visualize.side_by_side(
                    [picture, visualize.legend(class_names, colours, present)], gap=0
                )
            Image.fromarray(picture).save(tmp / outputs["overlay"], quality=90)
            seconds = time.perf_counter() - start
            written.append(
                {
                    "input": str(path),
                    "height": int(image.shape[0]),
                    "width": int(image.shape[1]),
                    "classes": [class_names[i] for i in present],
                    "seconds": round(seconds, 3),
                    **outputs,
                }
            )
            write_json_atomic(job.state / f"{index}.json", written[-1])  # this image is done
            meter.update(index)
        if not written:
            raise InferenceError(f"none of the {len(paths)} images could be read")
        summary = {
            "checkpoint": str(predictor.checkpoint.path) if predictor.checkpoint else None,
            "dataset": spec.name if spec else None,
            "inference": predictor.settings(),
            "crf": None
            if crf_params is None
            else {"params": crf_params.to_dict(), "backend": crf_backend},
            "class_names": class_names,
            "images": written,
            "skipped": [{"input": text, "reason": reason} for text, reason in skipped],
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        job.finish()
    return summary


def _file_identity(path: Path) -> list[Any]:
    """(absolute path, size, modification time): an input changed since is predicted again."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
