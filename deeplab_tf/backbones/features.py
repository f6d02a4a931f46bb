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
