"""Fully connected CRF post-processing and its parameter search.

DeepLab v1 (section 4) and v2 (section 3.3) refine the network's per-pixel class
probabilities P with the fully connected CRF of Krähenbühl & Koltun (NIPS 2011):

    E(x) = sum_i -log P(x_i) + sum_{i<j} mu(x_i, x_j) [
             w1 exp(-|p_i - p_j|^2 / 2 sa^2 - |I_i - I_j|^2 / 2 sb^2)    (bilateral)
           + w2 exp(-|p_i - p_j|^2 / 2 sg^2) ]                             (Gaussian)

with Potts compatibility mu(a, b) = [a != b], minimised approximately by mean-field
iterations: Q <- softmax(-U + sum_k w_k K_k Q), each K_k a Gaussian filter in its
feature space (positions / sa and colours / sb; positions / sg), normalised
symmetrically as in the reference code (D^-1/2 K D^-1/2 with D = K 1).

``refine(image, probabilities, params, backend)`` runs it on one image with one of
two backends that compute the same thing:

* ``"pydensecrf"``: Krähenbühl's C++ code through the ``pydensecrf2`` package (the
  ``pydensecrf`` module). ``refine_many`` runs a list of images in worker processes.
* ``"tensorflow"``: the same mean-field updates in TensorFlow ops (``crf_tensorflow``):
  batched, GPU-capable and usable inside a ``tf.function`` or SavedModel, both
  filters on a permutohedral lattice.

``search_params`` is the papers' coarse-to-fine grid search over (w1, sa, sb) on
cached probabilities (v2 paper, section 4.1).

The modules, one job each:

* ``params``: ``CRFParams`` and its JSON file; ``check_inputs``.
* ``backends``: ``refine``, ``refine_many``, ``resolve_backend``.
* ``pydensecrf_backend``: the C++ CRF and the worker pools.
* ``lattice``: the permutohedral lattice in TensorFlow (``permutohedral_filter``).
* ``mean_field``: the TensorFlow backend (``crf_tensorflow``).
* ``search``: ``search_params``, its grid and result (``crf_tuning`` runs it on a
  checkpoint's data).
"""

from deeplab_tf.crf.backends import BACKENDS, refine, refine_many, resolve_backend
from deeplab_tf.crf.lattice import permutohedral_filter
from deeplab_tf.crf.mean_field import crf_tensorflow
from deeplab_tf.crf.params import PROBABILITY_FLOOR, CRFParams, check_inputs
from deeplab_tf.crf.pydensecrf_backend import pydensecrf_available
from deeplab_tf.crf.search import (
    SearchGrid,
    SearchResult,
    format_results_table,
    search_params,
    write_search_result,
)

__all__ = [
    "BACKENDS",
    "PROBABILITY_FLOOR",
    "CRFParams",
    "SearchGrid",
    "SearchResult",
    "check_inputs",
    "crf_tensorflow",
    "format_results_table",
    "permutohedral_filter",
    "pydensecrf_available",
    "refine",
    "refine_many",
    "resolve_backend",
    "search_params",
    "write_search_result",
]
