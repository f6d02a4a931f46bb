"""The ``tf.distribute`` strategies of training (``--strategy``): the only module that
creates one."""

from __future__ import annotations

import os

import tensorflow as tf

from deeplab_tf.keras_patches import patch_keras_for_distribution

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")


def create_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The distribution strategy ``name`` (see ``TrainConfig.strategy``).

    Without GPUs, ``mirrored`` mirrors over the logical CPU devices (tests split the
    CPU in two with ``tf.config.set_logical_device_configuration``).
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy multi_worker needs the TF_CONFIG environment variable")
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
