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
import tensorflow as tf
from keras import layers

from deeplab_tf.layers import ASPP, AtrousConv2D, AtrousSeparableConv2D, ConvBNReLU
from deeplab_tf.layers.normalization import FoldableBatchNormalization
from deeplab_tf.multiscale import MultiScaleInputs
from deeplab_tf.precision import DTYPE_POLICIES, onednn_runs

# Convolutions of a functional graph that a batch norm after them can be folded into.
_FOLDABLE_CONVOLUTIONS = (layers.Conv2D, layers.DepthwiseConv2D, AtrousConv2D)


class FoldPair(NamedTuple):
    """A convolution's kernel and the batch norm after it (in a model's copy)."""

    kernel: keras.Variable
    depthwise: bool  # kernel [h, w, in, multiplier]: output channel in * multiplier + m
    batch_norm: FoldableBatchNormalization
    bias: np.ndarray | None  # the convolution's own bias, which the fold removes


# The ASPP's atrous branches in the inference copy: one 1x1 convolution per kernel tap
# over the pixels it reads inside the map (``sum_of_taps``) in bfloat16, and in float32
# where TensorFlow's own kernels run it. At the ASPP's rates most of a dilated kernel's
# reads are padding, which dilated convolutions pay for: in bfloat16 on a Xeon with AMX
# the branches ran 2.4-13.5x faster as taps, the whole deeplabv3 1.8-1.9x at OS8 and
# 1.25x at OS16; on an AMD EPYC without AMX the whole network was within 4% either way.
# In float32 with oneDNN the two forms were within 5% of each other either way, so it
# keeps the model's; with TensorFlow's own kernels (an AMD EPYC without AVX-512) the
# branches ran 1.1-2.3x faster as taps (README, Benchmarks). The backbone's dilated
# convolutions, at small rates on larger maps, stay as they are.
ASPP_TAPS_FOR_INFERENCE = "taps"


def aspp_implementation_for_inference(precision: str) -> str | None:
    """The atrous implementation of the ASPP's branches in ``inference_copy``: taps in
    bfloat16 and where float32 runs on TensorFlow's own CPU kernels (no GPU, oneDNN off:
    ``precision.onednn_runs``), else None (the model's own)."""
    if precision == "bfloat16":
        return ASPP_TAPS_FOR_INFERENCE
    if tf.config.list_physical_devices("GPU") or onednn_runs("float32"):
        return None
    return ASPP_TAPS_FOR_INFERENCE


def inference_copy(model: keras.Model, precision: str = "float32") -> keras.Model:
    """What the Predictor and the SavedModel run: ``fold_batch_norm``'s copy of
    ``model`` in ``precision``, with the ASPP's 3x3 atrous branches in the
    implementation ``aspp_implementation_for_inference`` gives; the same outputs up to
    rounding."""
    return fold_batch_norm(model, precision, aspp_implementation_for_inference(precision))


def fold_batch_norm(
    model: keras.Model, precision: str = "float32", aspp_implementation: str | None = None
) -> keras.Model:
    """A copy of ``model`` with every batch norm that follows a convolution folded into
    it (see the module docstring), computing in ``precision`` (``PRECISIONS``; the
    variables stay float32); in float32, the same outputs up to rounding.

    Folded: the batch norms of a functional graph whose input is a convolution's output
    that nothing else reads, and those of ``ConvBNReLU`` and ``AtrousSeparableConv2D``
    (the ASPP, decoder and Xception are made of them). Others stay as they are. A
    ``MultiScaleInputs`` model (v2's MSC) gets a folded copy of its network. ``model``
    itself comes back only when there is nothing to change: no batch norm and every
    layer already in ``precision`` (a model trained in mixed precision is copied to
    float32). ``aspp_implementation``, when given, is the atrous implementation of the
    copy's ``ASPP`` branches that are not separable. The copy is for inference, not for
    training or saving: its folded batch norms normalise nothing, and the composite
    layers' inner batch norms do not record that they are folded.

    Raises:
        ValueError: ``model`` is itself a folded copy, or neither functional nor
            ``MultiScaleInputs``.
    """
    if count_batch_norms(model)["folded"]:
        raise ValueError(f"{model.name}: its batch norms are folded already")
    if not count_batch_norms(model) and _computes_in(model, precision):
        return model
    if isinstance(model, MultiScaleInputs):
        return _with_base(model, fold_batch_norm(model.base, precision, aspp_implementation))
    _require_functional(model)
    pairs_before = _functional_pairs(model)
    paired_convolutions = {id(conv) for conv, _ in pairs_before}

    def change(layer, config):
        if id(layer) in paired_convolutions and config.get("use_bias"):
            config["use_bias"] = False  # its bias moves into the batch norm's offset
        if aspp_implementation and isinstance(layer, ASPP) and not config["separable"]:
            config["implementation"] = aspp_implementation
        is_batch_norm = isinstance(layer, layers.BatchNormalization)
        made = (FoldableBatchNormalization if is_batch_norm else type(layer)).from_config(config)
        return _with_zero_initializers(made)

    copy, clones = _copy(model, precision, change)
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


def _with_zero_initializers(layer: keras.layers.Layer) -> keras.layers.Layer:
    """``layer`` (not built yet) and the layers it holds, their variables to be made
    zero: every weight of the copy is set from the model's, so drawing random initial
    values is wasted (deeplabv3's 58 million from truncated normals: over a quarter of
    the time the copy took; README, Benchmarks). Leaves the copy's config saying zeros,
    one more reason it is not for saving."""
    for part in (layer, *layer._flatten_layers(include_self=False, recursive=True)):
        for name, value in list(vars(part).items()):
            if isinstance(value, keras.initializers.Initializer):
                setattr(part, name, _ZEROS)
    return layer


_ZEROS = keras.initializers.Zeros()


def in_precision(model: keras.Model, precision: str) -> keras.Model:
    """``model`` with every layer computing in ``precision`` (``PRECISIONS``): ``model``
    itself when it does already, else a copy with the same weights and layers (batch
    norms unfolded), as ``build_model`` would have made it under that precision's
    policy. A model trained in mixed bfloat16 keeps that policy in its ``.keras`` file;
    this is its float32 model.

    Raises:
        ValueError: ``model`` is neither functional nor ``MultiScaleInputs``.
    """
    if _computes_in(model, precision):
        return model
    if isinstance(model, MultiScaleInputs):
        return _with_base(model, in_precision(model.base, precision))
    _require_functional(model)
    copy, _ = _copy(model, precision, lambda layer, config: layer.__class__.from_config(config))
    copy.set_weights(model.get_weights())
    return copy


def _computes_in(model: keras.Model, precision: str) -> bool:
    policy = DTYPE_POLICIES[precision]
    return all(
        layer.dtype_policy.name == policy
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, (layers.InputLayer, keras.Model))  # containers compute nothing
    )


def _require_functional(model: keras.Model) -> None:
    if not _is_functional(model):
        raise ValueError(
            f"{model.name}: a {type(model).__name__} model cannot be copied "
            "(only functional models and MultiScaleInputs are)"
        )


def _copy(model: keras.Model, precision: str, make) -> tuple[keras.Model, dict[int, layers.Layer]]:
    """``keras.models.clone_model`` with each layer made by ``make(layer, config)`` from
    its config in ``precision``'s policy; also the clones by id of their original."""
    policy = DTYPE_POLICIES[precision]
    clones: dict[int, keras.layers.Layer] = {}

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config and not isinstance(layer, layers.InputLayer):
            config["dtype"] = policy
        return make(layer, config)

    # The layers that composite layers make inside (ConvBNReLU's convolution and batch
    # norm, ...) take the global policy.
    caller_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True, cache=clones)
    finally:
        keras.mixed_precision.set_global_policy(caller_policy)
    return copy, clones


def _with_base(model: MultiScaleInputs, base: keras.Model) -> MultiScaleInputs:
    # The wrapper has no variables; its own casts keep its fusion in float32.
    return MultiScaleInputs(
        base, scales=model.scales, upsample_logits=model.upsample_logits, name=model.name
    )


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
