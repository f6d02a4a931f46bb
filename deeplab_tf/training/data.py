"""The data of a run: the recipe for the data, the dataset (the built-in shapes by
default), class weights and the training and validation inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf

from deeplab_tf.data import pipeline
from deeplab_tf.data.shapes import ensure_shapes_tfrecords
from deeplab_tf.data.specs import DatasetSpec, get_spec, spec_from_dict
from deeplab_tf.data.tfrecord import read_manifest
from deeplab_tf.losses import (
    CLASS_WEIGHT_METHODS,
    class_weights_from_frequencies,
)
from deeplab_tf.recipes import Recipe, choose_recipe
from deeplab_tf.training.config import TrainConfig, TrainingError

# Where the built-in dataset is generated when no --data-dir is given.
DEFAULT_SHAPES_ROOT = Path("data") / "shapes"


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


def class_weights_for(config: TrainConfig, data_dir: Path, num_classes: int) -> list[float] | None:
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


def inputs(
    config: TrainConfig,
    recipe: Recipe,
    data_dir: Path,
    spec: DatasetSpec,
    strategy: tf.distribute.Strategy,
    mean_pixel: Sequence[float],
) -> tuple[Any, tf.data.Dataset | None, int | None]:
    """The training data (distributed over ``strategy``'s replicas), the validation data
    and its steps (None without a validation split)."""
    replicas = strategy.num_replicas_in_sync
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
            mean_pixel=mean_pixel,
        )

    if replicas > 1:
        train_data = strategy.distribute_datasets_from_function(train_input)
    else:
        train_data = train_input()
    if not recipe.val_split:
        return train_data, None, None
    if replicas > 1:
        # Padded batches of one image per replica; padding is labelled 255, so the
        # valid mask is dropped.
        val_data = pipeline.eval_dataset(
            data_dir, recipe.val_split, batch_size=replicas, mean_pixel=mean_pixel
        )
        val_data = val_data.map(lambda image, label, valid: (image, label))
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        val_data = val_data.with_options(options)
    else:
        val_data = pipeline.eval_dataset(data_dir, recipe.val_split)
    examples = pipeline.num_examples(data_dir, recipe.val_split)
    return train_data, val_data, math.ceil(examples / replicas)
