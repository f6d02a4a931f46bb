"""The settings of a training run (``TrainConfig``) and their checks, made before
anything is written: settings that cannot work, memory the run cannot have."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import tensorflow as tf

from deeplab_tf.backbones import check_weights
from deeplab_tf.model import (
    DEFAULT_ATROUS_IMPLEMENTATION,
    MAX_TENSOR_ELEMENTS,
    activation_elements,
    added_layer_names,
    check_variant_output_stride,
)
from deeplab_tf.recipes import Recipe
from deeplab_tf.variants import Variant, get_variant


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
    check_weights(variant.backbone, config.backbone_weights)  # before any data is made
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
