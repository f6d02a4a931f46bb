"""Training: ``train(TrainConfig(...))`` runs a recipe under a ``tf.distribute`` strategy.

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

The modules: ``config`` (settings and their checks), ``data`` (recipe for the data,
inputs), ``model_setup`` (build, initialise, compile), ``callbacks``, ``strategies``
(the only module that creates a ``tf.distribute`` strategy) and ``run`` (``train``).
"""

from deeplab_tf.training.callbacks import AtomicBackupAndRestore, PredictionImages
from deeplab_tf.training.config import TrainConfig, TrainingError, check_config, check_memory
from deeplab_tf.training.data import recipe_for_data
from deeplab_tf.training.model_setup import compile_model, load_init_checkpoint
from deeplab_tf.training.run import format_results, train
from deeplab_tf.training.strategies import STRATEGIES, create_strategy, is_chief

__all__ = [
    "STRATEGIES",
    "AtomicBackupAndRestore",
    "PredictionImages",
    "TrainConfig",
    "TrainingError",
    "check_config",
    "check_memory",
    "compile_model",
    "create_strategy",
    "format_results",
    "is_chief",
    "load_init_checkpoint",
    "recipe_for_data",
    "train",
]
