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
  batched, GPU-capable and usable inside a ``tf.function`` or SavedModel. Both
  filters are a permutohedral lattice (Adams, Baek & Davis, Eurographics 2010)
  built exactly as ``permutohedral.cpp`` of the reference code builds it: features
  are lifted onto the lattice, values splatted onto the d + 1 vertices of each
  point's simplex with barycentric weights, blurred by [1/2 1 1/2] along the d + 1
  lattice directions and sliced back. Lattice vertices are found with ``tf.unique``
  on integer codes instead of a hash table, and splat, blur and slice are sparse
  matrix products whose structure is computed once per image.

``search_params`` is the papers' coarse-to-fine grid search over (w1, sa, sb) on
cached probabilities (v2 paper, section 4.1).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import logging
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from deeplab_tf.data.specs import IGNORE_LABEL
from deeplab_tf.files import write_json_atomic
from deeplab_tf.metrics import confusion_matrix_scores

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "pydensecrf", "tensorflow")
# The unary is -log(max(P, floor)): a probability of exactly 0 would give an infinite
# energy that no pairwise term could overcome (pydensecrf.utils.unary_from_softmax
# clips at the same value).
PROBABILITY_FLOOR = 1e-5
# How far per-pixel probability sums may be from 1 before the input is refused:
# catches logits passed where probabilities are expected.
_SUM_TOLERANCE = 1e-3


# === Parameters ===


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


# === Input checks and backend choice ===


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
    if np.abs(sums - 1).max() > _SUM_TOLERANCE:
        raise ValueError(
            "CRF probabilities must sum to 1 over classes (apply a softmax to logits); "
            f"sums range {sums.min():.4g}..{sums.max():.4g}"
        )
    return image, probabilities


def pydensecrf_available() -> bool:
    """Whether the ``pydensecrf`` module (package ``pydensecrf2``) can be imported."""
    return importlib.util.find_spec("pydensecrf") is not None


def resolve_backend(backend: str) -> str:
    """``"pydensecrf"`` or ``"tensorflow"`` for a requested backend of ``BACKENDS``.

    ``"auto"`` takes pydensecrf when it is installed. Without it, ``"auto"`` and
    ``"pydensecrf"`` run the TensorFlow backend and the log says so.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "tensorflow":
        return backend
    if pydensecrf_available():
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
        return _refine_pydensecrf(image, probabilities, params)
    return _refine_tensorflow(image, probabilities, params)


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
    with _pool(backend, workers, pairs) as pool:
        if backend == "pydensecrf":
            return list(pool.map(_refine_cached_pair, range(len(pairs)), itertools.repeat(params)))
        return list(pool.map(lambda pair: _refine_tensorflow(*pair, params), pairs))


# === pydensecrf backend ===


def _refine_pydensecrf(image: np.ndarray, probabilities: np.ndarray, params: CRFParams):
    import pydensecrf.densecrf as dcrf  # optional dependency, imported when used

    h, w, c = probabilities.shape
    unary = -np.log(np.clip(probabilities.reshape(-1, c).T, PROBABILITY_FLOOR, 1.0))
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    # Same kernel order as the TensorFlow backend, so float sums agree.
    crf.addPairwiseGaussian(sxy=params.sg, compat=params.w2)
    # pydensecrf takes a writable C-contiguous buffer (PIL's arrays are read-only).
    rgb = np.array(image, order="C", copy=not image.flags.writeable or None)
    crf.addPairwiseBilateral(sxy=params.sa, srgb=params.sb, rgbim=rgb, compat=params.w1)
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return np.ascontiguousarray(q.T.reshape(h, w, c))


# Worker-process state: the (image, probabilities[, labels]) tuples of a pool. With the
# fork start method children inherit it without copies; elsewhere it is pickled once
# per worker by the initializer, never once per task.
_WORKER_DATA: list[tuple[np.ndarray, ...]] = []


def _set_worker_data(data: list[tuple[np.ndarray, ...]]) -> None:
    global _WORKER_DATA
    _WORKER_DATA = data
    _exit_with_parent()


def _exit_with_parent(every_s: float = 1.0) -> None:
    """Ends this worker process when its parent is gone. A parent killed with SIGKILL
    cannot stop its pool, and the workers, waiting on a queue whose other end they
    hold themselves, would otherwise live on (holding their copy of the data)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _pool(backend: str, workers: int | None, data: list[tuple[np.ndarray, ...]]) -> Executor:
    """Worker processes holding ``data`` (pydensecrf) or threads (TensorFlow)."""
    workers = workers or os.cpu_count() or 1
    if backend == "tensorflow":
        # Threads suffice: TensorFlow releases the GIL while its ops run.
        return ThreadPoolExecutor(max_workers=workers)
    # fork: the children share the parent's arrays; they run only numpy and the C++
    # CRF, never TensorFlow, so TensorFlow's threads in the parent do not matter.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_set_worker_data,
        initargs=(data,),
    )


def _refine_cached_pair(index: int, params: CRFParams) -> np.ndarray:
    image, probabilities = _WORKER_DATA[index][:2]
    return _refine_pydensecrf(image, probabilities, params)


# === Command-line options shared by evaluate.py, predict.py and tune_crf.py ===


def add_crf_arguments(parser, workers: bool = True, switch: bool = True) -> None:
    """``--crf``, ``--crf-params FILE`` (implies ``--crf``), ``--crf-backend`` and, with
    ``workers``, ``--crf-workers`` (argparse); ``switch=False`` leaves out the first two."""
    if switch:
        parser.add_argument(
            "--crf", action="store_true", help="refine with the dense CRF (v1/v2 post-processing)"
        )
        parser.add_argument(
            "--crf-params",
            metavar="FILE",
            help="CRF parameters JSON (tune_crf.py's output); implies --crf (default: CRFParams())",
        )
    parser.add_argument(
        "--crf-backend", choices=BACKENDS, default="auto", help="auto: pydensecrf if installed"
    )
    if workers:
        parser.add_argument(
            "--crf-workers", type=int, help="images refined at once (default: the CPU count)"
        )


def crf_params_from_args(args) -> CRFParams | None:
    """The parameters asked for by ``add_crf_arguments``' flags, or None without CRF.

    Raises a one-line ``ValueError`` naming the file or flag at fault."""
    workers = getattr(args, "crf_workers", None)
    if workers is not None and workers < 1:
        raise ValueError(f"--crf-workers must be >= 1, got {workers}")
    if args.crf_params:
        return CRFParams.load(args.crf_params)
    return CRFParams() if args.crf else None


# === TensorFlow backend: permutohedral lattice ===


def _lattice(features: tf.Tensor, image_ids: tf.Tensor, num_images: tf.Tensor):
    """The permutohedral lattice of points ``features`` [P, d] (float32).

    Points of different images (``image_ids`` [P] in [0, num_images)) never share a
    vertex, so one lattice filters a whole batch. Follows ``Permutohedral::init`` of
    Krähenbühl's densecrf (SSE variant) step by step, vectorised over points.

    Returns:
        vertex_of: int32 [P, d+1] the vertices of each point's simplex, numbered in
            the order of their codes;
        weights: float32 [P, d+1] their barycentric weights;
        blur: d+1 int64 [M] arrays, one per lattice direction j: for each vertex v
            the vertex u whose key is v's + (-1, .., +d at j, .., -1), or -1 where
            there is none (v is then u's neighbour in the opposite direction);
        num_vertices: int32 scalar M.
    """
    d = features.shape[-1]
    d1 = d + 1
    # Lift onto the hyperplane sum(x) = 0 of R^(d+1) (Adams et al., section 3.1),
    # scaled so that the lattice blur approximates a Gaussian of unit deviation.
    scale = np.array(
        [math.sqrt(2.0 / 3.0) * d1 / math.sqrt((i + 1) * (i + 2)) for i in range(d)],
        np.float32,
    )
    cf = features * scale
    tail = tf.cumsum(cf, axis=1, reverse=True)  # tail[:, i] = sum_{k >= i} cf[:, k]
    elevated = tf.concat(
        [tail[:, :1], tf.pad(tail[:, 1:], [[0, 0], [0, 1]]) - np.arange(1, d1, dtype="f4") * cf],
        axis=1,
    )
    # Nearest remainder-0 point, coordinate by coordinate (ties to even, like SSE rounding).
    rounded = tf.round(elevated * np.float32(1.0 / d1))
    total = tf.cast(tf.reduce_sum(rounded, axis=1, keepdims=True), tf.int32)
    residual = elevated - rounded * d1
    # rank[a] = how many coordinates are larger: the simplex the point lies in; ties
    # go to the earlier coordinate, as in the reference loop.
    a_i = residual[:, :, None]
    a_j = residual[:, None, :]
    later = np.triu(np.ones((d1, d1), bool), 1)
    rank = tf.reduce_sum(
        tf.cast(
            tf.logical_or(tf.logical_and(later, a_i < a_j), tf.logical_and(later.T, a_j >= a_i)),
            tf.int32,
        ),
        axis=2,
    )
    # Bring points whose rounded coordinates do not sum to 0 back onto the plane.
    rank += total
    wrap = tf.cast(rank < 0, tf.int32) - tf.cast(rank > d, tf.int32)
    rank += d1 * wrap
    rounded = tf.cast(rounded, tf.int32) + wrap
    residual = (residual - tf.cast(d1 * wrap, tf.float32)) * np.float32(1.0 / d1)
    # Barycentric weights (Adams et al., section 3.1 and p. 10).
    position = d - rank
    bary = tf.einsum(
        "pi,pik->pk", residual, tf.one_hot(position, d1 + 1) - tf.one_hot(position + 1, d1 + 1)
    )
    weights = tf.concat([bary[:, :1] + 1.0 + bary[:, d1:], bary[:, 1:d1]], axis=1)

    # Vertex r of the simplex: key_i = (d+1) rounded_i + r - (d+1) [rank_i + r > d]
    # (the reference's canonical simplex), for i < d; the last coordinate is implied
    # by sum(key) = 0. A vertex's code is the mixed-radix number of (key - low) and the
    # image id, with room for the blur neighbours' +-d so that codes never alias.
    r = np.arange(d1, dtype=np.int32)
    keys = d1 * rounded[:, None, :d] + r[None, :, None]
    keys -= d1 * tf.cast(rank[:, None, :d] + r[None, :, None] > d, tf.int32)
    low = d1 * (tf.reduce_min(rounded[:, :d], axis=0) - 1) - d
    radix = tf.cast(d1 * tf.reduce_max(rounded[:, :d], axis=0) + 2 * d - low + 1, tf.int64)
    fits = tf.debugging.assert_less(
        tf.reduce_sum(tf.math.log(tf.cast(radix, tf.float64)))
        + tf.math.log(tf.cast(num_images, tf.float64)),
        tf.constant(62 * math.log(2.0), tf.float64),
        message="CRF lattice codes overflow int64: feature range too large for sa / sb / sg",
    )
    with tf.control_dependencies([fits]):
        strides = tf.math.cumprod(radix, exclusive=True)
    codes = tf.reduce_sum(tf.cast(keys - low, tf.int64) * strides, axis=2)
    codes += tf.cast(image_ids, tf.int64)[:, None] * tf.reduce_prod(radix)
    unique_codes, first_seen_index = tf.unique(tf.reshape(codes, [-1]))
    # Number vertices in code order: the blur's neighbours then lie at a constant code
    # offset, so their look-ups and the blur's reads run through memory in order.
    order = tf.argsort(unique_codes)
    sorted_codes = tf.gather(unique_codes, order)
    num_vertices = tf.size(sorted_codes)
    sorted_index = tf.scatter_nd(order[:, None], tf.range(num_vertices), [num_vertices])
    vertex_of = tf.reshape(tf.gather(sorted_index, first_seen_index), [-1, d1])

    # Blur neighbours along lattice direction j: key + (-1, ..., -1, +d at j, -1, ...)
    # and its opposite (the reference's n1 and n2). The relation is symmetric, so one
    # search per direction finds both: u = n1(v) exactly when v = n2(u).
    last = tf.cast(num_vertices - 1, tf.int64)
    blur = []
    for j in range(d1):
        shift = (d1 * strides[j] if j < d else 0) - tf.reduce_sum(strides)
        target = sorted_codes + shift
        at = tf.minimum(tf.searchsorted(sorted_codes, target, out_type=tf.int64), last)
        blur.append(tf.where(tf.equal(tf.gather(sorted_codes, at), target), at, -1))
    return vertex_of, weights, blur, num_vertices


class _LatticeFilter:
    """Splat / blur / slice of one lattice as sparse matrix products (graph-safe).

    ``__call__(values [P, C])`` returns S^T B_d ... B_0 S values, which ``alpha`` times
    is densecrf's ``Permutohedral::compute``: B_j = I + (N_j + N_j^T) / 2 with N_j the
    neighbour pairs of direction j. Callers apply ``alpha`` where it costs no extra
    pass over the values (the CRF folds it into its per-pixel scales).
    """

    def __init__(self, vertex_of, weights, blur, num_vertices):
        num_points = tf.shape(vertex_of, out_type=tf.int64)[0]
        d1 = vertex_of.shape[-1]
        m = tf.cast(num_vertices, tf.int64)
        # "alpha" of the reference: corrects the blur's gain so that the response
        # approximates the unit-deviation Gaussian (Adams et al., section 3.1).
        self.alpha = 1.0 / (1.0 + 2.0 ** (1 - d1))
        # S^T [P, M]: each point's d+1 vertices; splatting multiplies by its adjoint.
        rows = tf.reshape(tf.broadcast_to(tf.range(num_points)[:, None], [num_points, d1]), [-1])
        entries = tf.stack([rows, tf.cast(tf.reshape(vertex_of, [-1]), tf.int64)], axis=1)
        self.slice = tf.SparseTensor(entries, tf.reshape(weights, [-1]), tf.stack([num_points, m]))
        # B_j row by row: (v, n2(v)) 1/2, (v, v) 1, (v, n1(v)) 1/2, a missing neighbour
        # replaced by a 0 at (v, v). Rows in order and the identity inside the product
        # make one sequential pass per direction (a third faster than N_j products
        # plus additions on CPU).
        own = tf.range(m)
        rows = tf.reshape(tf.tile(own[:, None], [1, 3]), [-1])
        self.blur = []
        for up in blur:
            has_up = up >= 0
            # down[u] = v where up[v] = u (v is unique); missing ones go to a spare
            # segment m, and vertices without a down neighbour get the lowest int64.
            down = tf.math.unsorted_segment_max(own, tf.where(has_up, up, m), m + 1)[:m]
            has_down = down >= 0
            columns = tf.stack([tf.where(has_down, down, own), own, tf.where(has_up, up, own)], 1)
            values = tf.stack(
                [tf.where(has_down, 0.5, 0.0), tf.ones([m]), tf.where(has_up, 0.5, 0.0)], axis=1
            )
            entries = tf.stack([rows, tf.reshape(columns, [-1])], axis=1)
            self.blur.append(tf.SparseTensor(entries, tf.reshape(values, [-1]), [m, m]))

    @classmethod
    def of_points(cls, features, image_ids, num_images) -> _LatticeFilter:
        return cls(*_lattice(features, image_ids, num_images))

    def __call__(self, values: tf.Tensor) -> tf.Tensor:
        # TensorFlow's CPU kernel for these products is sequential; splitting them into
        # row blocks for parallel execution cost a third more CPU time and twice the
        # tracing time for no measurable gain on 2 shared cores, so it is not done.
        lattice = tf.sparse.sparse_dense_matmul(self.slice, values, adjoint_a=True)
        for blur in self.blur:
            lattice = tf.sparse.sparse_dense_matmul(blur, lattice)
        result = tf.sparse.sparse_dense_matmul(self.slice, lattice)
        result.set_shape(values.shape)  # the sparse product loses the static point count
        return result


def permutohedral_filter(features: Any, values: Any, normalize: bool = True) -> tf.Tensor:
    """Gaussian filter sum_j exp(-|f_i - f_j|^2 / 2) v_j of points, on the lattice.

    ``features`` [P, d], ``values`` [P, C]. With ``normalize`` the response is
    D^-1/2 K D^-1/2 v (D = K 1), the symmetric normalisation the CRF uses; the
    lattice's approximation error is measured against the exact filter in the tests.
    """
    features = tf.convert_to_tensor(features, tf.float32)
    values = tf.convert_to_tensor(values, tf.float32)
    image_ids = tf.zeros(tf.shape(features)[:1], tf.int32)
    lattice = _LatticeFilter.of_points(features, image_ids, tf.constant(1))
    if not normalize:
        return lattice(values) * lattice.alpha
    norm = tf.math.rsqrt(lattice(tf.ones_like(values[:, :1])) * lattice.alpha + 1e-20)
    return lattice(values * norm) * (lattice.alpha * norm)


# === TensorFlow backend: mean field ===


def _kernel_features(images: tf.Tensor, sa: Any, sb: Any, sg: Any):
    """Bilateral [P, 5] and Gaussian [P, 2] features of images [B, H, W, 3] (float32)."""
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    rows, cols = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
    # x is the column and y the row, as in DenseCRF2D.
    xy = tf.cast(tf.tile(tf.stack([cols, rows], axis=-1)[None], [b, 1, 1, 1]), tf.float32)
    xy = tf.reshape(xy, [-1, 2])
    rgb = tf.reshape(tf.cast(images, tf.float32), [-1, 3])
    bilateral = tf.concat([xy / sa, rgb / sb], axis=1)
    image_ids = tf.reshape(tf.broadcast_to(tf.range(b)[:, None], [b, h * w]), [-1])
    return bilateral, xy / sg, image_ids, b


def _mean_field(images, probabilities, w1, sa, sb, w2, sg, iterations) -> tf.Tensor:
    shape = tf.shape(probabilities)
    unary = -tf.math.log(
        tf.clip_by_value(tf.cast(probabilities, tf.float32), PROBABILITY_FLOOR, 1.0)
    )
    unary = tf.reshape(unary, [-1, shape[-1]])
    bilateral, spatial, image_ids, num_images = _kernel_features(images, sa, sb, sg)
    vertex_of, weights, blur, num_vertices = _lattice(bilateral, image_ids, num_images)
    # Mean field is per pixel apart from the filters, so pixels can be visited in any
    # order: the order of their bilateral lattice vertices makes splat and slice read
    # and write the lattice nearly sequentially (about 2x faster on CPU).
    order = tf.argsort(vertex_of[:, 0])
    bilateral_filter = _LatticeFilter(
        tf.gather(vertex_of, order), tf.gather(weights, order), blur, num_vertices
    )
    spatial_filter = _LatticeFilter.of_points(
        tf.gather(spatial, order), tf.gather(image_ids, order), num_images
    )
    unary = tf.gather(unary, order)
    kernels = []
    # Same order as the pydensecrf backend: the Gaussian kernel first.
    for weight, lattice in ((w2, spatial_filter), (w1, bilateral_filter)):
        norm = tf.math.rsqrt(lattice(tf.ones_like(unary[:, :1])) * lattice.alpha + 1e-20)
        kernels.append((lattice, norm, (tf.cast(weight, tf.float32) * lattice.alpha) * norm))

    def step(i, q):
        # Potts: the message to label l is sum_k w_k K_k Q(l) (up to a per-pixel
        # constant that the softmax removes).
        (gaussian, norm_g, scale_g), (bilateral, norm_b, scale_b) = kernels
        messages = gaussian(q * norm_g) * scale_g + bilateral(q * norm_b) * scale_b
        # No sum of three: Grappler turns it into an AddN and then into a temporary
        # variable, which fails under concurrent calls (AlreadyExistsError).
        return i + 1, tf.nn.softmax(messages - unary)

    _, q = tf.while_loop(lambda i, q: i < iterations, step, (tf.constant(0), tf.nn.softmax(-unary)))
    q = tf.scatter_nd(order[:, None], q, tf.shape(q))
    return tf.reshape(q, shape)


def crf_tensorflow(images: Any, probabilities: Any, params: CRFParams | None = None) -> tf.Tensor:
    """The dense CRF in TensorFlow ops, for a batch of equally sized images.

    Args:
        images: RGB [B, H, W, 3], uint8 or float in [0, 255].
        probabilities: [B, H, W, C] class probabilities (softmax output).
        params: ``CRFParams``; its values become constants of the graph.

    Returns:
        float32 [B, H, W, C] refined probabilities. Works eagerly, inside a
        ``tf.function`` (unknown H, W and B) and in a SavedModel; on GPU where the
        ops have GPU kernels (``tf.unique`` may run on the CPU).
    """
    params = params or CRFParams()
    images = tf.convert_to_tensor(images)
    probabilities = tf.convert_to_tensor(probabilities)
    if images.shape.rank != 4 or images.shape[-1] != 3:
        raise ValueError(f"CRF images must be [B, H, W, 3], got {images.shape}")
    if probabilities.shape.rank != 4 or probabilities.shape[-1] is None:
        raise ValueError(f"CRF probabilities must be [B, H, W, C], got {probabilities.shape}")
    if probabilities.shape[-1] < 2 or not probabilities.dtype.is_floating:
        raise ValueError(
            f"CRF probabilities must be floating point [B, H, W, C] with C >= 2, got "
            f"{probabilities.dtype.name} {probabilities.shape}"
        )
    tf.debugging.assert_equal(
        tf.shape(images)[:3],
        tf.shape(probabilities)[:3],
        message="CRF images and probabilities differ in batch or spatial size",
    )
    # As check_inputs (crf.refine): graph assertions, so a SavedModel checks too.
    probabilities = tf.debugging.assert_all_finite(
        tf.cast(probabilities, tf.float32), "CRF probabilities must be finite"
    )
    tf.debugging.assert_non_negative(probabilities, message="CRF probabilities must be >= 0")
    tf.debugging.assert_less_equal(
        tf.reduce_max(tf.abs(tf.reduce_sum(probabilities, -1) - 1.0)),
        _SUM_TOLERANCE,
        message="CRF probabilities must sum to 1 over classes (apply a softmax to logits)",
    )
    return _mean_field(
        images,
        probabilities,
        params.w1,
        params.sa,
        params.sb,
        params.w2,
        params.sg,
        params.iterations,
    )


# One trace serves every size and parameter value: the parameters are tensors.
_mean_field_compiled = tf.function(_mean_field, reduce_retracing=True)


def _refine_tensorflow(image: np.ndarray, probabilities: np.ndarray, params: CRFParams):
    scalars = [tf.constant(float(getattr(params, k))) for k in ("w1", "sa", "sb", "w2", "sg")]
    try:
        q = _mean_field_compiled(
            tf.constant(image[None]),
            tf.constant(probabilities[None]),
            *scalars,
            tf.constant(params.iterations),
        )
    except tf.errors.InvalidArgumentError as e:
        if "overflow" not in e.message:
            raise
        raise ValueError(
            f"CRF sa={params.sa}, sb={params.sb}, sg={params.sg} are too small for this "
            "image: its lattice coordinates overflow int64"
        ) from None
    return q[0].numpy()


# === Parameter search ===


@dataclasses.dataclass(frozen=True)
class SearchGrid:
    """Values of w1, sa and sb to try; defaults are the v2 paper's first round (section 4.1:
    w1 in [3:6], sa in [30:10:100], sb in [3:6], MATLAB notation)."""

    w1: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0)
    sa: tuple[float, ...] = tuple(float(v) for v in range(30, 101, 10))
    sb: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0)

    def __post_init__(self):
        for name in ("w1", "sa", "sb"):
            values = tuple(sorted({float(v) for v in getattr(self, name)}))
            if not values:
                raise ValueError(f"CRF search grid for {name} is empty")
            for value in values:  # CRFParams' checks: finite, sigmas > 0, weights >= 0
                CRFParams(**{name: value})
            object.__setattr__(self, name, values)

    def combinations(self, base: CRFParams) -> list[CRFParams]:
        """Every (w1, sa, sb) of the grid with ``base``'s w2, sg and iterations."""
        return [
            dataclasses.replace(base, w1=w1, sa=sa, sb=sb)
            for w1, sa, sb in itertools.product(self.w1, self.sa, self.sb)
        ]

    def around(self, best: CRFParams) -> SearchGrid:
        """The next, finer round: each axis with several values steps by half its smallest
        spacing around ``best`` (best - step/2, best, best + step/2, kept > 0 for sigmas
        and >= 0 for weights); a single-valued axis stays as it is."""
        axes = {}
        for name in ("w1", "sa", "sb"):
            values = getattr(self, name)
            centre = getattr(best, name)
            if len(values) < 2:
                axes[name] = values
                continue
            half = min(b - a for a, b in itertools.pairwise(values)) / 2
            candidates = (centre - half, centre, centre + half)
            axes[name] = tuple(v for v in candidates if v > 0 or (name == "w1" and v == 0))
        return SearchGrid(**axes)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Outcome of ``search_params``: the best parameters and every evaluated row.

    ``rows`` are dicts (w1, sa, sb, round, mean_iou, pixel_accuracy), best first;
    ``baseline_mean_iou`` is the score of the probabilities' argmax without CRF.
    """

    best: CRFParams
    best_mean_iou: float
    baseline_mean_iou: float
    rows: tuple[dict[str, float | int], ...]
    num_images: int
    backend: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``CRFParams.load`` reads its ``"params"`` entry."""
        return {
            "params": self.best.to_dict(),
            "mean_iou": self.best_mean_iou,
            "baseline_mean_iou": self.baseline_mean_iou,
            "num_images": self.num_images,
            "backend": self.backend,
            "results": list(self.rows),
        }


def write_search_result(path: str | Path, result: SearchResult, **context: Any) -> None:
    """Writes ``result.to_dict()`` (and ``context``: where the data came from) as JSON
    atomically; ``CRFParams.load`` and so ``--crf-params`` read the file."""
    write_json_atomic(path, {**result.to_dict(), **context})


def format_results_table(result: SearchResult, top: int = 10) -> str:
    """The ``top`` rows of a search as a plain-text table, best first."""
    lines = [
        f"CRF search on {result.num_images} images ({result.backend}): without CRF "
        f"mIoU {100 * result.baseline_mean_iou:.2f}; best {100 * result.best_mean_iou:.2f}",
        f"{'rank':>4} {'round':>5} {'w1':>6} {'sa':>7} {'sb':>6} {'mIoU':>7} {'pix acc':>7}",
    ]
    for rank, row in enumerate(result.rows[:top], start=1):
        lines.append(
            f"{rank:>4} {row['round']:>5} {row['w1']:>6.3g} {row['sa']:>7.4g} {row['sb']:>6.3g} "
            f"{100 * row['mean_iou']:>7.2f} {100 * row['pixel_accuracy']:>7.2f}"
        )
    return "\n".join(lines)


def search_params(
    images: Sequence[Any],
    probabilities: Sequence[Any],
    labels: Sequence[Any],
    num_classes: int,
    grid: SearchGrid | None = None,
    base: CRFParams | None = None,
    rounds: int = 2,
    backend: str = "auto",
    workers: int | None = None,
    ignore_label: int = IGNORE_LABEL,
    progress: Callable[[int, int], None] | None = None,
    known: Mapping[CRFParams, np.ndarray] | None = None,
    on_scored: Callable[[CRFParams, np.ndarray], None] | None = None,
) -> SearchResult:
    """Coarse-to-fine grid search of w1, sa, sb maximising mean IoU (v2 paper, sec. 4.1).

    Round 1 evaluates every combination of ``grid`` (the paper's ranges by default)
    with ``base``'s w2, sg and iterations (3, 3, 10: fixed in the paper); each later
    round evaluates ``grid.around(best)``, the step halved around the best so far.
    The score is the mean IoU of the confusion matrix summed over all images (the
    split's metric), so large and small images weigh by their pixels.

    Args:
        images, probabilities: the cached inputs of ``refine`` (uint8 [H, W, 3] and
            [H, W, C] per image; sizes may differ between images).
        labels: ground truth [H, W] per image; ``ignore_label`` pixels do not count.
        num_classes: C.
        rounds: 1 for the coarse grid only.
        backend: ``BACKENDS``; pydensecrf runs (combination, image) pairs in
            ``workers`` processes (default: the CPU count).
        progress: called as ``progress(done, total)`` with done = 0 when a round starts
            and after each evaluated pair.
        known: summed confusion matrices of parameter sets evaluated before (by an
            interrupted search of the same data): taken as they are, not evaluated.
        on_scored: called with each newly evaluated parameter set and its summed
            confusion matrix (to keep them for ``known``).
    """
    grid = grid or SearchGrid()
    base = base or CRFParams()
    if rounds < 1:
        raise ValueError(f"CRF search rounds must be >= 1, got {rounds}")
    if not len(images) == len(probabilities) == len(labels) or not len(images):
        raise ValueError(
            f"CRF search needs as many images, probability maps and labels (>= 1); got "
            f"{len(images)}, {len(probabilities)}, {len(labels)}"
        )
    data = []
    for i, (image, probs, label) in enumerate(zip(images, probabilities, labels, strict=True)):
        image, probs = check_inputs(image, probs)
        label = np.asarray(label)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"labels of image {i} are {list(label.shape)}, expected {list(image.shape[:2])}"
            )
        if probs.shape[-1] != num_classes:
            raise ValueError(
                f"probabilities of image {i} have {probs.shape[-1]} classes, expected {num_classes}"
            )
        bad = (label != ignore_label) & ((label < 0) | (label >= num_classes))
        if bad.any():
            raise ValueError(f"labels of image {i} hold values outside 0..{num_classes - 1}")
        data.append((image, probs, label.astype(np.int64)))
    backend = resolve_backend(backend)
    known = dict(known or {})
    baseline = sum(
        _confusion(label, probs.argmax(-1), num_classes, ignore_label) for _, probs, label in data
    )
    scores: dict[CRFParams, tuple[int, dict[str, float]]] = {}
    best = None
    with _pool(backend, workers, data) as pool:
        for round_number in range(1, rounds + 1):
            if round_number > 1:
                grid = grid.around(best)
            todo = [p for p in grid.combinations(base) if p not in scores]
            computed = _evaluate(
                [p for p in todo if p not in known],
                data, num_classes, ignore_label, backend, pool, progress, on_scored,
            )  # fmt: skip
            for params in todo:  # in the grid's order, known or not: the same ties
                confusion = known[params] if params in known else computed[params]
                scores[params] = (round_number, _scores(confusion))
            best = max(scores, key=lambda p: scores[p][1]["mean_iou"])  # first of equals

    rows = [{"w1": p.w1, "sa": p.sa, "sb": p.sb, "round": r, **s} for p, (r, s) in scores.items()]
    rows.sort(key=lambda row: -row["mean_iou"])  # stable: evaluation order breaks ties
    return SearchResult(
        best=best,
        best_mean_iou=scores[best][1]["mean_iou"],
        baseline_mean_iou=_scores(baseline)["mean_iou"],
        rows=tuple(rows),
        num_images=len(data),
        backend=backend,
    )


def _confusion(label: np.ndarray, prediction: np.ndarray, num_classes: int, ignore_label: int):
    valid = label != ignore_label
    cells = label[valid] * num_classes + prediction[valid]
    return np.bincount(cells, minlength=num_classes**2).reshape(num_classes, num_classes)


def _scores(confusion: np.ndarray) -> dict[str, float]:
    scores = confusion_matrix_scores(confusion)
    return {k: float(scores[k]) for k in ("mean_iou", "pixel_accuracy")}


def _evaluate(
    todo, data, num_classes, ignore_label, backend, pool, progress, on_scored=None
) -> dict[CRFParams, np.ndarray]:
    """Summed confusion matrix of each parameter set in ``todo`` over ``data``;
    ``on_scored(params, matrix)`` as each set's last image is done."""
    tasks = [(params, i) for params in todo for i in range(len(data))]
    if not tasks:  # all known (a resumed search)
        return {}
    if backend == "pydensecrf":
        results = pool.map(
            _confusion_task,
            *zip(*tasks, strict=True),
            itertools.repeat(num_classes),
            itertools.repeat(ignore_label),
            chunksize=max(1, len(tasks) // 64),  # a few chunks per worker: balance
        )
    else:

        def task(params, i):
            prediction = _refine_tensorflow(data[i][0], data[i][1], params).argmax(-1)
            return _confusion(data[i][2], prediction, num_classes, ignore_label)

        results = pool.map(task, *zip(*tasks, strict=True))
    totals = {params: np.zeros((num_classes, num_classes), np.int64) for params in todo}
    if progress is not None:
        progress(0, len(tasks))  # the round starts
    for done, ((params, i), confusion) in enumerate(zip(tasks, results, strict=True), start=1):
        totals[params] += confusion
        if on_scored is not None and i == len(data) - 1:  # tasks come params by params
            on_scored(params, totals[params])
        if progress is not None:
            progress(done, len(tasks))
    return totals


def _confusion_task(params: CRFParams, index: int, num_classes: int, ignore_label: int):
    image, probabilities, label = _WORKER_DATA[index]
    prediction = _refine_pydensecrf(image, probabilities, params).argmax(-1)
    return _confusion(label, prediction, num_classes, ignore_label)
