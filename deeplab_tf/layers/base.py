"""What every layer of the package shares: registration for ``.keras`` files and the
checks of constructor arguments."""

from __future__ import annotations

from collections.abc import Sequence

import keras

register = keras.saving.register_keras_serializable(package="deeplab_tf")


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
