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

The modules: ``settings`` (formats, checks, file names), ``serving`` (the SavedModel's
signatures), ``tflite`` (conversion and ``TFLitePredictor``) and ``bundle``
(``export``, the version directory and its export.json; ``export_checkpoint``, export.py's
work).
"""

from deeplab_tf.export.bundle import (
    Export,
    export,
    export_checkpoint,
    format_summary,
    keras_model_for_apps,
)
from deeplab_tf.export.serving import SIGNATURES, save_serving_model
from deeplab_tf.export.settings import (
    DEFAULT_MAX_IMAGE_SIZE,
    FORMATS,
    KERAS_FILE,
    MANIFEST,
    QUANTIZATIONS,
    ExportError,
    load_crf,
    parse_formats,
    parse_input_size,
    parse_quantize,
    resolve_version_dir,
    tflite_file,
)
from deeplab_tf.export.tflite import TFLitePredictor, convert_tflite

__all__ = [
    "DEFAULT_MAX_IMAGE_SIZE",
    "FORMATS",
    "KERAS_FILE",
    "MANIFEST",
    "QUANTIZATIONS",
    "SIGNATURES",
    "Export",
    "ExportError",
    "TFLitePredictor",
    "convert_tflite",
    "export",
    "export_checkpoint",
    "format_summary",
    "keras_model_for_apps",
    "load_crf",
    "parse_formats",
    "parse_input_size",
    "parse_quantize",
    "resolve_version_dir",
    "save_serving_model",
    "tflite_file",
]
