"""The model of a run: built, initialised from a checkpoint, partly frozen, compiled
with the recipe's optimizer, loss and metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras

from deeplab_tf.backbones import transfer_weights
from deeplab_tf.inference import resolve_checkpoint
from deeplab_tf.losses import (
    SoftmaxCrossEntropy,
)
from deeplab_tf.metrics import MeanIoU
from deeplab_tf.model import (
    added_layer_names,
    build_model,
    classifier_layer_names,
)
from deeplab_tf.multiscale import single_scale_model
from deeplab_tf.schedules import PolyDecay, StepDecay, build_optimizer
from deeplab_tf.training.config import TrainConfig, TrainingError


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
