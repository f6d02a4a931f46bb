"""Where the tests' numerical tolerances come from.

Two float32 evaluations of the same mathematics differ when their kernels sum in
another order (oneDNN's blocked convolutions with or without AVX-512/AMX, TensorFlow's
own Eigen kernels under ``TF_ENABLE_ONEDNN_OPTS=0``, TFLite's, XLA's, a batched against
an unbatched call). Each rounding moves a result by at most half an ulp; a sum of
``n`` terms in another order moves by at most ``n`` eps times the sum of the terms'
magnitudes (Higham, *Accuracy and Stability of Numerical Algorithms*, section 3.1),
and in practice, the roundings being of random sign, by about ``sqrt(n)`` eps
(section 3.6 there). A network passes each layer's error on to the next, so its
outputs differ by its layers' errors, independent of each other and so adding in
quadrature, relative to its outputs' size.

The functions below turn those statements into tolerances; a test says which one
it uses and with what ``n`` and depth.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: the spacing of float32 numbers at 1

# Random-sign rounding errors stay within a few standard deviations of sqrt(n) eps;
# ten of them leave room for the tail without hiding a real difference (a wrong tap or
# a wrong statistic changes results by orders of magnitude more).
TAIL = 10.0


def sum_rtol(terms: int) -> float:
    """Relative difference of one float32 sum of ``terms`` products evaluated in two
    orders, with room for the tail: ``TAIL * sqrt(terms) * eps``."""
    return TAIL * math.sqrt(terms) * EPS32


def network_rtol(layers: int, terms: int) -> float:
    """Relative difference (to the outputs' largest magnitude) of a network of
    ``layers`` float32 layers in series whose sums have at most ``terms`` terms: each
    layer adds its own reordering error, independent of the others' (quadrature),
    ``TAIL * sqrt(layers * terms) * eps``."""
    return TAIL * math.sqrt(layers * terms) * EPS32


def probability_atol(logit_atol: float) -> float:
    """A softmax moves each probability by at most half the largest change of its
    logits: |d p_i| = p_i |(1 - p_i) d z_i - sum_{j != i} p_j d z_j|
    <= 2 p_i (1 - p_i) max |d z| <= max |d z| / 2."""
    return logit_atol / 2


def model_probability_atol(model, images: np.ndarray, rtol: float) -> float:
    """The bound on two float32 evaluations of ``model``'s probabilities for the batch
    ``images`` (another graph, batch, kernels or resizing): ``rtol`` (``network_rtol``
    of the model) of its largest logit, halved by the softmax."""
    logits = np.asarray(model(np.asarray(images, np.float32), training=False))
    return probability_atol(rtol * np.abs(logits).max())


def decided(probabilities: np.ndarray, atol: float) -> np.ndarray:
    """Pixels whose label no change of at most ``atol`` in each probability can flip:
    the top-2 margin exceeds twice ``atol``. Where two classes are closer than that,
    either label is a correct result of float arithmetic."""
    top2 = np.sort(np.asarray(probabilities), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0] > 2 * atol


def sum_bound(terms: int, magnitudes: np.ndarray) -> np.ndarray:
    """Higham's bound for a float32 sum of ``terms`` products in any order, FMA or
    not: ``|computed - exact| <= gamma_n sum |products|`` with ``gamma_n = n u / (1 -
    n u)``, ``u = eps / 2``; ``terms * eps`` covers ``gamma_n`` (while ``n u < 1/2``)
    and the result's own rounding. ``magnitudes`` is ``sum |products|`` for each
    output, computed in float64 with the same formula on ``|x|`` and ``|w|``."""
    return terms * EPS32 * np.asarray(magnitudes, np.float64)


def assert_within(actual, expected, bound) -> None:
    """``|actual - expected| <= bound`` elementwise (``bound`` broadcasts)."""
    excess = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)) - bound
    assert excess.max() <= 0, f"{(excess > 0).sum()} values beyond the bound, up to {excess.max()}"


def sum_to_one_atol(classes: int) -> float:
    """How far float32 probabilities may sum from 1: a softmax rounds each of its
    ``classes`` outputs and their sum adds ``classes`` roundings; bilinear resizing or
    averaging (weights summing to 1) adds a few more terms: ``TAIL * (classes + 4) eps``."""
    return TAIL * (classes + 4) * EPS32


def assert_refinements_agree(actual, expected, atol: float, label_atol: float | None = None):
    """Two dense-CRF refinements of inputs within ``atol`` of each other (or of the same
    inputs computed in float32 sums of other orders, each within ``atol``). The
    mean-field iterations can amplify a difference at pixels near a tie (no
    elementwise bound holds there), so this compares what they cannot move: the mean
    difference over the image within ``atol``, and the labels wherever the refined
    top-2 margin exceeds ``label_atol`` (default ``atol``), on most of the image."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).mean() <= atol, np.abs(actual - expected).mean()
    sure = decided(expected, atol if label_atol is None else label_atol)
    assert sure.mean() > 0.5, sure.mean()
    np.testing.assert_array_equal(actual.argmax(-1)[sure], expected.argmax(-1)[sure])
