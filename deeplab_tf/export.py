"""Export: a SavedModel for TF Serving, TFLite files for devices, a ``.keras`` file for apps.

``export`` writes one version of a model in TF Serving's layout, all at once (into a
temporary directory renamed when complete, so a killed export leaves no version
directory behind; an existing version is replaced only with ``overwrite``)::

    EXPORT_DIR/NAME/VERSION/
        saved_model.pb variables/ fingerprint.pb   the SavedModel ("savedmodel")
        model_float32.tflite                       TFLite ("tflite"), one file per
        model_float16.tflite                       quantization asked for
        model_int8.tflite
        model.keras                                for keras.models.load_model ("keras")
        export.json                                settings, classes and colours, files

**SavedModel signatures** (TF Serving's predict API, REST and gRPC). Decoding, the
model's own normalisation, the resize of the logits to the image size, the softmax and
the argmax all run inside the graph; the network runs on whole images (no sliding
windows), with the Predictor's scales, flips and, with ``crf``, the dense CRF:

* ``serving_default``: ``images`` uint8 [N, H, W, 3] (any H, W) -> ``labels`` int32
  [N, H, W] and ``probabilities`` float32 [N, H, W, C].
* ``predict_encoded``: ``image_bytes`` string [N], JPEG or PNG files of any sizes
  (REST: ``{"b64": ...}``) -> ``labels`` and ``probabilities`` at each image's own size,
  padded at the bottom and right to the largest of the batch (labels with 255,
  probabilities with 0), and ``heights``, ``widths`` int32 [N] to crop them.
* ``predict_example``: ``examples`` string [N], serialized ``tf.Example`` records with
  the keys of ``deeplab_tf.data.tfrecord`` (``image/encoded``, optional
  ``image/filename``; labels are not read) -> the outputs of ``predict_encoded`` and
  ``filenames`` string [N].
* ``classes``: ``class_ids`` int32 [K] -> ``class_names`` string [K] and ``colors``
  uint8 [K, 3], so a client can name and colour masks without the training code (255
  is "ignore" in the dataset's ignore colour). It takes an input because TF Serving's
  REST API refuses signatures without one.

Inputs of the wrong dtype are refused by TensorFlow (TF Serving: "Expects arg[0] to be
uint8 but float is provided"); wrong ranks and channel counts by checks in the graph
with a message naming the expected shape.

**TFLite** files are converted from a SavedModel (not from concrete functions) of the
network at a fixed input size, with one signature ``serving_default``: ``images``
float32 [1, H, W, 3] RGB pixels in [0, 255] -> ``labels`` int32 [1, H, W] and
``probabilities`` float32 [1, H, W, C]. ``float32`` is the plain conversion; ``float16``
stores the weights in float16 (computed in float32 on CPUs); ``int8`` is full-integer
quantization calibrated on representative images: every operation runs in int8, with
float32 input and outputs (the converter adds a quantize op at the input and
dequantize ops at the outputs), so the three files are used the same way.

The ``.keras`` file is the network at the export's output stride ending with logits
upsampled to the input size (``build_model``'s contract): ``keras.models.load_model``
reads it after ``import deeplab_tf``. The SavedModel needs only TensorFlow:
``tf.saved_model.load(path).signatures["serving_default"]``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from deeplab_tf.data import pipeline, tfrecord
from deeplab_tf.data.specs import IGNORE_LABEL, DatasetSpec
from deeplab_tf.evaluation import evaluate
from deeplab_tf.files import replace_dir, temporary_dir, write_json_atomic
from deeplab_tf.inference import InferenceError, Predictor
from deeplab_tf.layers import ResizeBilinear, resize_bilinear_aligned
from deeplab_tf.losses import resize_logits_bilinear
from deeplab_tf.progress import track

FORMATS = ("savedmodel", "tflite", "keras")
QUANTIZATIONS = ("none", "float16", "int8")
KERAS_FILE = "model.keras"
MANIFEST = "export.json"
# The SavedModel's signatures and their inputs (outputs: see the module docstring).
# The largest image side the SavedModel's signatures accept (they run whole images):
# export.py --max-image-size; export.json records it.
DEFAULT_MAX_IMAGE_SIZE = 4096
SIGNATURES = {
    "serving_default": tf.TensorSpec([None, None, None, 3], tf.uint8, name="images"),
    "predict_encoded": tf.TensorSpec([None], tf.string, name="image_bytes"),
    "predict_example": tf.TensorSpec([None], tf.string, name="examples"),
    "classes": tf.TensorSpec([None], tf.int32, name="class_ids"),
}


class ExportError(InferenceError):
    """A bad export setting or destination, reported as one line by the CLI."""


def tflite_file(quantize: str) -> str:
    """The file name of a TFLite conversion: model_float32/float16/int8.tflite."""
    return f"model_{'float32' if quantize == 'none' else quantize}.tflite"


# === Checks of the settings ===


def _parse_choices(values: Sequence[str], choices: Sequence[str], flag: str) -> tuple[str, ...]:
    """Values given separately or comma-separated, checked, in ``choices`` order."""
    values = [v for value in values for v in value.split(",") if v]
    unknown = [v for v in values if v not in choices]
    if unknown or not values:
        got = ", ".join(unknown) if unknown else "nothing"
        raise ExportError(f"{flag} must be one or more of {', '.join(choices)}; got {got}")
    return tuple(c for c in choices if c in values)


def parse_formats(values: Sequence[str]) -> tuple[str, ...]:
    """``--format`` values (``all``: every format) as a tuple in ``FORMATS`` order."""
    formats = _parse_choices(values, (*FORMATS, "all"), "--format")
    return FORMATS if "all" in formats else formats


def parse_quantize(values: Sequence[str]) -> tuple[str, ...]:
    """``--quantize`` values as a tuple in ``QUANTIZATIONS`` order."""
    return _parse_choices(values, QUANTIZATIONS, "--quantize")


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """``--input-size``: ``H`` or ``H,W`` pixels."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ExportError(f"--input-size must be H or H,W in pixels, got {text!r}") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ExportError(f"--input-size must be H or H,W in pixels, got {text!r}")
    return size  # type: ignore[return-value]


def resolve_version_dir(
    export_dir: str | os.PathLike, name: str, version: int | None, overwrite: bool
) -> Path:
    """``export_dir/name/version``: the next version after the highest existing one when
    ``version`` is None (1 for a new model); an existing one only with ``overwrite``."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ExportError(f"--name must be a plain directory name, got {name!r}")
    base = Path(export_dir) / name
    if base.exists() and not base.is_dir():
        raise ExportError(f"--export-dir {base} is not a directory")
    if version is None:
        existing = (
            [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
        )
        version = max(existing, default=0) + 1
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    path = base / str(version)
    if path.exists() and not overwrite:
        raise ExportError(f"--version {version}: {path} exists; pass --overwrite to replace it")
    return path


def load_crf(params_file: str | os.PathLike | None = None):
    """The dense CRF of ``deeplab_tf.crf`` as ``f(images, probabilities) -> refined`` on
    batches in TensorFlow ops, with the parameters of ``params_file`` (or the defaults)."""
    from deeplab_tf import crf

    params = crf.CRFParams.load(params_file) if params_file else crf.CRFParams()
    return lambda images, probabilities: crf.crf_tensorflow(images, probabilities, params)


# === Graph pieces shared by the signatures ===


def _check_shape(x: tf.Tensor, shape: list[int | None], name: str) -> tf.Tensor:
    """``x`` after a run-time shape check ("Shape of tensor NAME [...] is not compatible
    with expected shape [...]"): the function runtime (eager calls and TF Serving) does
    not compare fed tensors with the signature, and a rank-3 image would reach the
    convolutions (oneDNN aborts the process on it). An EnsureShape op survives Grappler,
    where a tf.debugging.Assert on the rank would be folded away."""
    return tf.ensure_shape(x, shape, name=f"check_{name}")


def _check(condition: tf.Tensor, message: str) -> tf.Operation:
    return tf.debugging.Assert(condition, [message], name="check_input")


def _outputs(probabilities: tf.Tensor) -> dict[str, tf.Tensor]:
    # int32: TFLite and many clients cannot take argmax's default int64.
    labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return {"labels": labels, "probabilities": probabilities}


class _Signatures:
    """The functions behind the SavedModel's signatures (see the module docstring)."""

    def __init__(
        self,
        predictor: Predictor,
        class_names: Sequence[str],
        palette: np.ndarray,
        crf,
        max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
    ):
        self.predictor = predictor
        self.crf = crf
        self.max_image_size = max_image_size
        names = [""] * 256
        names[: len(class_names)] = list(class_names)
        names[IGNORE_LABEL] = "ignore"
        self.names = tf.constant(names)
        self.palette = tf.constant(np.asarray(palette, np.uint8))

    def probabilities(self, images: tf.Tensor) -> tf.Tensor:
        """float32 [N, h, w, C] of float32 images [N, h, w, 3] (pixels in [0, 255])."""
        size = tf.shape(images)[1:3]
        limit = self.max_image_size
        message = f"images must be [N, H, W, 3] with 1 <= H, W <= {limit}; got [N, H, W, 3] ="
        fits = tf.logical_and(tf.reduce_all(size >= 1), tf.reduce_all(size <= limit))
        check = tf.debugging.Assert(fits, [message, tf.shape(images)], summarize=4)
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        probabilities = self.predictor.batch_probabilities(images)
        return probabilities if self.crf is None else self.crf(images, probabilities)

    def serving_default(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        images = _check_shape(images, [None, None, None, 3], "images")
        return _outputs(self.probabilities(tf.cast(images, tf.float32)))

    def predict_encoded(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        image_bytes = _check_shape(image_bytes, [None], "image_bytes")
        count = tf.shape(image_bytes)[0]
        message = "image_bytes must hold at least one JPEG or PNG file"
        with tf.control_dependencies([_check(count > 0, message)]):
            count = tf.identity(count)
        # Decode all first: the largest size sets the padded output size. (Plain
        # while loops: the export traces without AutoGraph.)
        decoded = tf.TensorArray(
            tf.uint8, size=count, infer_shape=False, element_shape=[None, None, 3]
        )
        sizes = tf.TensorArray(tf.int32, size=count, element_shape=[2])

        def decode(i, decoded, sizes):
            image = tfrecord.decode_image(image_bytes[i])
            return i + 1, decoded.write(i, image), sizes.write(i, tf.shape(image)[:2])

        _, decoded, sizes = tf.while_loop(
            lambda i, *_: i < count, decode, (tf.constant(0), decoded, sizes)
        )
        sizes = sizes.stack()
        height, width = tf.reduce_max(sizes[:, 0]), tf.reduce_max(sizes[:, 1])
        num_classes = self.predictor.num_classes

        def predict(i, labels, probabilities):  # one image at a time, at its own size
            outputs = _outputs(self.probabilities(tf.cast(decoded.read(i), tf.float32)[None]))
            padding = [[0, height - sizes[i, 0]], [0, width - sizes[i, 1]]]
            label = tf.pad(outputs["labels"][0], padding, constant_values=IGNORE_LABEL)
            probability = tf.pad(outputs["probabilities"][0], [*padding, [0, 0]])
            return i + 1, labels.write(i, label), probabilities.write(i, probability)

        _, labels, probabilities = tf.while_loop(
            lambda i, *_: i < count,
            predict,
            (
                tf.constant(0),
                tf.TensorArray(tf.int32, size=count, element_shape=[None, None]),
                tf.TensorArray(tf.float32, size=count, element_shape=[None, None, num_classes]),
            ),
        )
        probabilities = probabilities.stack()
        probabilities.set_shape([None, None, None, num_classes])
        return {
            "labels": labels.stack(),
            "probabilities": probabilities,
            "heights": sizes[:, 0],
            "widths": sizes[:, 1],
        }

    def predict_example(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        examples = _check_shape(examples, [None], "examples")
        keys = (tfrecord.IMAGE_ENCODED, tfrecord.IMAGE_FILENAME)  # labels are not read
        parsed = tf.io.parse_example(examples, {k: tfrecord.FEATURES[k] for k in keys})
        outputs = self.predict_encoded(parsed[tfrecord.IMAGE_ENCODED])
        return {**outputs, "filenames": parsed[tfrecord.IMAGE_FILENAME]}

    def classes(self, class_ids: tf.Tensor) -> dict[str, tf.Tensor]:
        class_ids = _check_shape(class_ids, [None], "class_ids")
        valid = tf.reduce_all(tf.logical_and(class_ids >= 0, class_ids <= 255))
        with tf.control_dependencies([_check(valid, "class_ids must be in 0..255")]):
            class_ids = tf.identity(class_ids)
        return {
            "class_names": tf.gather(self.names, class_ids),
            "colors": tf.gather(self.palette, class_ids),
        }


def _archive() -> keras.export.ExportArchive:
    # Not ``archive.track(model)``: the endpoints' variables are tracked anyway, and a
    # tracked Keras model stores each variable a second time (its KerasVariable).
    return keras.export.ExportArchive()


def save_serving_model(
    predictor: Predictor,
    path: str | os.PathLike,
    class_names: Sequence[str],
    palette: np.ndarray,
    crf=None,
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
) -> None:
    """Writes the SavedModel with the signatures of the module docstring to ``path``.

    Args:
        predictor: the network and its inference settings (scales, flips, fusion).
        path: a new directory.
        class_names: one per class.
        palette: uint8 [256, 3] colours by class id (``visualize.palette``).
        crf: ``load_crf()``'s refinement, or None.
        max_image_size: the largest image side the signatures accept (whole images
            run at once: a larger one would exhaust the server's memory).
    """
    if len(class_names) != predictor.num_classes:
        raise ExportError(
            f"{len(class_names)} class names for a model with {predictor.num_classes} classes"
        )
    functions = _Signatures(predictor, class_names, palette, crf, max_image_size)
    archive = _archive()
    for name, spec in SIGNATURES.items():
        archive.add_endpoint(name, getattr(functions, name), input_signature=[spec])
    archive.write_out(str(path), verbose=False)


# === TFLite ===


def save_fixed_size_model(
    predictor: Predictor, path: str | os.PathLike, input_size: tuple[int, int]
) -> None:
    """A SavedModel of the network on float32 [1, H, W, 3] for the TFLite converter: a
    fixed size lets it fold batch norm and the atrous convolutions' shapes."""
    archive = _archive()
    spec = tf.TensorSpec([1, *input_size, 3], tf.float32, name="images")

    def serving_default(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return _outputs(predictor.batch_probabilities(images))

    archive.add_endpoint("serving_default", serving_default, input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def representative_images(
    data_dir: str | os.PathLike, split: str, input_size: tuple[int, int], count: int
) -> Iterator[np.ndarray]:
    """float32 [1, H, W, 3] images of a split resized to ``input_size``, for int8 calibration."""
    try:
        dataset = pipeline.eval_dataset(data_dir, split, resize=input_size)
    except ValueError as error:  # names the directory or the split
        raise ExportError(str(error).splitlines()[0]) from None
    for image, _ in dataset.take(count):
        yield image.numpy()


def convert_tflite(
    saved_model_dir: str | os.PathLike,
    quantize: str = "none",
    representative: Sequence[np.ndarray] | None = None,
    progress: bool = False,
) -> bytes:
    """A TFLite flatbuffer from ``save_fixed_size_model``'s SavedModel.

    Args:
        saved_model_dir: the fixed-size SavedModel.
        quantize: ``"none"`` (float32), ``"float16"`` (float16 weights) or ``"int8"``
            (full-integer operations, float32 input and outputs).
        representative: calibration images float32 [1, H, W, 3] (``int8`` only).
        progress: show the calibration's progress (``deeplab_tf.progress``).
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if not representative:
            raise ExportError("int8 quantization needs representative images")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [image]
            for image in track(
                representative,
                len(representative),
                "images",
                enabled=progress,
                title="int8 calibration",
            )
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif quantize != "none":
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    return converter.convert()


class TFLitePredictor:
    """A TFLite file run by ``ai-edge-litert``, with the Predictor methods that
    ``evaluation.evaluate`` calls: images of other sizes are resized to the model's input
    size (bilinear, corners aligned) and the probabilities back to the image size."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner("serving_default")
        self.input_size = tuple(
            int(v) for v in self.runner.get_input_details()["images"]["shape"][1:3]
        )
        self.num_classes = int(self.runner.get_output_details()["probabilities"]["shape"][-1])
        self.checkpoint = None

    def settings(self) -> dict[str, Any]:
        return {"tflite": str(self.path), "input_size": list(self.input_size)}

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """``labels`` [H, W] and ``probabilities`` [H, W, C] of an image of the input size."""
        x = np.asarray(image, np.float32)[None]
        return {k: v[0] for k, v in self.runner(images=x).items()}

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Probabilities float32 [H, W, C] of an RGB image [H, W, 3] of any size."""
        image = np.asarray(image)
        size = image.shape[:2]
        if size == self.input_size:
            return self.run(image)["probabilities"]
        resized = resize_bilinear_aligned(np.asarray(image, np.float32)[None], self.input_size)
        probabilities = self.run(resized[0].numpy())["probabilities"]
        return resize_logits_bilinear(probabilities[None], size)[0].numpy()

    def predict_labels(self, image: np.ndarray) -> np.ndarray:
        """Class ids uint8 [H, W]: the model's own ``labels`` output at its input size."""
        image = np.asarray(image)
        if image.shape[:2] == self.input_size:
            return self.run(image)["labels"].astype(np.uint8)
        return self.predict(image).argmax(-1).astype(np.uint8)


# === The export ===


@dataclasses.dataclass
class Export:
    """What ``export`` wrote: the version directory and its ``export.json`` contents."""

    path: Path
    manifest: dict[str, Any]


def keras_model_for_apps(predictor: Predictor) -> keras.Model:
    """The predictor's network (at its output stride) ending with its logits upsampled to
    the input size, as ``build_model`` returns it."""
    model = predictor.model
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
            save_fixed_size_model(predictor, fixed, input_size)
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
