"""Bookkeeping of a backbone's stage outputs (timm's ``feature_info``)."""

from __future__ import annotations

from dataclasses import dataclass

import keras


@dataclass(frozen=True)
class FeatureInfo:
    """One stage output: its layer name, channels and stride w.r.t. the input."""

    name: str
    channels: int
    reduction: int


def feature_extractor(backbone: keras.Model, names: list[str] | None = None) -> keras.Model:
    """A model sharing ``backbone``'s weights that returns a dict of stage outputs.

    Args:
        backbone: a model from ``build_backbone``.
        names: layer names to return (default: every ``backbone.feature_info`` entry).
    """
    if names is None:
        names = [info.name for info in backbone.feature_info]
    outputs = {name: backbone.get_layer(name).output for name in names}
    return keras.Model(backbone.input, outputs, name=f"{backbone.name}_features")


# The decoder's features (v3+ section 3.1): "low-level features ... from the network
# backbone" at output stride 4.
DECODER_STRIDE = 4


def low_level_feature_name(backbone: keras.Model) -> str:
    """The layer of ``backbone``'s deepest stride-4 output (``feature_info``): ResNet's
    conv2_x (block1) output, MobileNetV2's block_2_add, Xception's entry-flow point."""
    names = [info.name for info in backbone.feature_info if info.reduction == DECODER_STRIDE]
    if not names:
        raise ValueError(f"backbone {backbone.name} has no stride-{DECODER_STRIDE} features")
    return names[-1]
