"""Batch norm folded into the convolutions before it, for inference.

At inference a batch norm is a fixed affine map per channel, y = s x + (beta - s mean)
with s = gamma / sqrt(variance + epsilon). After a convolution, s moves into the
kernel (each output channel's filter times its s) and what remains is one bias per
channel: the graph becomes convolution, BiasAdd, ReLU, which oneDNN runs as one fused
kernel, where Keras's batch norm costs two passes over every activation (and, under
mixed precision, casts to float32 and back). Keras does not fold; this module does,
on a copy of the model, so the model that training saves is never changed.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import keras
import numpy as np
from keras import layers

from deeplab_tf.layers import AtrousConv2D, AtrousSeparableConv2D, ConvBNReLU
from deeplab_tf.layers.normalization import FoldableBatchNormalization
from deeplab_tf.precision import DTYPE_POLICIES

# Convolutions of a functional graph that a batch norm after them can be folded into.
_FOLDABLE_CONVOLUTIONS = (layers.Conv2D, layers.DepthwiseConv2D, AtrousConv2D)


class FoldPair(NamedTuple):
    """A convolution's kernel and the batch norm after it (in a model's copy)."""

    kernel: keras.Variable
    depthwise: bool  # kernel [h, w, in, multiplier]: output channel in * multiplier + m
    batch_norm: FoldableBatchNormalization
    bias: np.ndarray | None  # the convolution's own bias, which the fold removes


def fold_batch_norm(model: keras.Model, precision: str = "float32") -> keras.Model:
    """A copy of ``model`` with every batch norm that follows a convolution folded into
    it (see the module docstring), computing in ``precision`` (``PRECISIONS``; the
    variables stay float32); in float32, the same outputs up to rounding.

    Folded: the batch norms of a functional graph whose input is a convolution's output
    that nothing else reads, and those of ``ConvBNReLU`` and ``AtrousSeparableConv2D``
    (the ASPP, decoder and Xception are made of them). Others stay as they are. A model
    that is not functional (the v2 multi-scale wrapper) cannot be copied: it comes back
    unchanged in float32, and ``precision="bfloat16"`` is a ``ValueError``. The copy is
    for inference, not for training or saving: its folded batch norms normalise nothing,
    and the composite layers' inner batch norms do not record that they are folded.

    Raises:
        ValueError: ``model`` is itself a folded copy, or not functional in bfloat16.
    """
    if count_batch_norms(model)["folded"]:
        raise ValueError(f"{model.name}: its batch norms are folded already")
    policy = DTYPE_POLICIES[precision]
    if not _is_functional(model):
        if precision != "float32":
            raise ValueError(
                f"{model.name}: a {type(model).__name__} model runs in float32 only "
                "(only functional models are copied to another precision)"
            )
        return model
    if not count_batch_norms(model) and precision == "float32":
        return model
    pairs_before = _functional_pairs(model)
    paired_convolutions = {id(conv) for conv, _ in pairs_before}
    clones: dict[int, keras.layers.Layer] = {}

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config and not isinstance(layer, layers.InputLayer):
            config["dtype"] = policy
        if isinstance(layer, layers.BatchNormalization):
            return FoldableBatchNormalization.from_config(config)
        if id(layer) in paired_convolutions and config.get("use_bias"):
            config["use_bias"] = False  # its bias moves into the batch norm's offset
        return layer.__class__.from_config(config)

    # The layers that composite layers make inside (ConvBNReLU's convolution and batch
    # norm, ...) take the global policy.
    caller_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True, cache=clones)
    finally:
        keras.mixed_precision.set_global_policy(caller_policy)
    originals = {id(layer): layer for layer in model._flatten_layers(include_self=False)}
    biases = {}
    for original_id, layer in clones.items():
        original = originals.get(original_id)
        if original is None or isinstance(layer, keras.Model):
            continue
        weights = original.get_weights()
        if id(original) in paired_convolutions and original.use_bias:
            biases[id(layer)] = weights.pop()  # [kernel, bias] -> kernel
        layer.set_weights(weights)

    pairs = []
    for conv, bn in pairs_before:
        copied = clones[id(conv)]
        pairs.append(FoldPair(copied.kernel, _is_depthwise(conv), clones[id(bn)],
                              biases.get(id(copied))))  # fmt: skip
    for layer in copy._flatten_layers(include_self=False, recursive=True):
        pairs.extend(_composite_pairs(layer))
    for pair in pairs:
        _fold(pair)
    return copy


def count_batch_norms(model: keras.Model) -> Counter:
    """How many batch norms of ``model`` are folded and how many still normalise."""
    return Counter(
        "folded" if getattr(layer, "folded", False) else "normalising"
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, layers.BatchNormalization)
    )


def _fold(pair: FoldPair) -> None:
    bn = pair.batch_norm
    gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(variance + bn.epsilon)
    kernel = np.asarray(pair.kernel.numpy(), np.float64)
    if pair.depthwise:
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:
        kernel = kernel * scale
    bias = 0.0 if pair.bias is None else np.asarray(pair.bias, np.float64)
    offset = beta + (bias - mean) * scale
    pair.kernel.assign(kernel.astype(pair.kernel.dtype))
    bn.beta.assign(offset.astype(bn.beta.dtype))
    bn.folded = True


def _is_functional(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.src.models.functional.Functional)


def _is_depthwise(conv: layers.Layer) -> bool:
    return isinstance(conv, layers.DepthwiseConv2D)


def _functional_pairs(model: keras.Model) -> list[tuple[layers.Layer, layers.Layer]]:
    """(convolution, batch norm) of ``model``'s functional graphs, nested ones too,
    where the batch norm is the only reader of the convolution's output."""
    pairs = []
    nested = model._flatten_layers(include_self=False)
    for graph in [model, *(layer for layer in nested if _is_functional(layer))]:
        readers = Counter(id(t) for t in graph.outputs)
        for layer in graph.layers:
            for node in layer._inbound_nodes:
                readers.update(id(t) for t in node.input_tensors)
        for layer in graph.layers:
            if not isinstance(layer, layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
                continue
            (x,) = layer._inbound_nodes[0].input_tensors
            conv = x._keras_history.operation
            if (
                isinstance(conv, _FOLDABLE_CONVOLUTIONS)
                and len(conv._inbound_nodes) == 1
                and readers[id(x)] == 1
                and getattr(conv, "activation", None) in (None, keras.activations.linear)
                and layer.axis in (-1, 3)
                and layer.center
                and layer.scale
            ):
                pairs.append((conv, layer))
    return pairs


def _composite_pairs(layer: layers.Layer) -> list[FoldPair]:
    if isinstance(layer, ConvBNReLU):
        return [FoldPair(layer.conv.kernel, False, layer.bn, None)]
    if isinstance(layer, AtrousSeparableConv2D):
        return [
            FoldPair(layer.depthwise_kernel, True, layer.depthwise_bn, None),
            FoldPair(layer.pointwise.kernel, False, layer.pointwise_bn, None),
        ]
    return []
