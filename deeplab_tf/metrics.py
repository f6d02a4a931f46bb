"""Streaming mean IoU from a confusion matrix, and every score derived from that matrix.

``confusion_matrix`` counts one in numpy (outside graphs).

``confusion_matrix_scores`` is the one place the scores are defined; the Keras
metric ``MeanIoU`` and evaluation code both use it.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from deeplab_tf.losses import (
    IGNORE_LABEL,
    check_int,
    labels_to_int,
    resize_labels_nearest,
    resize_logits_bilinear,
)


def confusion_matrix_scores(confusion: Any) -> dict[str, tf.Tensor]:
    """Scores of a confusion matrix M[true, predicted] (C x C counts), as float64 tensors.

    With TP_c = M[c, c], G_c = sum_j M[c, j] (label pixels of c), P_c = sum_i
    M[i, c] (predicted pixels of c) and T = sum M:

    * ``per_class_iou``: IoU_c = TP_c / (G_c + P_c - TP_c); NaN for a class absent
      from both labels and predictions;
    * ``mean_iou``: the mean of IoU_c over classes present in the labels or the
      predictions (a class only predicted counts, with IoU 0);
    * ``pixel_accuracy``: sum_c TP_c / T;
    * ``mean_class_accuracy``: the mean of TP_c / G_c over classes with G_c > 0;
    * ``frequency_weighted_iou``: sum_c (G_c / T) IoU_c over classes with G_c > 0.

    An empty matrix gives 0 for the four scalars. Works in graphs (``MeanIoU.result``)
    and eagerly on numpy arrays; call ``.numpy()`` on the values for plain arrays.

    Reference: Long, Shelhamer & Darrell, Fully Convolutional Networks, CVPR 2015,
    section 5 (the four metrics); DeepLab v2 (TPAMI), section 4 (mean IoU, VOC protocol).
    """
    m = tf.cast(tf.convert_to_tensor(confusion), tf.float64)
    tp = tf.linalg.diag_part(m)
    label_pixels = tf.reduce_sum(m, axis=1)
    union = label_pixels + tf.reduce_sum(m, axis=0) - tp
    total = tf.reduce_sum(m)
    in_union = union > 0
    in_labels = label_pixels > 0
    iou = tf.math.divide_no_nan(tp, union)
    class_accuracy = tf.math.divide_no_nan(tp, label_pixels)

    def mean_over(values, mask):
        count = tf.reduce_sum(tf.cast(mask, tf.float64))
        return tf.math.divide_no_nan(tf.reduce_sum(tf.where(mask, values, 0.0)), count)

    return {
        "mean_iou": mean_over(iou, in_union),
        "per_class_iou": tf.where(in_union, iou, tf.constant(np.nan, tf.float64)),
        "pixel_accuracy": tf.math.divide_no_nan(tf.reduce_sum(tp), total),
        "mean_class_accuracy": mean_over(class_accuracy, in_labels),
        "frequency_weighted_iou": tf.math.divide_no_nan(tf.reduce_sum(label_pixels * iou), total),
    }


def confusion_matrix(
    labels: Any, predictions: Any, num_classes: int, ignore_label: int = IGNORE_LABEL
) -> np.ndarray:
    """The int64 confusion matrix M[true, predicted] of integer label and prediction
    arrays of one shape, in numpy (the counts ``MeanIoU`` accumulates in TensorFlow);
    ``ignore_label`` pixels are not counted. For work outside a graph: the CRF search
    sums it over (parameter set, image) pairs in worker processes."""
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    valid = labels != ignore_label
    cells = labels[valid] * num_classes + predictions[valid]
    return np.bincount(cells, minlength=num_classes**2).reshape(num_classes, num_classes)


@keras.saving.register_keras_serializable(package="deeplab_tf")
class MeanIoU(keras.metrics.Metric):
    """Mean IoU over classes from a confusion matrix accumulated over all updates.

    ``update_state(y_true, y_pred, sample_weight=None)``:

    * ``y_true``: class ids [N, H, W] or [N, H, W, 1], any numeric dtype; pixels
      equal to ``ignore_label`` are not counted.
    * ``y_pred``: scores [N, h, w, num_classes] (logits or probabilities; argmax
      taken, after a bilinear resize with aligned corners to H x W when the size
      differs) or class ids [N, h, w] / [N, h, w, 1] (nearest-neighbour resized).
    * ``sample_weight``: optional weights broadcastable to [N, H, W] (per image or
      per pixel) that scale the counts.

    The state is one float64 C x C matrix M[true, predicted] (float64 counts stay
    exact far beyond a dataset's 10^9 pixels, where float32 stops at 2^24) with
    SUM aggregation, so under a distribution strategy ``result()`` read outside
    the replicas covers all of them. ``result()`` is the mean IoU over classes
    present in the labels or the predictions (absent from both: excluded);
    ``scores()`` gives per-class IoU, pixel accuracy, mean class accuracy and
    frequency-weighted IoU from the same matrix (``confusion_matrix_scores``).

    Labels outside [0, num_classes) other than ``ignore_label`` raise an error.

    Args:
        num_classes: C.
        ignore_label: label value not counted (255).
        name, dtype: as ``keras.metrics.Metric`` (dtype of ``result()``).

    Example:
        >>> model.compile(optimizer, loss, metrics=[MeanIoU(num_classes=21)])
        >>> metric.scores()["per_class_iou"]

    Reference: DeepLab v2 (TPAMI), section 4 ("mean pixel intersection-over-union
    averaged across the 21 classes"); Long et al., FCN, CVPR 2015, section 5.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = IGNORE_LABEL,
        name: str = "mean_iou",
        dtype: Any = None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.ignore_label = int(ignore_label)
        self.confusion_matrix = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="float64",
            aggregation="sum",
            name="confusion_matrix",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = labels_to_int(y_true)
        size = tf.shape(labels)[1:3]
        y_pred = tf.convert_to_tensor(y_pred)
        if y_pred.shape.rank == 4 and y_pred.shape[-1] != 1:
            if y_pred.shape[-1] != self.num_classes:
                raise ValueError(
                    f"y_pred has {y_pred.shape[-1]} channels, expected num_classes="
                    f"{self.num_classes} scores or 1 class id"
                )
            scores = resize_logits_bilinear(y_pred, size)
            predictions = tf.argmax(scores, axis=-1, output_type=tf.int32)
        else:
            predictions = resize_labels_nearest(labels_to_int(y_pred), size)

        c = self.num_classes
        valid = tf.not_equal(labels, self.ignore_label)
        checks = [
            tf.debugging.assert_less(
                tf.where(valid, labels, 0), c, message="label >= num_classes (not ignore_label)"
            ),
            tf.debugging.assert_non_negative(labels, message="negative label"),
            tf.debugging.assert_less(predictions, c, message="predicted class >= num_classes"),
            tf.debugging.assert_non_negative(predictions, message="negative predicted class"),
        ]
        with tf.control_dependencies(checks):
            weights = tf.cast(valid, tf.float64)
        if sample_weight is not None:
            sample_weight = tf.cast(sample_weight, tf.float64)
            if sample_weight.shape.rank == 1:
                sample_weight = sample_weight[:, None, None]
            elif sample_weight.shape.rank == 4:
                sample_weight = tf.squeeze(sample_weight, axis=-1)
            weights *= sample_weight
        cells = tf.where(valid, labels * c + predictions, 0)
        counts = tf.math.unsorted_segment_sum(
            tf.reshape(weights, [-1]), tf.reshape(cells, [-1]), c * c
        )
        self.confusion_matrix.assign_add(tf.reshape(counts, (c, c)))

    def result(self):
        return tf.cast(confusion_matrix_scores(self.confusion_matrix)["mean_iou"], self.dtype)

    def scores(self) -> dict[str, np.ndarray | float]:
        """All ``confusion_matrix_scores`` of the current matrix as numpy (eager only)."""
        return {
            k: np.asarray(v) if v.shape.rank else float(v)
            for k, v in confusion_matrix_scores(self.confusion_matrix).items()
        }

    def per_class_iou(self) -> np.ndarray:
        """IoU per class (NaN for classes absent from labels and predictions), eager only."""
        return self.scores()["per_class_iou"]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "ignore_label": self.ignore_label})
        return config
