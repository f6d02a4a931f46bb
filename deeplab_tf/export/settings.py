"""The settings of an export and their checks: formats, quantizations, the version
directory, the CRF of the signatures; file names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from deeplab_tf.inference import InferenceError

FORMATS = ("savedmodel", "tflite", "keras")
QUANTIZATIONS = ("none", "float16", "int8")
KERAS_FILE = "model.keras"
MANIFEST = "export.json"
# The SavedModel's signatures and their inputs (outputs: see the module docstring).
# export.py --max-image-size; export.json records it.
DEFAULT_MAX_IMAGE_SIZE = 4096


class ExportError(InferenceError):
    """A bad export setting or destination, reported as one line by the CLI."""


def tflite_file(quantize: str) -> str:
    """The file name of a TFLite conversion: model_float32/float16/int8.tflite."""
    return f"model_{'float32' if quantize == 'none' else quantize}.tflite"


# === Checks of the settings ===


def _parse_choices(values: Sequence[str], choices: Sequence[str], flag: str) -> tuple[str, ...]:
    """Values given separately or comma-separated, checked, in ``choices`` order."""
    values = [v for value in values for v in value.split(",") if v]
    unknown = [v for v in values if v not in choices]
    if unknown or not values:
        got = ", ".join(unknown) if unknown else "nothing"
        raise ExportError(f"{flag} must be one or more of {', '.join(choices)}; got {got}")
    return tuple(c for c in choices if c in values)


def parse_formats(values: Sequence[str]) -> tuple[str, ...]:
    """``--format`` values (``all``: every format) as a tuple in ``FORMATS`` order."""
    formats = _parse_choices(values, (*FORMATS, "all"), "--format")
    return FORMATS if "all" in formats else formats


def parse_quantize(values: Sequence[str]) -> tuple[str, ...]:
    """``--quantize`` values as a tuple in ``QUANTIZATIONS`` order."""
    return _parse_choices(values, QUANTIZATIONS, "--quantize")


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """``--input-size``: ``H`` or ``H,W`` pixels."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ExportError(f"--input-size must be H or H,W in pixels, got {text!r}") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ExportError(f"--input-size must be H or H,W in pixels, got {text!r}")
    return size  # type: ignore[return-value]


def resolve_version_dir(
    export_dir: str | os.PathLike, name: str, version: int | None, overwrite: bool
) -> Path:
    """``export_dir/name/version``: the next version after the highest existing one when
    ``version`` is None (1 for a new model); an existing one only with ``overwrite``."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ExportError(f"--name must be a plain directory name, got {name!r}")
    base = Path(export_dir) / name
    if base.exists() and not base.is_dir():
        raise ExportError(f"--export-dir {base} is not a directory")
    if version is None:
        existing = (
            [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
        )
        version = max(existing, default=0) + 1
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    path = base / str(version)
    if path.exists() and not overwrite:
        raise ExportError(f"--version {version}: {path} exists; pass --overwrite to replace it")
    return path


def load_crf(params_file: str | os.PathLike | None = None):
    """The dense CRF of ``deeplab_tf.crf`` as ``f(images, probabilities) -> refined`` on
    batches in TensorFlow ops, with the parameters of ``params_file`` (or the defaults)."""
    from deeplab_tf import crf

    params = crf.CRFParams.load(params_file) if params_file else crf.CRFParams()
    return lambda images, probabilities: crf.crf_tensorflow(images, probabilities, params)
