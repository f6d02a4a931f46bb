"""The dense CRF's parameters (``CRFParams``, with their JSON file) and the checks of its
inputs, shared by both backends."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from deeplab_tf.files import write_json_atomic

# The unary is -log(max(P, floor)): a probability of exactly 0 would give an infinite
# energy that no pairwise term could overcome (pydensecrf.utils.unary_from_softmax
# clips at the same value).
PROBABILITY_FLOOR = 1e-5
# How far per-pixel probability sums may be from 1 before the input is refused:
# catches logits passed where probabilities are expected.
SUM_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """The parameters of the dense CRF (DeepLab v2, equation 3, and section 4.1).

    Attributes:
        w1: weight of the bilateral (appearance) kernel.
        sa: its spatial standard deviation sigma_alpha, in pixels.
        sb: its colour standard deviation sigma_beta, in RGB levels (0..255).
        w2: weight of the Gaussian (smoothness) kernel; the papers fix it to 3.
        sg: its spatial standard deviation sigma_gamma, in pixels; fixed to 3.
        iterations: mean-field iterations (10 in the papers); 0 returns the input
            probabilities renormalised after flooring.

    w1, sa and sb are cross-validated per model (``search_params``); the defaults
    lie inside the v2 paper's search range (w1 in 3..6, sa in 30..100, sb in 3..6);
    (4, 67, 3) are values often used with DeepLab v2 models, a starting point only.
    Files: ``save(path)`` writes the fields as JSON; ``load(path)`` reads such a
    file, or a ``search_params`` result file (its ``"params"`` entry).
    """

    w1: float = 4.0
    sa: float = 67.0
    sb: float = 3.0
    w2: float = 3.0
    sg: float = 3.0
    iterations: int = 10

    def __post_init__(self):
        for name in ("w1", "w2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"CRF {name} must be a finite number >= 0, got {value!r}")
        for name in ("sa", "sb", "sg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"CRF {name} must be a finite number > 0, got {value!r}")
        iterations = self.iterations
        if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 0:
            raise ValueError(f"CRF iterations must be an integer >= 0, got {iterations!r}")
        # Normalise the types so equal parameters compare and serialise equal.
        for name in ("w1", "sa", "sb", "w2", "sg"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "iterations", int(iterations))

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CRFParams:
        """Parameters from a mapping; unknown keys are an error, missing ones take defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown CRF parameters {unknown}; allowed: {sorted(fields)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Writes the parameters as JSON (atomically)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CRFParams:
        """Reads ``save``'s JSON or a ``write_search_result`` file (its ``"params"``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read CRF parameters ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("params"), dict):
            data = data["params"]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: CRF parameters must be a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def check_inputs(image: Any, probabilities: Any) -> tuple[np.ndarray, np.ndarray]:
    """``image`` uint8 [H, W, 3] and ``probabilities`` [H, W, C] (C >= 2) as numpy.

    Raises a one-line ``ValueError`` for anything else: another dtype or channel
    count, sizes that differ, probabilities that are negative, not finite, or whose
    per-pixel sums are not 1 (logits passed by mistake).
    """
    image = np.asarray(image)
    probabilities = np.asarray(probabilities)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"CRF image must be uint8 RGB [H, W, 3], got {image.dtype} {list(image.shape)}"
        )
    if probabilities.ndim != 3 or probabilities.shape[-1] < 2:
        raise ValueError(
            f"CRF probabilities must be [H, W, C] with C >= 2, got {list(probabilities.shape)}"
        )
    if probabilities.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"CRF probabilities are {probabilities.shape[0]}x{probabilities.shape[1]} but the "
            f"image is {image.shape[0]}x{image.shape[1]}; resize them to the image first"
        )
    if not np.issubdtype(probabilities.dtype, np.floating):
        raise ValueError(f"CRF probabilities must be floating point, got {probabilities.dtype}")
    probabilities = probabilities.astype(np.float32, copy=False)
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0:
        raise ValueError("CRF probabilities must be finite and >= 0")
    sums = probabilities.sum(axis=-1)
    if np.abs(sums - 1).max() > SUM_TOLERANCE:
        raise ValueError(
            "CRF probabilities must sum to 1 over classes (apply a softmax to logits); "
            f"sums range {sums.min():.4g}..{sums.max():.4g}"
        )
    return image, probabilities
