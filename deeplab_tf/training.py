"""Training: the only module that creates a ``tf.distribute`` strategy.

``train(TrainConfig(...))`` runs a recipe (``deeplab_tf.recipes``) on TFRecords
from the builders with ``model.fit``: poly/step learning rate, momentum SGD with
L2 on kernels, the v3 loss and a streaming mean IoU validated on full images.
The model directory holds everything of a run:

    config.json     the resolved settings
    backup/         BackupAndRestore state: a killed run resumes from here
    last.keras      the latest weights (every ``checkpoint_every`` steps)
    best.keras      the weights with the best validation mean IoU
    history.csv     one row per ``checkpoint_every`` steps
    logs/           TensorBoard scalars (loss, learning rate, mIoU) and images
    results.json    final validation scores (mIoU, per-class IoU, accuracies)

Every file is written to a temporary name and renamed, so a kill never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from deeplab_tf import visualize
from deeplab_tf.backbones import transfer_weights
from deeplab_tf.data import pipeline
from deeplab_tf.data.shapes import ensure_shapes_tfrecords
from deeplab_tf.data.specs import DatasetSpec, get_spec, spec_from_dict
from deeplab_tf.data.tfrecord import corrupt_shard_error, read_manifest
from deeplab_tf.evaluation import SCORE_KEYS, evaluate, format_results
from deeplab_tf.files import save_model_atomic, temporary_name, write_json_atomic
from deeplab_tf.inference import Predictor, resolve_checkpoint
from deeplab_tf.keras_patches import patch_keras_for_distribution
from deeplab_tf.losses import (
    CLASS_WEIGHT_METHODS,
    SoftmaxCrossEntropy,
    class_weights_from_frequencies,
    resize_logits_bilinear,
)
from deeplab_tf.metrics import MeanIoU
from deeplab_tf.model import (
    DEFAULT_ATROUS_IMPLEMENTATION,
    MAX_TENSOR_ELEMENTS,
    activation_elements,
    added_layer_names,
    build_model,
    check_variant_output_stride,
    classifier_layer_names,
)
from deeplab_tf.multiscale import single_scale_model
from deeplab_tf.progress import Progress, clock, on_terminal
from deeplab_tf.recipes import Recipe, choose_recipe, format_recipe
from deeplab_tf.schedules import PolyDecay, StepDecay, build_optimizer
from deeplab_tf.variants import Variant, get_variant

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")
# Where the built-in dataset is generated when no --data-dir is given.
DEFAULT_SHAPES_ROOT = Path("data") / "shapes"


class TrainingError(ValueError):
    """A bad training setting or input, reported as one line by the CLI."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs: a variant, a recipe (the protocol) and run options.

    Attributes:
        variant: a name in ``deeplab_tf.VARIANTS`` (or a ``Variant``).
        recipe: the training protocol, with any command-line overrides applied.
        recipe_sources: where each recipe field came from (``recipes.choose_recipe``),
            printed at start and kept in config.json.
        model_dir: where the run writes (see the module docstring).
        data_dir: TFRecords of the recipe's dataset; None for the built-in shapes
            dataset, generated under ``data/shapes`` on first use.
        dataset: a spec name or a custom spec file; it must match the manifest.
        backbone_weights: None, "imagenet" or a weights file.
        init_checkpoint: a ``.keras``/``.weights.h5`` file or a model directory to
            start from (another output stride is fine).
        strategy: ``auto`` (mirrored over several GPUs, else one device),
            ``mirrored``, ``multi_worker`` (from ``TF_CONFIG``) or ``one_device``.
        sync_bn: synchronise batch norm statistics across replicas.
        mixed_precision: float16 on GPUs, bfloat16 on CPUs.
        epochs: passes over the training split; replaces the recipe's steps.
        jit_compile: XLA-compile the train step.
        class_weights: per-class loss weights, or a method computing them from the
            manifest's class frequencies (``CLASS_WEIGHT_METHODS``).
        top_k_percent_pixels, hard_example_mining_step: hard-pixel mining.
        oversample_classes: class ids whose images are duplicated (v3 bootstrapping;
            the recipe's ``bootstrap_hard_classes`` adds the dataset's hard classes).
        seed: seeds weights and data order; None for a random run.
        atrous_implementation: see ``deeplab_tf.layers.AtrousConv2D``.
        overwrite: start afresh in a model directory that holds a finished run.
        verbose: 0 silent, 1 a line every ``log_every`` steps.
        log_every: steps between progress lines.
    """

    variant: str | Variant
    recipe: Recipe
    model_dir: str
    data_dir: str | None = None
    recipe_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    dataset: str | None = None
    backbone_weights: str | None = None
    init_checkpoint: str | None = None
    strategy: str = "auto"
    sync_bn: bool = False
    mixed_precision: bool = False
    jit_compile: bool = False
    class_weights: tuple[float, ...] | str | None = None
    top_k_percent_pixels: float = 1.0
    hard_example_mining_step: int = 0
    oversample_classes: tuple[int, ...] = ()
    seed: int | None = 0
    atrous_implementation: str = DEFAULT_ATROUS_IMPLEMENTATION
    epochs: int | None = None
    overwrite: bool = False
    verbose: int = 1
    log_every: int = 50

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def variant_name(self) -> str:
        return self.variant if isinstance(self.variant, str) else self.variant.name

    @property
    def resolved_variant(self) -> Variant:
        return get_variant(self.variant) if isinstance(self.variant, str) else self.variant


# === Strategy ===


def create_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The distribution strategy ``name`` (see ``TrainConfig.strategy``).

    Without GPUs, ``mirrored`` mirrors over the logical CPU devices (tests split the
    CPU in two with ``tf.config.set_logical_device_configuration``).
    """
    if name not in STRATEGIES:
        raise TrainingError(f"--strategy must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise TrainingError("--strategy multi_worker needs the TF_CONFIG environment variable")
        patch_keras_for_distribution()
        # Must come before anything initialises the TensorFlow runtime (even listing
        # devices): collectives are configured at startup.
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name in ("mirrored", "one_device") or len(gpus) > 1:
        patch_keras_for_distribution()
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        if gpus:
            return tf.distribute.MirroredStrategy(devices=[d.name for d in gpus])
        # On CPU devices the collective all-reduces of synchronised batch norm (three
        # independent ones per layer) can start in different orders on different
        # replicas and abort; reducing through one device orders them.
        return tf.distribute.MirroredStrategy(
            devices=[d.name for d in tf.config.list_logical_devices("CPU")],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(
            (gpus or tf.config.list_logical_devices("CPU"))[0].name
        )
    return tf.distribute.get_strategy()  # the default: one device, no overhead


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints and logs (single process, or the chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


# === Files ===


def load_init_checkpoint(
    model: keras.Model, path: str | Path, new_layers: Sequence[str] = ()
) -> None:
    """Fills ``model`` from a previous stage, whatever its output stride.

    A ``.keras`` file is matched layer by layer by name (the backbone is one
    layer; a multi-scale model's network is matched with a single-scale one's);
    only ``new_layers`` (those the second stage adds) may be missing from it. A
    ``.weights.h5`` file is loaded as saved by ``model.save_weights``.
    """
    path = resolve_checkpoint(path, flag="--init-checkpoint")
    if path.suffix == ".keras":
        source = keras.models.load_model(path, compile=False)
        try:
            report = transfer_weights(single_scale_model(source), single_scale_model(model))
        except ValueError as error:  # a layer of the same name with other shapes
            raise TrainingError(f"--init-checkpoint {path}: {error}") from error
        missing = [name for name in report.missing if name not in new_layers]
        if missing:
            raise TrainingError(
                f"--init-checkpoint {path}: no weights for layers {', '.join(missing)}"
            )
    else:
        model.load_weights(path)


def train_only(model: keras.Model, names: Sequence[str]) -> None:
    """Freezes every layer of ``model`` but ``names`` (a second stage that trains only the
    layers it adds); frozen batch norm and dropout run in inference mode."""
    for layer in single_scale_model(model).layers:
        layer.trainable = layer.name in names


def freeze_batch_norm(model: keras.Model) -> int:
    """Puts every batch norm layer in inference mode with fixed parameters (v3 stage 2)."""
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


# === Data ===


def recipe_for_data(
    variant: str,
    data_dir: str | None,
    *,
    recipe: str | None = None,
    dataset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Recipe, dict[str, str]]:
    """The recipe of a run on ``data_dir`` (None: the built-in shapes dataset) and where
    each field came from: ``recipes.choose_recipe`` on the directory's manifest."""
    manifest = None
    try:
        if data_dir is not None:
            if not Path(data_dir).is_dir():
                raise TrainingError(f"--data-dir {data_dir}: no such directory")
            manifest = read_manifest(data_dir)
        return choose_recipe(
            variant,
            manifest,
            recipe=recipe,
            dataset=None if dataset is None else get_spec(dataset).name,
            overrides=overrides,
            where=f"--data-dir {data_dir}",
        )
    except ValueError as error:  # read_manifest names the file and what is wrong
        raise TrainingError(str(error).splitlines()[0]) from error


def resolve_data(config: TrainConfig) -> tuple[Path, DatasetSpec]:
    """The TFRecord directory and dataset spec of a run, generating shapes if needed.

    The recipe's dataset must be the directory's, and its validation split may share
    no image with its training split (by the manifest's image names)."""
    recipe = config.recipe
    wanted = None if config.dataset is None else get_spec(config.dataset)
    if config.data_dir is None:
        if recipe.dataset != "shapes" or config.dataset not in (None, "shapes"):
            raise TrainingError(
                f"--data-dir is required for dataset {config.dataset or recipe.dataset!r} "
                "(TFRecords from datasets/build_*.py)"
            )
        data_dir = ensure_shapes_tfrecords(DEFAULT_SHAPES_ROOT, progress=bool(config.verbose))
        print(f"no --data-dir given: training on the built-in shapes dataset in {data_dir}")
    else:
        data_dir = Path(config.data_dir)
        if not data_dir.is_dir():
            raise TrainingError(f"--data-dir {data_dir}: no such directory")
    try:
        manifest = read_manifest(data_dir)  # one read: it lists every image's name
        spec = spec_from_dict(manifest["dataset"])
        if wanted is not None and wanted.name != spec.name:
            raise TrainingError(
                f"--dataset {config.dataset} does not match {data_dir}, built from {spec.name!r}"
            )
        if recipe.dataset != spec.name:
            raise TrainingError(
                f"recipe {recipe.name} is for {recipe.dataset}; {data_dir} holds {spec.name!r}"
            )
        splits = [recipe.train_split] + ([recipe.val_split] if recipe.val_split else [])
        for split in splits:
            if pipeline.num_examples(data_dir, split) < 1:
                raise TrainingError(f"--data-dir {data_dir}: split {split!r} is empty")
        names = [set(manifest["splits"][split].get("names", ())) for split in splits]
        shared = sorted(names[0] & names[1]) if len(names) == 2 else []
        if shared:
            raise TrainingError(
                f"--val-split {recipe.val_split} shares {len(shared)} images with --train-split "
                f"{recipe.train_split} (e.g. {shared[0]}): validation must be held out"
            )
    except ValueError as error:  # read_manifest names the file and what is wrong
        raise TrainingError(str(error).splitlines()[0]) from error
    return data_dir, spec


def _class_weights(config: TrainConfig, data_dir: Path, num_classes: int) -> list[float] | None:
    if config.class_weights is None:
        return None
    if isinstance(config.class_weights, str):
        if config.class_weights not in CLASS_WEIGHT_METHODS:
            raise TrainingError(
                f"--class-weights must be numbers or one of {list(CLASS_WEIGHT_METHODS)}"
            )
        split = read_manifest(data_dir)["splits"][config.recipe.train_split]
        frequencies = split["class_pixel_frequency"]
        return list(class_weights_from_frequencies(frequencies, method=config.class_weights))
    if len(config.class_weights) != num_classes:
        raise TrainingError(
            f"--class-weights has {len(config.class_weights)} values, the dataset has "
            f"{num_classes} classes"
        )
    return list(config.class_weights)


# === Callbacks ===


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
        weights = temporary_name(self._weights_path, suffix=".weights.h5")  # Keras's suffix
        try:
            self.model.save_weights(str(weights), overwrite=True)
            os.replace(weights, self._weights_path)
        except BaseException:
            weights.unlink(missing_ok=True)
            raise
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


# === Training ===


def compile_model(
    config: TrainConfig,
    num_classes: int,
    replicas: int = 1,
    class_weights: Sequence[float] | None = None,
    total_steps: int | None = None,
) -> keras.Model:
    """The model of ``config``, compiled with its loss, optimizer and mean IoU.

    Call inside the strategy's scope. ``total_steps`` (default: the recipe's steps)
    is the length of the poly schedule.
    """
    recipe = config.recipe
    total_steps = total_steps or recipe.steps
    variant = config.resolved_variant
    model = build_model(
        variant,
        num_classes,
        output_stride=recipe.output_stride,
        backbone_weights=config.backbone_weights,
        upsample_logits=recipe.upsample_logits,
        atrous_implementation=config.atrous_implementation,
        bn_momentum=recipe.bn_momentum,
        sync_batchnorm=config.sync_bn and replicas > 1,
    )
    if config.init_checkpoint:
        load_init_checkpoint(model, config.init_checkpoint, added_layer_names(variant))
    if recipe.train_only_new_layers:
        train_only(model, added_layer_names(variant))
    if recipe.freeze_bn:
        freeze_batch_norm(model)
    if recipe.lr_policy == "poly":
        schedule = PolyDecay(recipe.learning_rate, total_steps, power=recipe.lr_power)
    else:
        schedule = StepDecay(recipe.learning_rate, recipe.lr_step_size, gamma=recipe.lr_step_gamma)
    multipliers = None
    if recipe.classifier_lr_multiplier != 1:
        classifiers = classifier_layer_names(model)
        if not classifiers:
            raise TrainingError(
                f"--classifier-lr-multiplier: {variant.name} has no classifier layer 'logits'"
            )
        multipliers = {name: recipe.classifier_lr_multiplier for name in classifiers}
    if recipe.optimizer == "adam":
        optimizer = keras.optimizers.Adam(schedule)
    else:
        optimizer = build_optimizer(
            schedule,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            lr_multipliers=multipliers,
        )
    loss = SoftmaxCrossEntropy(
        upsample_logits=recipe.upsample_logits,
        class_weights=class_weights,
        top_k_percent_pixels=config.top_k_percent_pixels,
        hard_example_mining_step=config.hard_example_mining_step,
    )
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=[MeanIoU(num_classes, name="mean_iou")],
        jit_compile=config.jit_compile,
    )
    loss.set_step_source(optimizer.iterations)
    # Built here, the optimizer's slots exist before fit traces its step; built inside
    # that trace, they make tf.function trace the whole step a second time (seconds).
    optimizer.build(model.trainable_variables)
    return model


def check_config(config: TrainConfig, replicas: int) -> None:
    """One-line errors for settings that cannot work."""
    recipe = config.recipe
    variant = config.resolved_variant
    if recipe.train_only_new_layers:
        new_layers = added_layer_names(variant)
        if not new_layers:
            raise TrainingError(
                f"recipe {recipe.name} trains only the layers a variant adds to a first stage; "
                f"{variant.name} adds none (pass --no-train-only-new-layers)"
            )
        if not config.init_checkpoint:
            raise TrainingError(
                f"recipe {recipe.name} trains only the layers {variant.name} adds "
                f"({', '.join(new_layers)}) to a trained first stage: pass --init-checkpoint "
                "(or --no-train-only-new-layers to train everything)"
            )
    check_variant_output_stride(variant, recipe.output_stride)
    for flag, value in (("--batch-size", recipe.batch_size), ("--crop-size", recipe.crop_size)):
        if value < 1:
            raise TrainingError(f"{flag} must be positive, got {value}")
    if recipe.crop_size < recipe.output_stride:
        raise TrainingError(
            f"--crop-size {recipe.crop_size} is smaller than the output stride "
            f"{recipe.output_stride}"
        )
    if recipe.batch_size % replicas:
        raise TrainingError(
            f"--batch-size {recipe.batch_size} is not divisible by the {replicas} replicas "
            "(the batch size is global)"
        )
    if recipe.steps < 1 or recipe.checkpoint_every < 1:
        raise TrainingError("--steps and the checkpoint interval must be positive")


def physical_memory() -> int | None:
    """Bytes of memory of this machine (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config: TrainConfig, replicas: int) -> None:
    """Refuses, before any work, a crop and batch whose first step cannot fit: (training
    on the CPU) more activations than the machine has memory, or a layer output past
    the int32 element count of TensorFlow's 32-bit-indexed (GPU) kernels. The estimate
    is a lower bound (every layer output of the forward pass, kept for the backward
    pass), so nothing that fits is refused; on GPUs the allocator's own out-of-memory
    error is reported instead."""
    recipe = config.recipe
    size = (recipe.crop_size, recipe.crop_size)
    # One class: a lower bound for any dataset, known before the data is read.
    per_image, largest = activation_elements(config.resolved_variant, 1, recipe.output_stride, size)
    flags = f"--crop-size {recipe.crop_size} with --batch-size {recipe.batch_size}"
    memory = physical_memory()
    if memory is not None and not tf.config.list_logical_devices("GPU"):
        bytes_per_element = 2 if config.mixed_precision else 4
        need = per_image * recipe.batch_size * bytes_per_element
        if need > memory:
            raise TrainingError(
                f"{flags}: the first step keeps at least {need / 2**30:.1f} GiB of activations "
                f"({config.variant_name} at output stride {recipe.output_stride}); this "
                f"machine has {memory / 2**30:.1f} GiB"
            )
    per_replica = recipe.batch_size // replicas
    if largest * per_replica > MAX_TENSOR_ELEMENTS:
        raise TrainingError(
            f"{flags}: a layer output of {largest * per_replica:,} elements, more than the "
            f"{MAX_TENSOR_ELEMENTS:,} that TensorFlow's 32-bit-indexed kernels take; use a "
            "smaller crop or batch"
        )


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs ``config``; returns the final validation scores (also in results.json).

    Raises:
        TrainingError: a bad setting or input (one line, naming the flag or file).
    """
    model_dir = Path(config.model_dir)
    finished = (model_dir / "results.json").exists() and not (model_dir / "backup").exists()
    if finished and not config.overwrite:
        raise TrainingError(
            f"--model-dir {model_dir} holds a finished run; pass --overwrite or choose "
            "another directory"
        )
    strategy = create_strategy(config.strategy)  # first: multi-worker needs a fresh runtime
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        gpu = bool(tf.config.list_logical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    replicas = strategy.num_replicas_in_sync
    check_config(config, replicas)
    check_memory(config, replicas)
    data_dir, spec = resolve_data(config)
    recipe = config.recipe
    if config.epochs is not None:
        if config.epochs < 1:
            raise TrainingError(f"--epochs must be positive, got {config.epochs}")
        examples = pipeline.num_examples(data_dir, recipe.train_split)
        recipe = dataclasses.replace(
            recipe, steps=config.epochs * math.ceil(examples / recipe.batch_size)
        )
        sources = {**config.recipe_sources, "steps": f"flag --epochs {config.epochs}"}
        config = dataclasses.replace(config, recipe=recipe, recipe_sources=sources)
    num_classes = spec.num_classes
    # Every check is done: only now does anything in the model directory change.
    if finished or _other_run(config, model_dir, spec):
        shutil.rmtree(model_dir)  # asked for (--overwrite): nothing of the old run is mixed in

    chief = is_chief(strategy)
    # Non-chief workers write to a scratch directory (Keras's multi-worker convention).
    write_dir = model_dir if chief else Path(tempfile.mkdtemp(prefix="deeplab_worker_"))
    write_dir.mkdir(parents=True, exist_ok=True)

    steps_per_epoch = min(recipe.checkpoint_every, recipe.steps)
    epochs = math.ceil(recipe.steps / steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    sources = {
        name: config.recipe_sources.get(name, f"recipe {recipe.name}")
        for name in dataclasses.asdict(recipe)
    }
    if chief:
        # The absolute data path: evaluate.py --model-dir works from any directory, and
        # a moved run directory keeps finding data that stayed.
        resolved = {
            **config.to_dict(),
            "recipe_sources": sources,
            "data_dir": str(data_dir.resolve()),
            "dataset_name": spec.name,
            "num_classes": num_classes,
            "total_steps": total_steps,
        }
        write_json_atomic(write_dir / "config.json", resolved)
    if config.verbose:
        print(f"training {config.variant_name} on {data_dir} ({spec.name})")
        print(format_recipe(recipe, sources))
        validation = f"on {recipe.val_split}" if recipe.val_split else "none (no held-out split)"
        print(
            f"  replicas: {replicas}, total steps: {total_steps}, validation: {validation}, "
            f"model dir: {model_dir}"
        )

    class_weights = _class_weights(config, data_dir, num_classes)
    with strategy.scope():
        model = compile_model(config, num_classes, replicas, class_weights, total_steps)

    oversample = tuple(config.oversample_classes)
    if recipe.bootstrap_hard_classes:
        oversample = tuple(sorted(set(oversample) | set(spec.hard_class_ids)))

    def train_input(context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        return pipeline.train_dataset(
            data_dir,
            recipe.train_split,
            batch_size=recipe.batch_size,
            crop_size=recipe.crop_size,
            min_scale=recipe.min_scale,
            max_scale=recipe.max_scale,
            scale_step=recipe.scale_step,
            seed=config.seed,
            oversample_classes=oversample,
            input_context=context,
        )

    if replicas > 1:
        train_data = strategy.distribute_datasets_from_function(train_input)
    else:
        train_data = train_input()
    val_data, validation_steps = None, None
    if recipe.val_split and replicas > 1:
        # Padded batches of one image per replica; padding is labelled 255, so the
        # valid mask is dropped.
        val_data = pipeline.eval_dataset(data_dir, recipe.val_split, batch_size=replicas)
        val_data = val_data.map(lambda image, label, valid: (image, label))
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        val_data = val_data.with_options(options)
    elif recipe.val_split:
        val_data = pipeline.eval_dataset(data_dir, recipe.val_split)
    if recipe.val_split:
        examples = pipeline.num_examples(data_dir, recipe.val_split)
        validation_steps = math.ceil(examples / replicas)

    samples = []
    if recipe.val_split:
        samples = list(pipeline.eval_dataset(data_dir, recipe.val_split).take(4))
    same_size = len({tuple(x.shape) for x, _ in samples}) == 1
    callbacks: list[keras.callbacks.Callback] = [
        AtomicBackupAndRestore(str(write_dir / "backup")),
        TerminateOnNaNWithAdvice(),
        keras.callbacks.CSVLogger(str(write_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(write_dir / "logs"), write_graph=False),
        AtomicCheckpoints(write_dir),
    ]
    if same_size and chief:
        images = np.concatenate([x.numpy() for x, _ in samples])
        labels = np.concatenate([y.numpy() for _, y in samples])
        callbacks.append(PredictionImages(write_dir / "logs", images, labels, spec.palette()))
    first_step = _backed_up_epoch(write_dir / "backup") * steps_per_epoch
    if first_step and config.verbose:
        print(f"resuming from the backup in {write_dir / 'backup'} at step {first_step}")
    if config.verbose:
        callbacks.append(
            ProgressLogger(config.log_every, recipe.batch_size, total_steps, first_step)
        )

    try:
        model.fit(
            train_data,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_data,
            validation_steps=validation_steps,
            callbacks=callbacks,
            shuffle=False,  # the pipeline shuffles
            verbose=0,
        )
    except tf.errors.DataLossError as error:
        then = f"rerun the same command: it resumes from {write_dir / 'backup'}"
        splits = [recipe.train_split] + ([recipe.val_split] if recipe.val_split else [])
        raise TrainingError(str(corrupt_shard_error(data_dir, splits, error, then))) from None
    if model.stop_training and not model.optimizer.iterations.numpy() >= total_steps:
        raise TrainingError("training stopped early: the loss became NaN (see above)")

    results = {
        "variant": config.variant_name,
        "recipe": recipe.name,
        "split": recipe.val_split,
        "steps": int(model.optimizer.iterations.numpy()),
    }
    if recipe.val_split:
        # The same evaluation as evaluate.py: whole images at the labels' full resolution.
        evaluation = evaluate(Predictor(model), data_dir, recipe.val_split, progress=False)
        keys = ("class_names", *SCORE_KEYS, "per_class_iou", "confusion_matrix")
        results.update({key: evaluation.results[key] for key in keys})
    if chief:
        write_json_atomic(write_dir / "results.json", results)
    if config.verbose and recipe.val_split:
        print(format_results(results))
    elif config.verbose:
        print(f"no validation split: score {model_dir} with evaluate.py on a held-out split")
    return results


def _other_run(config: TrainConfig, model_dir: Path, spec: DatasetSpec) -> bool:
    """Whether ``model_dir`` holds an unfinished run (a backup) of another variant,
    dataset or number of classes: True to replace it with ``--overwrite``, else a
    one-line error before anything is written (its backup cannot be resumed)."""
    old_file = model_dir / "config.json"
    if not (model_dir / "backup").exists() or not old_file.is_file():
        return False
    old = json.loads(old_file.read_text())
    new = {"variant": config.to_dict()["variant"], "dataset_name": spec.name,
           "num_classes": spec.num_classes}  # fmt: skip
    differ = [key for key, value in new.items() if key in old and old[key] != value]
    if not differ:
        return False  # the same run: resume it
    if config.overwrite:
        return True
    name = old["variant"] if isinstance(old["variant"], str) else old["variant"].get("name")
    raise TrainingError(
        f"--model-dir {model_dir} holds an unfinished run of {name} on "
        f"{old.get('dataset_name', old.get('recipe', {}).get('dataset'))} (other "
        f"{', '.join(differ)}): rerun its command to resume it, or pass --overwrite"
    )


def _backed_up_epoch(backup_dir: Path) -> int:
    metadata = backup_dir / "training_metadata.json"
    if not metadata.is_file():
        return 0
    return int(json.loads(metadata.read_text()).get("epoch", 0))


__all__: Sequence[str] = [
    "STRATEGIES",
    "TrainConfig",
    "TrainingError",
    "create_strategy",
    "format_results",
    "train",
]
