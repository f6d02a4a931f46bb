"""Weights moved between models by layer name: ImageNet backbones and output-stride switches."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import keras

# Backbones of ours that no keras.applications model mirrors (no ImageNet weights).
NO_KERAS_APPLICATION = ("resnet10_cpu", "xception65")  # aligned Xception: not in keras

logger = logging.getLogger(__name__)


class WeightsUnavailableError(ValueError):
    """Pretrained weights could not be obtained (offline machine, missing file): the
    tools report it as bad input (exit code 2), with what to pass instead."""


@dataclass
class TransferReport:
    """What ``transfer_weights`` did.

    Attributes:
        filled: target layers whose weights were copied.
        missing: target layers with weights that the source has no layer for.
        unused: source layers with weights that the target has no layer for.
    """

    filled: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def _layers_with_weights(model: keras.Model) -> dict[str, keras.layers.Layer]:
    return {layer.name: layer for layer in model.layers if layer.weights}


def transfer_weights(source: keras.Model, target: keras.Model) -> TransferReport:
    """Copies every layer's weights from ``source`` to the layer of the same name in ``target``.

    Raises:
        ValueError: a layer exists in both with weights of different shapes.
    """
    source_layers = _layers_with_weights(source)
    target_layers = _layers_with_weights(target)
    report = TransferReport()
    biases = {}  # target convolution -> the source's bias it has no place for
    for name, layer in target_layers.items():
        if name not in source_layers:
            report.missing.append(name)
            continue
        values = source_layers[name].get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        if got == [*expected, (expected[0][-1],)] and getattr(layer, "use_bias", True) is False:
            biases[name] = values.pop()
        elif expected != got:
            raise ValueError(
                f"layer {name!r}: source weights have shapes {got}, target expects {expected}"
            )
        layer.set_weights(values)
        report.filled.append(name)
    for name, bias in biases.items():
        _bias_into_batch_norm(target_layers[name], bias)
    report.unused = [name for name in source_layers if name not in target_layers]
    if report.missing:
        logger.warning(
            "%s: %d layers not filled from %s: %s",
            target.name,
            len(report.missing),
            source.name,
            ", ".join(report.missing),
        )
    return report


def _bias_into_batch_norm(conv: keras.layers.Layer, bias) -> None:
    """Moves a bias that ``conv`` (without one) was given into the batch norm that reads
    its output: BN(conv + b) with moving mean m is BN(conv) with moving mean m - b, and
    in training the batch mean absorbs b alike. keras.applications' ResNets add such
    biases, which their batch norms cancel; ours leave them out (a training step 5 %
    faster: no bias gradients)."""
    readers = {id(node.operation): node.operation for node in conv._outbound_nodes}
    reader = next(iter(readers.values())) if len(readers) == 1 else None
    if not isinstance(reader, keras.layers.BatchNormalization):
        raise ValueError(
            f"layer {conv.name!r} has no bias for the source's and no batch norm after it"
        )
    reader.moving_mean.assign(reader.moving_mean.numpy() - bias)


def keras_application(arch: str, weights: str | None, alpha: float = 1.0) -> keras.Model:
    """The ``keras.applications`` model whose layers our backbone ``arch`` mirrors.

    Without the classifier top, except for VGG-16, whose fully connected fc1/fc2
    become the fc6/fc7 convolutions of DeepLab and of the Yu-Koltun front end.
    """
    constructors = {
        "resnet50": keras.applications.ResNet50,
        "resnet101": keras.applications.ResNet101,
    }
    if arch == "mobilenetv2":
        return keras.applications.MobileNetV2(
            input_shape=(224, 224, 3), alpha=alpha, include_top=False, weights=weights
        )
    if arch in ("vgg16", "vgg16_frontend"):
        return keras.applications.VGG16(include_top=True, weights=weights)
    if arch not in constructors:
        raise ValueError(f"arch must be one of {[*sorted(constructors), 'mobilenetv2', 'vgg16']}")
    return constructors[arch](include_top=False, weights=weights)


def check_weights(arch: str, weights: str | os.PathLike | None) -> None:
    """Refuses ``weights`` (as in ``weights_source``) that cannot fill backbone ``arch``,
    as far as can be told without downloading: ImageNet weights of a backbone that
    keras.applications lacks, a file that does not exist or is neither a weights file
    nor a ``.keras`` model. The builders call it before building, so such an argument
    fails at once, not after a ResNet-101 is made.

    Raises:
        WeightsUnavailableError: as described.
    """
    if weights is None:
        return
    path = os.fspath(weights)
    if arch in NO_KERAS_APPLICATION and not path.endswith(".keras"):
        raise WeightsUnavailableError(
            f"{arch} has no keras.applications ImageNet weights: train it from scratch "
            f"(backbone_weights None) or pass a .keras model with its layer names, got {path}"
        )
    if weights == "imagenet":
        return
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"backbone_weights file not found: {path}")
    if not path.endswith((".keras", ".h5")):  # .h5 and .weights.h5: what Keras loads
        raise WeightsUnavailableError(
            "backbone_weights must be a keras.applications weights file (.h5, .weights.h5) "
            f"or a .keras model, got {path}"
        )


def weights_source(
    arch: str, weights: str | os.PathLike | None, alpha: float = 1.0
) -> keras.Model | None:
    """The model holding the ImageNet weights ``weights`` names for backbone ``arch``.

    Args:
        arch: the backbone's architecture name (``resnet50``, ``resnet101``,
            ``mobilenetv2``, ``vgg16``, ``vgg16_frontend``).
        weights: ``None`` (nothing to load), ``"imagenet"`` (the keras.applications
            weights, downloaded into ``~/.keras/models`` on first use), or the path of
            a weights file: a keras.applications weights file (``.h5``/``.weights.h5``;
            the 'notop' one, but VGG-16's with its top) or a saved ``.keras`` model
            with the same layer names.

    Raises:
        WeightsUnavailableError: the ImageNet weights cannot be downloaded or the
            file does not exist.
    """
    if weights is None:
        return None
    check_weights(arch, weights)
    top = "with-top" if arch.startswith("vgg16") else "'notop'"
    path = os.fspath(weights)
    if weights == "imagenet":
        try:
            return keras_application(arch, "imagenet", alpha)
        except Exception as error:  # keras raises a bare Exception on download failure
            raise WeightsUnavailableError(
                f"could not get the ImageNet weights of {arch} from keras.applications "
                f"({error}); on a machine without internet, copy the keras.applications "
                f"{top} weights file here and pass its path as backbone_weights"
            ) from error
    if path.endswith(".keras"):
        return keras.models.load_model(path, compile=False)
    source = keras_application(arch, None, alpha)
    source.load_weights(path)
    return source


def load_backbone_weights(
    backbone: keras.Model, arch: str, weights: str | os.PathLike | None, alpha: float = 1.0
) -> TransferReport | None:
    """Fills ``backbone`` (a model from ``build_backbone``) from the ImageNet weights
    ``weights`` (see ``weights_source``) by layer name; None when ``weights`` is None.

    Raises:
        WeightsUnavailableError: the ImageNet weights cannot be downloaded or the
            file does not exist.
    """
    source = weights_source(arch, weights, alpha)
    return None if source is None else transfer_weights(source, backbone)
