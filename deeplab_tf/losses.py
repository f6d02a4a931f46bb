"""Per-pixel softmax cross-entropy for segmentation, and class weights from pixel frequencies.

The loss follows the TF1 DeepLab training code
(``utils/train_utils.add_softmax_cross_entropy_loss_for_each_scale``): logits are
bilinearly upsampled to the label size (v3 paper, section 4.1) or labels are
nearest-neighbour subsampled to the logits' size (v1/v2), pixels labelled 255
never count, pixel losses may be weighted per class, and online hard-pixel
mining keeps the top-k percent of pixel losses with a linear warm-up.

The shared label helpers (``labels_to_int``, ``resize_labels_nearest``,
``resize_logits_bilinear``) are also used by ``deeplab_tf.metrics``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from deeplab_tf.data.specs import IGNORE_LABEL
from deeplab_tf.layers import resize_bilinear_aligned

CLASS_WEIGHT_METHODS = ("inverse", "inverse_sqrt", "median_frequency")


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or a one-line ``ValueError`` naming ``name`` and the minimum."""
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def labels_to_int(labels: Any) -> tf.Tensor:
    """Labels [N, H, W] or [N, H, W, 1] of any numeric dtype -> int32 [N, H, W]."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 4:
        labels = tf.squeeze(labels, axis=-1)
    if labels.dtype.is_floating:
        # Float labels (Keras casts y_true to the loss dtype) hold exact integers.
        labels = tf.round(labels)
    return tf.cast(labels, tf.int32)


def _aligned_nearest_indices(src: tf.Tensor, dst: tf.Tensor) -> tf.Tensor:
    # Corners aligned, as tf.compat.v1.image.resize_nearest_neighbor(align_corners=True)
    # in the DeepLab code: output i samples input round(i * (src - 1) / (dst - 1)).
    # Integer arithmetic, so 513 -> 65 picks exactly every 8th pixel.
    i = tf.range(dst)
    num = 2 * i * (src - 1) + (dst - 1)
    return num // (2 * tf.maximum(dst - 1, 1))


def resize_labels_nearest(labels: tf.Tensor, size: Any) -> tf.Tensor:
    """Nearest-neighbour resampling of int labels [N, H, W] to ``size`` = (h, w).

    Output pixel (i, j) is input pixel (round(i (H-1)/(h-1)), round(j (W-1)/(w-1)))
    (corners aligned, as in the DeepLab code), so only values of the input label
    appear in the output: labels are never interpolated (v1 paper, section 4.1:
    "subsample the ground truth").
    """
    shape = tf.shape(labels)
    size = tf.convert_to_tensor(size, tf.int32)
    rows = _aligned_nearest_indices(shape[1], size[0])
    cols = _aligned_nearest_indices(shape[2], size[1])
    return tf.gather(tf.gather(labels, rows, axis=1), cols, axis=2)


def resize_logits_bilinear(logits: tf.Tensor, size: Any) -> tf.Tensor:
    """Bilinear resize of [N, h, w, C] to ``size`` with corners aligned (as the model's
    ``ResizeBilinear``); float32 out; no resize at all when the size already matches."""
    logits = tf.cast(logits, tf.float32)
    size = tf.convert_to_tensor(size, tf.int32)
    same = tf.reduce_all(tf.equal(tf.shape(logits)[1:3], size))
    return tf.cond(
        same,
        lambda: logits,
        lambda: resize_bilinear_aligned(logits, size),
    )


def sum_over_replicas(value: tf.Tensor) -> tf.Tensor:
    """Sum of ``value`` over the replicas in sync (itself outside a replica context)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def class_weights_from_frequencies(
    frequencies: Sequence[float] | np.ndarray, method: str = "inverse_sqrt"
) -> list[float]:
    """Per-class loss weights from class pixel frequencies (or counts).

    ``frequencies`` is the manifest's ``class_pixel_frequency`` (or
    ``class_pixel_counts``); it is first normalised to f_c summing to 1. With f
    the frequencies of the classes present (f_c > 0):

    * ``"inverse"``: w_c = 1 / f_c, then scaled so that sum_c f_c w_c = 1;
    * ``"inverse_sqrt"``: w_c = 1 / sqrt(f_c), then scaled so that sum_c f_c w_c = 1;
    * ``"median_frequency"``: w_c = median(f) / f_c (median frequency balancing,
      Eigen & Fergus, ICCV 2015, section 4.1), not rescaled.

    The scaling keeps the expected weight of a pixel at 1, so the loss keeps its
    unweighted magnitude and the learning rate needs no change. Classes with
    f_c = 0 never occur in the split the counts came from and get weight 0.
    """
    if method not in CLASS_WEIGHT_METHODS:
        raise ValueError(f"method must be one of {CLASS_WEIGHT_METHODS}, got {method!r}")
    f = np.asarray(frequencies, np.float64)
    if f.ndim != 1 or f.size == 0 or not np.all(np.isfinite(f)) or np.any(f < 0) or f.sum() <= 0:
        raise ValueError(
            "frequencies must be a non-empty 1-D list of non-negative numbers with a positive sum"
        )
    f = f / f.sum()
    present = f > 0
    w = np.zeros_like(f)
    if method == "median_frequency":
        w[present] = np.median(f[present]) / f[present]
    else:
        w[present] = f[present] ** (-1.0 if method == "inverse" else -0.5)
        w /= np.sum(f * w)
    return [float(x) for x in w]


@keras.saving.register_keras_serializable(package="deeplab_tf")
class SoftmaxCrossEntropy(keras.losses.Loss):
    """Softmax cross-entropy from logits, averaged over the non-ignored pixels of the batch.

    Labels are [N, H, W] or [N, H, W, 1] class ids (any int or float dtype);
    ``ignore_label`` pixels never count. Logits are [N, h, w, C]. With
    ``upsample_logits=True`` (v3) logits are bilinearly upsampled to the label
    size, corners aligned (no resize when the sizes match, as for our models,
    which already output logits at the input size); with ``False`` (v1/v2) labels
    are nearest-neighbour subsampled to the logits' size (``resize_labels_nearest``).

    Value. With l_p the cross-entropy of pixel p, times ``class_weights[label_p]``
    when given, and V the non-ignored pixels of the *global* batch (all replicas):

    * ``top_k_percent_pixels == 1``: loss = sum_{p in V} l_p / |V|;
    * otherwise: loss = sum of the k largest l_p (p in V) / k, with
      k = max(1, floor(r |V|)) and r = ratio * top_k_percent_pixels + (1 - ratio),
      ratio = min(1, step / hard_example_mining_step) (1 when that step is 0 or no
      step source is set). Under a distribution strategy each replica takes its
      own top k_r of its pixels and k = sum_r k_r.
    * A batch with no valid pixel gives 0 (and zero gradients), not NaN.

    Like TF1 DeepLab, class weights scale the numerator only: the denominator is
    the number of counted pixels, not the sum of their weights.

    Reduction. ``call`` returns one value per image, v_i = S_i N R / D, where S_i
    is the sum of the counted pixel losses of image i, N the per-replica batch
    size, R the number of replicas in sync and D the global number of counted
    pixels (an all-reduce over replicas). Keras's ``"sum_over_batch_size"``
    reduction divides by N, and by R under a strategy before the gradients are
    summed over replicas, so ``loss(y, p)`` is exactly the mean above, on one
    device or many. Returning a scalar from ``call`` instead would skip Keras's
    division by R (``reduce_values`` passes scalars through), giving R times the
    gradient. A ``sample_weight`` multiplies v_i.

    Hard-pixel mining needs the training step: call
    ``set_step_source(optimizer.iterations)`` (or any scalar variable) before the
    first ``fit`` traces the train function. The source is runtime state, not
    configuration: it is not saved, so set it again after ``load_model``.

    Args:
        ignore_label: label value excluded from the loss.
        upsample_logits: resize logits to the labels (True) or labels to the logits.
        class_weights: one non-negative weight per class, or None.
        top_k_percent_pixels: fraction in (0, 1] of the hardest valid pixels kept.
        hard_example_mining_step: steps of the linear warm-up of that fraction from 1.
        name, reduction, dtype: as ``keras.losses.Loss``; reduction must stay
            ``"sum_over_batch_size"`` for the semantics above.

    Example:
        >>> loss = SoftmaxCrossEntropy(top_k_percent_pixels=0.25, hard_example_mining_step=1000)
        >>> model.compile(optimizer=optimizer, loss=loss)
        >>> loss.set_step_source(optimizer.iterations)

    Reference: Chen et al., Rethinking Atrous Convolution (DeepLab v3), section 4.1;
    DeepLab v2 (TPAMI), section 4; TF1 DeepLab ``train_utils.py``.
    """

    def __init__(
        self,
        ignore_label: int = IGNORE_LABEL,
        upsample_logits: bool = True,
        class_weights: Sequence[float] | None = None,
        top_k_percent_pixels: float = 1.0,
        hard_example_mining_step: int = 0,
        name: str = "softmax_cross_entropy",
        reduction: str = "sum_over_batch_size",
        dtype: Any = None,
    ):
        if reduction != "sum_over_batch_size":
            raise ValueError(
                f"reduction must be 'sum_over_batch_size' (see the docstring), got {reduction!r}"
            )
        if not 0.0 < float(top_k_percent_pixels) <= 1.0:
            raise ValueError(f"top_k_percent_pixels must be in (0, 1], got {top_k_percent_pixels}")
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if not class_weights or not all(np.isfinite(w) and w >= 0 for w in class_weights):
                raise ValueError(
                    f"class_weights must be non-negative finite numbers, got {class_weights}"
                )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ignore_label = int(ignore_label)
        self.upsample_logits = bool(upsample_logits)
        self.class_weights = class_weights
        self.top_k_percent_pixels = float(top_k_percent_pixels)
        self.hard_example_mining_step = check_int(
            "hard_example_mining_step", hard_example_mining_step, 0
        )
        self.step_source = None

    def set_step_source(self, step: Any) -> None:
        """Reads the hard-mining warm-up step from ``step`` (e.g. ``optimizer.iterations``)."""
        self.step_source = step

    def top_k_fraction(self) -> tf.Tensor:
        """The fraction r of valid pixels kept at the current step (see the class docstring)."""
        final = tf.constant(self.top_k_percent_pixels, tf.float32)
        if self.hard_example_mining_step == 0 or self.step_source is None:
            return final
        step = tf.cast(tf.convert_to_tensor(self.step_source), tf.float32)
        ratio = tf.clip_by_value(step / float(self.hard_example_mining_step), 0.0, 1.0)
        return ratio * final + (1.0 - ratio)

    def call(self, y_true, y_pred):
        labels = labels_to_int(y_true)
        if self.upsample_logits:
            logits = resize_logits_bilinear(y_pred, tf.shape(labels)[1:3])
        else:
            logits = tf.cast(y_pred, tf.float32)
            labels = resize_labels_nearest(labels, tf.shape(logits)[1:3])
        num_classes = logits.shape[-1]
        if self.class_weights is not None and num_classes is not None:
            if len(self.class_weights) != num_classes:
                raise ValueError(
                    f"class_weights has {len(self.class_weights)} entries, logits have "
                    f"{num_classes} classes"
                )

        batch = tf.shape(labels)[0]
        labels = tf.reshape(labels, [batch, -1])
        logits = tf.reshape(logits, [batch, -1, tf.shape(logits)[-1]])
        valid = tf.not_equal(labels, self.ignore_label)
        safe_labels = tf.where(valid, labels, 0)
        pixel_losses = tf.nn.sparse_softmax_cross_entropy_with_logits(safe_labels, logits)
        if self.class_weights is not None:
            pixel_losses *= tf.gather(tf.constant(self.class_weights, tf.float32), safe_labels)
        # Zero by selection, not multiplication, so an ignored pixel cannot bring in a NaN.
        pixel_losses = tf.where(valid, pixel_losses, 0.0)
        num_valid = tf.reduce_sum(tf.cast(valid, tf.int32))

        if self.top_k_percent_pixels < 1.0:
            k = tf.cast(tf.floor(self.top_k_fraction() * tf.cast(num_valid, tf.float32)), tf.int32)
            k = tf.minimum(tf.maximum(k, 1), num_valid)
            flat = tf.reshape(pixel_losses, [-1])
            # Cross-entropy is >= 0, so -1 ranks every ignored pixel last.
            _, top = tf.math.top_k(tf.where(tf.reshape(valid, [-1]), flat, -1.0), k=k)
            kept = tf.scatter_nd(top[:, None], tf.ones([k]), tf.shape(flat))
            pixel_losses *= tf.reshape(kept, tf.shape(pixel_losses))
            count = k
        else:
            count = num_valid

        count = tf.stop_gradient(sum_over_replicas(tf.cast(count, tf.float32)))
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        scale = tf.cast(batch, tf.float32) * float(replicas) / tf.maximum(count, 1.0)
        return tf.reduce_sum(pixel_losses, axis=1) * scale

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "dtype": self.dtype,
                "ignore_label": self.ignore_label,
                "upsample_logits": self.upsample_logits,
                "class_weights": self.class_weights,
                "top_k_percent_pixels": self.top_k_percent_pixels,
                "hard_example_mining_step": self.hard_example_mining_step,
            }
        )
        return config
