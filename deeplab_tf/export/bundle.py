"""``export``: one version directory with every format asked for, written all at once,
and its ``export.json``."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from deeplab_tf.data import pipeline
from deeplab_tf.data.specs import IGNORE_LABEL, DatasetSpec
from deeplab_tf.evaluation import evaluate
from deeplab_tf.export.serving import SIGNATURES, save_serving_model
from deeplab_tf.export.settings import (
    DEFAULT_MAX_IMAGE_SIZE,
    KERAS_FILE,
    MANIFEST,
    ExportError,
    parse_formats,
    parse_quantize,
    resolve_version_dir,
    tflite_file,
)
from deeplab_tf.export.tflite import (
    TFLitePredictor,
    convert_tflite,
    representative_images,
    save_fixed_size_model,
)
from deeplab_tf.files import replace_dir, temporary_dir, write_json_atomic
from deeplab_tf.folding import in_precision
from deeplab_tf.inference import Predictor, read_checkpoint_info
from deeplab_tf.layers import ResizeBilinear
from deeplab_tf.prediction import resolve_spec


@dataclasses.dataclass
class Export:
    """What ``export`` wrote: the version directory and its ``export.json`` contents."""

    path: Path
    manifest: dict[str, Any]


def keras_model_for_apps(predictor: Predictor) -> keras.Model:
    """The predictor's network (at its output stride) ending with its logits upsampled to
    the input size, as ``build_model`` returns it, in float32 whatever precision it was
    trained or exported in (apps may run on CPUs without bfloat16)."""
    model = in_precision(predictor.model, "float32")
    upsampled = ResizeBilinear(name="upsample")([model.outputs[0], model.inputs[0]])
    return keras.Model(model.inputs[0], upsampled, name=model.name)


def _whole_image_settings(predictor: Predictor) -> dict[str, Any]:
    # The exported graphs run whole images: the Predictor's sliding windows stay out.
    settings = predictor.settings()
    for key in ("tiling", "tile_size", "tile_overlap"):
        settings.pop(key)
    return settings


def _file_entry(path: Path, root: Path, **extra: Any) -> dict[str, Any]:
    return {"file": str(path.relative_to(root)), "bytes": path.stat().st_size, **extra}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_counts(calibration_images: int, max_image_size: int) -> None:
    for flag, value in (("--calibration-images", calibration_images),
                        ("--max-image-size", max_image_size)):  # fmt: skip
        if value < 1:
            raise ExportError(f"{flag} must be positive, got {value}")


def export(
    predictor: Predictor,
    export_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("savedmodel",),
    name: str | None = None,
    version: int | None = None,
    spec: DatasetSpec | None = None,
    input_size: tuple[int, int] | None = None,
    quantize: Sequence[str] = ("none",),
    data_dir: str | os.PathLike | None = None,
    representative_split: str = "train",
    calibration_images: int = 100,
    evaluate_split: str | None = None,
    crf=None,
    overwrite: bool = False,
    log=print,
    progress: bool = True,
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
) -> Export:
    """Writes ``export_dir/name/version/`` (see the module docstring).

    Args:
        predictor: the network at its export output stride, with its inference settings.
        export_dir: the TF Serving model base directory's parent.
        formats: some of ``FORMATS``.
        name: the model's name (default: the network's name, its variant).
        version: default: one more than the highest existing version.
        spec: class names and colours (None: "class N" and the VOC colours).
        input_size: (H, W) of the TFLite models.
        quantize: some of ``QUANTIZATIONS``, one TFLite file each.
        data_dir: TFRecords for int8 calibration and ``evaluate_split``.
        representative_split: the split of the calibration images.
        calibration_images: how many of them.
        evaluate_split: score the Keras network and each TFLite file on this split
            (mean IoU at full label resolution) and record the drop in export.json.
        crf: ``load_crf()``'s refinement for the SavedModel, or None.
        overwrite: replace an existing version.
        log: where the lines saying what is being done go.
        progress: show the progress of scoring and int8 calibration.
        max_image_size: the largest image side the SavedModel accepts.
    """
    from deeplab_tf import visualize  # PIL-only; kept out of the module's import time

    formats = parse_formats(formats)
    quantize = parse_quantize(quantize)
    _check_counts(calibration_images, max_image_size)
    if "tflite" in formats and input_size is None:
        raise ExportError("--input-size is required for --format tflite (a fixed size)")
    if "tflite" not in formats and (input_size is not None or quantize != ("none",)):
        raise ExportError("--input-size and --quantize apply to --format tflite only")
    needs_data = ("tflite" in formats and "int8" in quantize) or evaluate_split
    if needs_data and data_dir is None:
        raise ExportError("--data-dir is required for int8 calibration and --evaluate-split")
    if spec is not None and spec.num_classes != predictor.num_classes:
        raise ExportError(
            f"the model predicts {predictor.num_classes} classes but dataset {spec.name!r} "
            f"has {spec.num_classes}"
        )
    if data_dir is not None and needs_data:
        try:
            data_spec = pipeline.dataset_spec(data_dir)
        except ValueError as error:
            raise ExportError(str(error).splitlines()[0]) from None
        if data_spec.num_classes != predictor.num_classes:
            raise ExportError(
                f"--data-dir {data_dir}: dataset {data_spec.name!r} has {data_spec.num_classes} "
                f"classes but the model predicts {predictor.num_classes}"
            )
    name = name or predictor.model.name
    path = resolve_version_dir(export_dir, name, version, overwrite)
    class_names = (
        list(spec.class_names) if spec else [f"class {i}" for i in range(predictor.num_classes)]
    )
    palette = visualize.palette(spec)
    manifest: dict[str, Any] = {
        "name": name,
        "version": int(path.name),
        "checkpoint": str(predictor.checkpoint.path) if predictor.checkpoint else None,
        "inference": {**_whole_image_settings(predictor), "crf": crf is not None},
        "dataset": spec.name if spec else None,
        "class_names": class_names,
        "colors": palette[: len(class_names)].tolist(),
        "ignore_label": IGNORE_LABEL,
        "ignore_color": palette[IGNORE_LABEL].tolist(),
        "formats": {},
    }
    tmp = temporary_dir(path)
    try:
        if "savedmodel" in formats:
            log(f"writing the SavedModel{' with the dense CRF' if crf else ''}")
            save_serving_model(predictor, tmp, class_names, palette, crf, max_image_size)
            manifest["formats"]["savedmodel"] = {
                "dir": ".",
                "max_image_size": max_image_size,
                "bytes": _dir_bytes(tmp),
                "signatures": list(SIGNATURES),
            }
        scores: dict[str, float] = {}
        if evaluate_split:
            log(f"scoring the network on {data_dir} {evaluate_split}")
            scores["keras"] = _mean_iou(predictor, data_dir, evaluate_split, progress)
            manifest["evaluation"] = {"split": evaluate_split, "keras_mean_iou": scores["keras"]}
        if "tflite" in formats:
            fixed = tmp / ".tflite-savedmodel"
            # TFLite's kernels take float32 graphs (float16 and int8 come from --quantize).
            save_fixed_size_model(predictor.in_precision("float32"), fixed, input_size)
            entries = manifest["formats"]["tflite"] = {
                "input_size": list(input_size),
                "input": "images float32 [1, H, W, 3], RGB in [0, 255]",
                "outputs": "labels int32 [1, H, W], probabilities float32 [1, H, W, C]",
                "files": {},
            }
            for mode in quantize:
                representative = None
                if mode == "int8":
                    representative = list(
                        representative_images(
                            data_dir, representative_split, input_size, calibration_images
                        )
                    )
                log(f"converting to TFLite ({tflite_file(mode)})")
                target = tmp / tflite_file(mode)
                target.write_bytes(convert_tflite(fixed, mode, representative, progress))
                entry = _file_entry(target, tmp, quantize=mode)
                if mode == "int8":
                    entry["calibration"] = {
                        "split": representative_split,
                        "images": len(representative),
                    }
                if evaluate_split:
                    tflite = TFLitePredictor(target)
                    entry["mean_iou"] = _mean_iou(tflite, data_dir, evaluate_split, progress)
                    entry["mean_iou_drop"] = scores["keras"] - entry["mean_iou"]
                entries["files"][mode] = entry
            shutil.rmtree(fixed)
        if "keras" in formats:
            log(f"writing {KERAS_FILE}")
            keras_model_for_apps(predictor).save(tmp / KERAS_FILE)
            manifest["formats"]["keras"] = _file_entry(tmp / KERAS_FILE, tmp)
        write_json_atomic(tmp / MANIFEST, manifest)
        if path.exists() and not overwrite:  # written by another export meanwhile
            raise ExportError(f"--version {path.name}: {path} exists; pass --overwrite")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Export(path, manifest)


def export_checkpoint(
    source: str | os.PathLike,
    export_dir: str | os.PathLike,
    *,
    flag: str = "--checkpoint",
    variant: str | None = None,
    output_stride: int | None = None,
    name: str | None = None,
    version: int | None = None,
    dataset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    formats: Sequence[str] = ("savedmodel",),
    input_size: tuple[int, int] | None = None,
    calibration_images: int = 100,
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
    precision: str = "float32",
    overwrite: bool = False,
    **options: Any,
) -> Export:
    """``export`` of a training run's directory or a ``.keras`` file (``source``, named
    in errors as ``flag``), as export.py runs it. What is not given comes from the run's
    config.json: the variant, the data directory, the classes (``dataset``: a spec name
    or file) and the TFLite input size (the training crop). A version that exists
    without ``overwrite`` is refused before the model loads. ``precision``: the
    SavedModel's (``Predictor``'s). ``options``: ``export``'s other keyword arguments."""
    _check_counts(calibration_images, max_image_size)  # before loading anything
    checkpoint = read_checkpoint_info(source, flag)
    if input_size is None and "tflite" in parse_formats(formats) and checkpoint.crop_size:
        input_size = (checkpoint.crop_size, checkpoint.crop_size)
    variant = variant or checkpoint.variant
    name = name or getattr(variant, "name", variant)  # a Variant or a name
    if name:  # fail before loading the model
        resolve_version_dir(export_dir, name, version, overwrite)
    predictor = Predictor(
        checkpoint.path, variant=variant, output_stride=output_stride, precision=precision
    )
    return export(
        predictor,
        export_dir,
        formats=formats,
        name=name,
        version=version,
        spec=resolve_spec(predictor, dataset),
        input_size=input_size,
        data_dir=data_dir or checkpoint.data_dir,
        calibration_images=calibration_images,
        max_image_size=max_image_size,
        overwrite=overwrite,
        **options,
    )


def _mean_iou(
    predictor: Predictor | TFLitePredictor, data_dir, split: str, progress: bool
) -> float:
    return float(evaluate(predictor, data_dir, split, progress=progress).results["mean_iou"])


def format_summary(result: Export) -> str:
    """Lines naming each exported file with its size (and its scores, when measured)."""
    formats = result.manifest["formats"]
    crf = result.manifest["inference"]["crf"]
    lines = [f"exported {result.manifest['name']} version {result.manifest['version']}"]
    if "savedmodel" in formats:
        entry = formats["savedmodel"]
        lines.append(
            f"SavedModel: {result.path} ({entry['bytes'] / 1e6:.2f} MB; signatures "
            f"{', '.join(entry['signatures'])}{'; with the dense CRF' if crf else ''})"
        )
    evaluation = result.manifest.get("evaluation")
    if evaluation:
        lines.append(
            f"Keras network: {evaluation['split']} mIoU {evaluation['keras_mean_iou']:.4f}"
        )
    for mode, entry in formats.get("tflite", {}).get("files", {}).items():
        size = "x".join(map(str, formats["tflite"]["input_size"]))
        score = ""
        if "mean_iou" in entry:
            score = (
                f", mIoU {entry['mean_iou']:.4f} (drop {100 * entry['mean_iou_drop']:.2f} points)"
            )
        lines.append(
            f"TFLite {'float32' if mode == 'none' else mode}: {result.path / entry['file']} "
            f"({entry['bytes'] / 1e6:.2f} MB, input {size}{score})"
        )
    if "keras" in formats:
        entry = formats["keras"]
        lines.append(f"Keras: {result.path / entry['file']} ({entry['bytes'] / 1e6:.2f} MB)")
    return "\n".join(lines)
