"""Learning-rate policies (poly, step) and the DeepLab SGD optimiser.

* ``PolyDecay``: lr(t) = (lr0 - lr_end) (1 - t/T)^power + lr_end, power 0.9
  (v2 paper, section 4.1; v3 paper, section 4.1).
* ``StepDecay``: lr(t) = lr0 gamma^floor(t / step_size), Caffe's "step" policy
  (v1/v2: x0.1 every 2000 iterations).
* ``DeepLabSGD`` / ``build_optimizer``: momentum SGD with an L2 weight decay on
  convolution and dense kernels that passes through momentum, as the papers'
  Caffe/TF1 regulariser does, and per-layer learning-rate multipliers (v1/v2:
  10x on the final classifier ``logits``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from deeplab_tf.losses import check_int

_register = keras.saving.register_keras_serializable(package="deeplab_tf")


class _WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Shared step handling: clamp the step to [0, ∞), then an optional linear warm-up.

    For t < warmup_steps: lr(t) = a + (decayed(W) - a) t / W with a =
    ``warmup_learning_rate`` and W = ``warmup_steps``, so the warm-up joins the
    policy continuously; afterwards lr(t) = decayed(t). Subclasses define
    ``decayed`` on a float32 step.
    """

    def __init__(self, warmup_steps: int = 0, warmup_learning_rate: float = 0.0):
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.warmup_learning_rate = float(warmup_learning_rate)

    def decayed(self, step: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def __call__(self, step):
        step = tf.maximum(tf.cast(step, tf.float32), 0.0)
        lr = self.decayed(step)
        if self.warmup_steps == 0:
            return lr
        warmup_end = float(self.warmup_steps)
        start = self.warmup_learning_rate
        warm = start + (self.decayed(tf.constant(warmup_end)) - start) * step / warmup_end
        return tf.where(step < warmup_end, warm, lr)

    def get_config(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "warmup_learning_rate": self.warmup_learning_rate,
        }


@_register
class PolyDecay(_WarmupSchedule):
    """The "poly" policy: lr(t) = (lr0 - end) (1 - min(t, T)/T)^power + end.

    Steps past ``decay_steps`` (T, the training length) give ``end_learning_rate``:
    the step is clamped, so the rate never goes negative or NaN. Optional linear
    warm-up as in ``_WarmupSchedule`` (from ``warmup_learning_rate`` at step 0 to
    the poly value at ``warmup_steps``).

    Args:
        initial_learning_rate: lr0 (v3: 0.007 at OS16, 0.001 for the OS8 stage).
        decay_steps: T, the number of training steps (v3: 30K).
        power: 0.9 in every DeepLab paper.
        end_learning_rate: the rate reached at T.
        warmup_steps, warmup_learning_rate: linear warm-up length and start rate.

    Reference: DeepLab v2 (TPAMI), section 4.1 ("poly"); DeepLab v3, section 4.1.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        power: float = 0.9,
        end_learning_rate: float = 0.0,
        warmup_steps: int = 0,
        warmup_learning_rate: float = 0.0,
    ):
        super().__init__(warmup_steps, warmup_learning_rate)
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = check_int("decay_steps", decay_steps, 1)
        self.power = float(power)
        self.end_learning_rate = float(end_learning_rate)

    def decayed(self, step):
        progress = tf.minimum(step, float(self.decay_steps)) / float(self.decay_steps)
        span = self.initial_learning_rate - self.end_learning_rate
        return span * tf.pow(1.0 - progress, self.power) + self.end_learning_rate

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "power": self.power,
            "end_learning_rate": self.end_learning_rate,
            **super().get_config(),
        }


@_register
class StepDecay(_WarmupSchedule):
    """The "step" policy: lr(t) = lr0 gamma^floor(t / step_size).

    Args:
        initial_learning_rate: lr0 (v1/v2: 0.001).
        step_size: steps between drops (v1/v2: 2000).
        gamma: factor per drop (v1/v2: 0.1).
        warmup_steps, warmup_learning_rate: linear warm-up length and start rate.

    Reference: DeepLab v1 (ICLR 2015), section 4.1; DeepLab v2, section 4.1 ("step").
    """

    def __init__(
        self,
        initial_learning_rate: float,
        step_size: int,
        gamma: float = 0.1,
        warmup_steps: int = 0,
        warmup_learning_rate: float = 0.0,
    ):
        super().__init__(warmup_steps, warmup_learning_rate)
        self.initial_learning_rate = float(initial_learning_rate)
        self.step_size = check_int("step_size", step_size, 1)
        self.gamma = float(gamma)

    def decayed(self, step):
        drops = tf.floor(step / float(self.step_size))
        return self.initial_learning_rate * tf.pow(self.gamma, drops)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "step_size": self.step_size,
            "gamma": self.gamma,
            **super().get_config(),
        }


def is_decayed_variable(path: str) -> bool:
    """True for convolution and dense kernels (``.../kernel``, ``.../depthwise_kernel``,
    ``.../pointwise_kernel``): the variables the L2 weight decay applies to. Biases
    and batch-norm gamma/beta are not decayed."""
    return path.rsplit("/", 1)[-1].endswith("kernel")


def lr_multiplier_for(path: str, lr_multipliers: Mapping[str, float]) -> float:
    """The multiplier of the longest key that names whole components of ``path``; 1 if none.

    A key matches when it is a run of complete ``/``-separated components of the
    variable path, wherever it starts: Keras prefixes paths with the enclosing
    model's name when layers are built in its scope (``sequential/logits/kernel``,
    or a nested backbone's ``resnet/...``), so a key is not anchored at the start.
    ``{"logits": 10}`` covers ``logits/kernel`` and ``logits/bias``;
    ``{"logits": 10, "logits/bias": 20}`` gives Caffe DeepLab's fc8 multipliers.
    """
    padded = f"/{path}/"
    best, multiplier = -1, 1.0
    for key, value in lr_multipliers.items():
        if f"/{key.strip('/')}/" in padded and len(key) > best:
            best, multiplier = len(key), float(value)
    return multiplier


@_register
class DeepLabSGD(keras.optimizers.SGD):
    """Momentum SGD with L2 weight decay through momentum and per-layer lr multipliers.

    For each trainable variable w with path p (e.g. ``logits/kernel``) and
    gradient g (already summed over replicas), the gradient given to SGD is

        g' = m(p) (g + l2_weight_decay * w * [p is a kernel])

    with m(p) from ``lr_multipliers`` (``lr_multiplier_for``), then Keras SGD
    applies v <- momentum v - lr g'; w <- w + v. This is the papers' Caffe/TF1
    update: an L2 term (l2_weight_decay / 2) |w|^2 in the loss for conv/dense
    kernels only (``is_decayed_variable``), which passes through momentum, and a
    layer's ``lr_mult``, which with momentum SGD equals a layer learning rate m lr.
    Keras's own ``weight_decay`` (also accepted, through ``**kwargs``) is the
    decoupled form w <- w - lr wd w, which skips momentum; leave it None.

    The decay term is added after the cross-replica sum, so it counts once under
    a distribution strategy, and after any gradient clipping.

    Args:
        learning_rate: float or schedule (``PolyDecay``, ``StepDecay``).
        momentum: 0.9 in all DeepLab papers.
        nesterov: Nesterov momentum (not used by the papers).
        l2_weight_decay: L2 coefficient on kernels (v1/v2: 5e-4; v3 code: 1e-4).
        lr_multipliers: ``{layer name or path components: multiplier}``
            (``lr_multiplier_for``).
        name, **kwargs: as ``keras.optimizers.SGD``.

    Reference: DeepLab v1, section 4.1 (momentum 0.9, weight decay 5e-4, 10x lr on
    the classifier); DeepLab v2, section 4.1; Caffe ``SGDSolver``.
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.001,
        momentum: float = 0.9,
        nesterov: bool = False,
        l2_weight_decay: float = 0.0,
        lr_multipliers: Mapping[str, float] | None = None,
        name: str = "deeplab_sgd",
        **kwargs,
    ):
        if l2_weight_decay < 0:
            raise ValueError(f"l2_weight_decay must be >= 0, got {l2_weight_decay}")
        super().__init__(
            learning_rate=learning_rate,
            momentum=float(momentum),
            nesterov=nesterov,
            name=name,
            **kwargs,
        )
        self.l2_weight_decay = float(l2_weight_decay)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # Per-variable constants, indexed like Keras's own slot variables.
        self._decay_flags = tuple(is_decayed_variable(v.path) for v in variables)
        self._multipliers = tuple(lr_multiplier_for(v.path, self.lr_multipliers) for v in variables)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        gradient = tf.cast(gradient, variable.dtype)
        if self.l2_weight_decay and self._decay_flags[index]:
            gradient = gradient + tf.cast(self.l2_weight_decay, variable.dtype) * variable
        if self._multipliers[index] != 1.0:
            gradient = gradient * tf.cast(self._multipliers[index], variable.dtype)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            # dict(): tracking wraps dict attributes in a _DictWrapper.
            {"l2_weight_decay": self.l2_weight_decay, "lr_multipliers": dict(self.lr_multipliers)}
        )
        return config


def build_optimizer(
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_multipliers: Mapping[str, float] | None = None,
    nesterov: bool = False,
    **kwargs,
) -> DeepLabSGD:
    """The DeepLab optimiser: ``DeepLabSGD`` with ``weight_decay`` as the papers' L2 decay.

    ``weight_decay`` is the L2 coefficient on conv/dense kernels, applied through
    momentum (not Keras's decoupled decay); ``lr_multipliers`` such as
    ``{"logits": 10.0}`` scale the learning rate of the named layers. Extra
    ``kwargs`` (``clipnorm``, ``global_clipnorm``, ...) go to ``keras.optimizers.SGD``.

    Example (v2, VOC): ``build_optimizer(PolyDecay(0.001, 20000), weight_decay=5e-4,
    lr_multipliers={"logits": 10.0})``.

    Reference: DeepLab v2 (TPAMI), section 4.1; DeepLab v3, section 4.1.
    """
    return DeepLabSGD(
        learning_rate=learning_rate,
        momentum=momentum,
        nesterov=nesterov,
        l2_weight_decay=weight_decay,
        lr_multipliers=lr_multipliers,
        **kwargs,
    )
