"""The one place where deeplab_tf changes Keras: ``model.fit`` under ``tf.distribute``.

Out of the box (Keras 3.15 with TensorFlow) ``fit`` under a strategy fails three
times; 1 and 2 are keras-team/keras issue 20585 (``MultiWorkerMirroredStrategy``),
3 hits every strategy, ``MirroredStrategy`` included:

1. ``TensorFlowTrainer._maybe_symbolic_build`` builds the model from the first
   batch reduced with ``strategy.reduce("MEAN", batch, axis=None)``: a collective
   over the *data* of all workers, which fails on integer labels and is not
   needed, since only one replica's shapes are wanted.
2. ``reduce_per_replica(..., reduction="mean")`` calls
   ``strategy.reduce("MEAN", v, axis=0)`` on every logged value under a
   multi-worker strategy, and the loss is a scalar, which has no axis 0.
3. ``_maybe_symbolic_build`` also takes a batch from the iterator at every
   ``evaluate`` of ``fit``, built or not: with ``validation_steps`` the validation
   iterator runs dry at the second epoch.

The patch replaces those two spots; it checks first that Keras still has the
code it was written against and raises otherwise, so a Keras upgrade that
changes them fails loudly instead of silently running different code.
"""

from __future__ import annotations

import inspect

import keras
import tensorflow as tf

# Snippets of the code the patch replaces, as found in Keras 3.15.
_SYMBOLIC_BUILD_SNIPPET = (
    'data_batch = self.distribute_strategy.reduce(\n                        "MEAN",'
)
_REDUCE_SNIPPET = 'return strategy.reduce("MEAN", v, axis=0)'

_applied = False


class KerasPatchError(RuntimeError):
    """Keras changed under the multi-worker patch; it must be re-checked."""


def _check_source(function, snippet: str) -> None:
    source = inspect.getsource(function)
    if snippet not in source:
        raise KerasPatchError(
            f"keras {keras.__version__} changed {function.__qualname__}: the "
            "distribution patch in deeplab_tf/keras_patches.py "
            "(keras-team/keras issue 20585) must be re-checked against it"
        )


def patch_keras_for_distribution() -> None:
    """Makes ``model.fit`` work under distribution strategies (idempotent).

    Raises:
        KerasPatchError: Keras no longer has the code this patch replaces.
    """
    global _applied
    if _applied:
        return
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    trainer_cls = tf_trainer.TensorFlowTrainer
    _check_source(trainer_cls._maybe_symbolic_build, _SYMBOLIC_BUILD_SNIPPET)
    _check_source(tf_trainer.reduce_per_replica, _REDUCE_SNIPPET)
    original_reduce = tf_trainer.reduce_per_replica

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        needs_data = not all(layer.built for layer in self._flatten_layers()) or any(
            part is not None and not part.built
            for part in (self._compile_metrics, self._compile_loss)
        )
        # Keras takes a batch on every call, even when all is built: from the
        # validation iterator of fit that loses a batch per epoch and, with
        # validation_steps, runs the iterator dry (StopIteration) at the second epoch.
        if iterator is not None and needs_data:
            for _, _, it in iterator:
                batch = next(it)
                # Shapes are all the build needs: one local replica's batch.
                data_batch = tree.map_structure(
                    lambda x: (
                        self.distribute_strategy.experimental_local_results(x)[0]
                        if isinstance(x, tf.distribute.DistributedValues)
                        else x
                    ),
                    batch,
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(
            strategy
        ):

            def _mean(v):
                local = strategy.experimental_local_results(v)[0]
                # Scalars (the loss) have no axis 0 to reduce over.
                return strategy.reduce("MEAN", v, axis=0 if local.shape.rank else None)

            return tree.map_structure(_mean, values)
        return original_reduce(values, strategy, reduction)

    trainer_cls._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _applied = True
