"""The Keras callbacks of ``training.train``: progress lines, NaN advice, backups and
checkpoints written atomically (a kill never leaves half a file), and TensorBoard
prediction images."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from deeplab_tf import visualize
from deeplab_tf.files import atomic_path, save_model_atomic, write_json_atomic
from deeplab_tf.losses import resize_logits_bilinear
from deeplab_tf.progress import Progress, clock, on_terminal


class ProgressLogger(keras.callbacks.Callback):
    """Training progress (``deeplab_tf.progress``): on a terminal a bar with the loss and
    learning rate, else a line every ``every`` steps: step, loss, learning rate,
    images/s and the time left."""

    def __init__(self, every: int, batch_size: int, total_steps: int, first_step: int = 0):
        super().__init__()
        self.every = every
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.step = first_step
        self._start = None
        self.bar = None
        if on_terminal():
            self.bar = Progress(total_steps, "steps")
            self.bar.update(first_step)

    def on_train_batch_end(self, batch, logs=None):
        if self._start is None:  # skip the first step: it includes tracing
            self._start, self._start_step = time.perf_counter(), self.step
        self.step += 1
        shown = self.step % self.every == 0 or self.step == self.total_steps
        if self.bar is None and not shown:
            return  # the learning rate is evaluated only for what is shown
        loss = float((logs or {}).get("loss", float("nan")))
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.bar is not None:
            self.bar.update(self.step, values=[("loss", loss), ("lr", lr)])
        else:
            elapsed = time.perf_counter() - self._start
            done = self.step - self._start_step
            rate = done / elapsed if elapsed > 0 and done else 0.0
            left = (self.total_steps - self.step) / rate if rate else 0.0
            print(
                f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
                f"{rate * self.batch_size:.1f} images/s, left {clock(left)}",
                flush=True,
            )


class TerminateOnNaNWithAdvice(keras.callbacks.Callback):
    """Stops training when the loss is NaN or infinite, and says what to try."""

    def __init__(self):
        super().__init__()
        self.stopped_at: int | None = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.stopped_at = batch
            self.model.stop_training = True
            print(
                f"loss is {loss} at batch {batch}: training stopped. Try a lower "
                "--learning-rate, training without --mixed-precision, or check that the "
                "labels hold only class ids and 255.",
                file=sys.stderr,
                flush=True,
            )


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` whose backup (weights, then the epoch it reached) is replaced
    by renames: Keras writes both in place, so a kill while the first backup is written
    leaves a truncated weights file (or a half JSON) that no rerun can load."""

    def _save_model(self) -> None:
        os.makedirs(self.backup_dir, exist_ok=True)
        with atomic_path(self._weights_path, suffix=".weights.h5") as weights:  # Keras's suffix
            self.model.save_weights(str(weights), overwrite=True)
        write_json_atomic(
            self._training_metadata_path,
            {"epoch": self._current_epoch, "batch": self._last_batch_seen},
        )


class AtomicCheckpoints(keras.callbacks.Callback):
    """``last.keras`` every epoch and ``best.keras`` on a new best ``monitor``, atomically."""

    def __init__(self, model_dir: Path, monitor: str = "val_mean_iou"):
        super().__init__()
        self.model_dir = model_dir
        self.monitor = monitor
        best_file = model_dir / "best.json"
        self.best = json.loads(best_file.read_text())["value"] if best_file.is_file() else -1.0

    def on_epoch_end(self, epoch, logs=None):
        save_model_atomic(self.model, self.model_dir / "last.keras")
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best = float(value)
            save_model_atomic(self.model, self.model_dir / "best.keras")
            write_json_atomic(
                self.model_dir / "best.json",
                {"epoch": epoch + 1, self.monitor: value, "value": value},
            )


class PredictionImages(keras.callbacks.Callback):
    """TensorBoard images of a few validation predictions: image | label | prediction
    panels in the dataset's colours (``deeplab_tf.visualize.panels``)."""

    def __init__(self, log_dir: Path, images: np.ndarray, labels: np.ndarray, palette: np.ndarray):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir / "images"))
        self.images = images
        self.labels = labels
        self.palette = palette

    def on_epoch_end(self, epoch, logs=None):
        # A plain call, not predict_on_batch: under a multi-worker strategy that one
        # gathers across workers, and only the chief runs this callback.
        logits = self.model(self.images, training=False)
        # v1/v2 recipes train on logits at the output stride: show them at the image size.
        logits = resize_logits_bilinear(logits, tf.shape(self.images)[1:3])
        predictions = keras.ops.convert_to_numpy(keras.ops.argmax(logits, axis=-1))
        panels = np.stack(
            [
                visualize.panels(image, [label, prediction], self.palette)
                for image, label, prediction in zip(
                    self.images, self.labels, predictions, strict=True
                )
            ]
        )
        with self.writer.as_default():
            tf.summary.image("image | label | prediction", panels, step=epoch + 1, max_outputs=4)
        self.writer.flush()
