"""TFLite files: a fixed-size SavedModel of the network converted as float32, float16 or
int8 (calibrated on representative images), and ``TFLitePredictor`` to run them
through LiteRT."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from deeplab_tf.data import pipeline
from deeplab_tf.export.serving import export_archive, labelled_outputs
from deeplab_tf.export.settings import QUANTIZATIONS, ExportError
from deeplab_tf.inference import Predictor
from deeplab_tf.layers import resize_bilinear_aligned
from deeplab_tf.losses import resize_logits_bilinear
from deeplab_tf.progress import track


def save_fixed_size_model(
    predictor: Predictor, path: str | os.PathLike, input_size: tuple[int, int]
) -> None:
    """A SavedModel of the network on float32 [1, H, W, 3] for the TFLite converter: a
    fixed size lets it fold batch norm and the atrous convolutions' shapes."""
    archive = export_archive()
    spec = tf.TensorSpec([1, *input_size, 3], tf.float32, name="images")

    def serving_default(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return labelled_outputs(predictor.batch_probabilities(images))

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
