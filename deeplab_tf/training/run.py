"""``train``: a run from its settings to results.json."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from deeplab_tf.data import pipeline
from deeplab_tf.data.specs import DatasetSpec
from deeplab_tf.data.tfrecord import corrupt_shard_error
from deeplab_tf.evaluation import SCORE_KEYS, Evaluator, evaluate, format_results
from deeplab_tf.files import write_json_atomic
from deeplab_tf.inference import Predictor
from deeplab_tf.layers import normalization_mean
from deeplab_tf.metrics import MeanIoU
from deeplab_tf.precision import bfloat16_cannot_run
from deeplab_tf.recipes import format_recipe
from deeplab_tf.training.callbacks import (
    AtomicBackupAndRestore,
    AtomicCheckpoints,
    PredictionImages,
    ProgressLogger,
    TerminateOnNaNWithAdvice,
)
from deeplab_tf.training.config import TrainConfig, TrainingError, check_config, check_memory
from deeplab_tf.training.data import class_weights_for, inputs, resolve_data
from deeplab_tf.training.model_setup import compile_model
from deeplab_tf.training.strategies import create_strategy, is_chief


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs ``config``; returns the final validation scores (also in results.json).

    ``mixed_precision`` sets Keras's global dtype policy for the run and restores the
    caller's afterwards, so models built later in the same process stay float32.

    Raises:
        TrainingError: a bad setting or input (one line, naming the flag or file).
    """
    caller_policy = keras.mixed_precision.global_policy()
    try:
        return _train(config)
    finally:
        keras.mixed_precision.set_global_policy(caller_policy)


def _train(config: TrainConfig) -> dict[str, Any]:
    model_dir = Path(config.model_dir)
    finished = (model_dir / "results.json").exists() and not (model_dir / "backup").exists()
    if finished and not config.overwrite:
        raise TrainingError(
            f"--model-dir {model_dir} holds a finished run; pass --overwrite or choose "
            "another directory"
        )
    strategy = create_strategy(config.strategy)  # first: multi-worker needs a fresh runtime
    if config.mixed_precision:
        gpu = bool(tf.config.list_logical_devices("GPU"))
        cannot_run = None if gpu else bfloat16_cannot_run()
        if cannot_run:
            raise TrainingError(
                f"--mixed-precision: {cannot_run}; raise or unset that cap, or train without "
                "--mixed-precision"
            )
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

    class_weights = class_weights_for(config, data_dir, num_classes)
    # The seed right before the model and the data: the checks above build models too
    # (check_memory), which would otherwise draw from the seeded generator first.
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = compile_model(config, num_classes, replicas, class_weights, total_steps)

    mean_pixel = normalization_mean(model)  # padding that normalises to zero
    train_data, val_data, validation_steps = inputs(
        config, recipe, data_dir, spec, strategy, mean_pixel
    )

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
        results.update(_final_scores(model, data_dir, recipe.val_split, replicas))
    if chief:
        write_json_atomic(write_dir / "results.json", results)
    else:
        shutil.rmtree(write_dir, ignore_errors=True)  # the scratch is of no further use
    if config.verbose and recipe.val_split:
        print(format_results(results))
    elif config.verbose:
        print(f"no validation split: score {model_dir} with evaluate.py on a held-out split")
    return results


def _final_scores(model: keras.Model, data_dir: Path, split: str, replicas: int) -> dict[str, Any]:
    """The scores of ``split`` at the labels' full resolution, as evaluate.py reports
    them. On one replica, ``fit``'s last validation computed exactly these (whole images,
    logits resized bilinearly to the labels, batch 1) and its confusion matrix is reused;
    on several, validation batches were padded, which moves border predictions, and on a
    resumed run whose fit had nothing left to do there was none: evaluated anew."""
    metric = validation_metric(model)
    if replicas == 1 and metric is not None and metric.confusion_matrix.numpy().sum() > 0:
        evaluator = Evaluator(metric.num_classes)
        evaluator.restore({"confusion": metric.confusion_matrix.numpy()})
        results = evaluator.results()
        results["class_names"] = list(pipeline.dataset_spec(data_dir).class_names)
    else:
        results = evaluate(Predictor(model), data_dir, split, progress=False).results
    keys = ("class_names", *SCORE_KEYS, "per_class_iou", "confusion_matrix")
    return {key: results[key] for key in keys}


def validation_metric(model: keras.Model) -> MeanIoU | None:
    """The compiled ``MeanIoU`` of ``model`` (``compile_model``'s), holding the counts of
    the last validation after ``fit``."""
    stack = list(model.metrics)
    while stack:
        metric = stack.pop()
        if isinstance(metric, MeanIoU):
            return metric
        stack.extend(getattr(metric, "metrics", []))
    return None


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
