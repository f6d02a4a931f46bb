"""Multi-scale inputs with max fusion: DeepLab v2's MSC (v2 paper section 3.2).

``MultiScaleInputs`` runs one network, with shared weights, on the image at each
scale (1, 0.75, 0.5), resizes the logits to the size of the scale-1 logits and
fuses them by a per-pixel maximum, in training and at test time. Training
minimises the sum of the losses of every scale and of the fused output, each
against the labels subsampled to its own size (TF1 DeepLab
``add_softmax_cross_entropy_loss_for_each_scale``); evaluation, prediction and
export see the fused logits only.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

from deeplab_tf.layers import resize_bilinear_aligned

FUSED = "fused"


def scaled_size(size, scale: float):
    """int((size - 1) scale + 1): the scaled image keeps its corner pixels on the grid
    (TF1 DeepLab ``scale_dimension``; 321 -> 241 at 0.75, 161 at 0.5)."""
    return tf.cast(tf.cast(size - 1, tf.float32) * scale, tf.int32) + 1


def scale_key(scale: float) -> str:
    """The key of a scale's logits in ``MultiScaleInputs.scale_logits``: ``scale_0.75``."""
    return f"scale_{scale:g}"


@keras.saving.register_keras_serializable(package="deeplab_tf")
class MultiScaleInputs(keras.Model):
    """A segmentation network applied at several input scales, logits max-fused.

    ``model(images)`` returns the fused logits: at the size of the scale-1 logits,
    or at the input size with ``upsample_logits``. ``model(images, training=True)``
    (as ``fit`` calls it) returns ``scale_logits``: a dict with each scale's logits
    (``scale_1``, ``scale_0.75``, ...) and the ``fused`` ones, and the model's
    ``compute_loss`` sums the compiled loss over all of them (with
    ``SoftmaxCrossEntropy(upsample_logits=False)`` each subsamples the labels to
    its own size, as v1/v2 train). Metrics see the fused logits.

    Args:
        base: the single-scale network, RGB pixels -> logits at its output stride
            (a ``build_model(..., upsample_logits=False)`` model).
        scales: input scales; the first is 1 (the size the others are resized to).
        upsample_logits: bilinearly resize every output to the input size.

    Reference: Chen et al., DeepLab (TPAMI 2017), section 3.2 and Table 4 (MSC).
    """

    def __init__(
        self,
        base: keras.Model,
        scales: Sequence[float] = (1.0, 0.75, 0.5),
        upsample_logits: bool = True,
        **kwargs,
    ):
        scales = tuple(float(s) for s in scales)
        if not scales or scales[0] != 1.0 or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive and start with 1.0, got {scales!r}")
        super().__init__(**kwargs)
        self.base = base
        self.scales = scales
        self.upsample_logits = upsample_logits

    def scale_logits(self, images, training=None) -> dict[str, tf.Tensor]:
        """The logits of every scale and their fusion, as float32 (see the class docstring)."""
        images = ops.cast(images, "float32")
        shape = ops.shape(images)
        outputs = {}
        for scale in self.scales:
            scaled = images
            if scale != 1.0:
                size = (scaled_size(shape[1], scale), scaled_size(shape[2], scale))
                scaled = resize_bilinear_aligned(images, size)
            outputs[scale_key(scale)] = ops.cast(self.base(scaled, training=training), "float32")
        reference = outputs[scale_key(1.0)]
        size = ops.shape(reference)[1:3]
        resized = [reference] + [
            resize_bilinear_aligned(outputs[scale_key(s)], size) for s in self.scales[1:]
        ]
        outputs[FUSED] = ops.max(ops.stack(resized), axis=0)
        if self.upsample_logits:
            outputs = {k: resize_bilinear_aligned(v, shape[1:3]) for k, v in outputs.items()}
        return outputs

    def call(self, inputs, training=None):
        outputs = self.scale_logits(inputs, training=training)
        return outputs if training else outputs[FUSED]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not isinstance(y_pred, dict):
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        # The fused output's loss, with any regularisation losses, plus each scale's loss.
        total = super().compute_loss(x, y, y_pred[FUSED], sample_weight, training)
        for key, logits in y_pred.items():
            if key != FUSED:
                total = total + self._compile_loss(y, logits, sample_weight)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, dict):
            y_pred = y_pred[FUSED]
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "base": keras.saving.serialize_keras_object(self.base),
            "scales": list(self.scales),
            "upsample_logits": self.upsample_logits,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base"] = keras.saving.deserialize_keras_object(config["base"])
        return cls(**config)


def single_scale_model(model: keras.Model) -> keras.Model:
    """The network inside a ``MultiScaleInputs`` model (the model itself otherwise):
    where its layers are found by name (weight transfer, freezing)."""
    return model.base if isinstance(model, MultiScaleInputs) else model
