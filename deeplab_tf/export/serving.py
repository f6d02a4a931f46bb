"""The SavedModel for TF Serving: its signatures (see the package docstring)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from deeplab_tf.data import tfrecord
from deeplab_tf.data.specs import IGNORE_LABEL
from deeplab_tf.export.settings import DEFAULT_MAX_IMAGE_SIZE, ExportError
from deeplab_tf.inference import Predictor

# The largest image side the SavedModel's signatures accept (they run whole images):
SIGNATURES = {
    "serving_default": tf.TensorSpec([None, None, None, 3], tf.uint8, name="images"),
    "predict_encoded": tf.TensorSpec([None], tf.string, name="image_bytes"),
    "predict_example": tf.TensorSpec([None], tf.string, name="examples"),
    "classes": tf.TensorSpec([None], tf.int32, name="class_ids"),
}


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


def labelled_outputs(probabilities: tf.Tensor) -> dict[str, tf.Tensor]:
    # int32: TFLite and many clients cannot take argmax's default int64.
    labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return {"labels": labels, "probabilities": probabilities}


class _Signatures:
    """The functions behind the SavedModel's signatures (see the package docstring)."""

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
        return labelled_outputs(self.probabilities(tf.cast(images, tf.float32)))

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
            outputs = labelled_outputs(
                self.probabilities(tf.cast(decoded.read(i), tf.float32)[None])
            )
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


def export_archive() -> keras.export.ExportArchive:
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
    archive = export_archive()
    for name, spec in SIGNATURES.items():
        archive.add_endpoint(name, getattr(functions, name), input_signature=[spec])
    archive.write_out(str(path), verbose=False)
