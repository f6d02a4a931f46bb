"""``refine`` and ``refine_many``: the dense CRF on images, by the backend asked for
(``resolve_backend``): pydensecrf's C++ code or the TensorFlow mean field."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from deeplab_tf.crf import pydensecrf_backend
from deeplab_tf.crf.mean_field import refine_tensorflow
from deeplab_tf.crf.params import CRFParams, check_inputs

logger = logging.getLogger("deeplab_tf.crf")

BACKENDS = ("auto", "pydensecrf", "tensorflow")


def resolve_backend(backend: str) -> str:
    """``"pydensecrf"`` or ``"tensorflow"`` for a requested backend of ``BACKENDS``.

    ``"auto"`` takes pydensecrf when it is installed. Without it, ``"auto"`` and
    ``"pydensecrf"`` run the TensorFlow backend and the log says so.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "tensorflow":
        return backend
    if pydensecrf_backend.pydensecrf_available():
        return "pydensecrf"
    logger.warning(
        "pydensecrf2 is not installed (pip install pydensecrf2); using the TensorFlow CRF backend"
    )
    return "tensorflow"


# === Public entry points ===


def refine(
    image: Any,
    probabilities: Any,
    params: CRFParams | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Dense-CRF refined probabilities of one image.

    Args:
        image: RGB uint8 [H, W, 3], the image the probabilities were computed on.
        probabilities: class probabilities [H, W, C] at the image's size (softmax
            of the network's logits after upsampling).
        params: ``CRFParams`` (defaults if None).
        backend: one of ``BACKENDS`` (see ``resolve_backend``).

    Returns:
        float32 [H, W, C], each pixel's Q(x_i) after ``params.iterations`` mean-field
        iterations (sums to 1 per pixel; argmax gives the refined labels).
    """
    params = params or CRFParams()
    image, probabilities = check_inputs(image, probabilities)
    if resolve_backend(backend) == "pydensecrf":
        return pydensecrf_backend.refine_pydensecrf(image, probabilities, params)
    return refine_tensorflow(image, probabilities, params)


def refine_many(
    images: Sequence[Any],
    probabilities: Sequence[Any],
    params: CRFParams | None = None,
    backend: str = "auto",
    workers: int | None = None,
) -> list[np.ndarray]:
    """``refine`` over lists of images (sizes may differ), in input order.

    Images run in ``workers`` at once (default: the CPU count): processes for the
    pydensecrf backend (single-threaded C++), threads for the TensorFlow backend,
    whose sparse products also use one core each.
    """
    params = params or CRFParams()
    if len(images) != len(probabilities):
        raise ValueError(f"{len(images)} images but {len(probabilities)} probability maps")
    pairs = [check_inputs(i, p) for i, p in zip(images, probabilities, strict=True)]
    backend = resolve_backend(backend)
    with pydensecrf_backend.worker_pool(backend, workers, pairs) as pool:
        if backend == "pydensecrf":
            return list(
                pool.map(
                    pydensecrf_backend.refine_cached_pair,
                    range(len(pairs)),
                    itertools.repeat(params),
                )
            )
        return list(pool.map(lambda pair: refine_tensorflow(*pair, params), pairs))
