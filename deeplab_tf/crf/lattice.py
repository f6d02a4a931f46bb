"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) in TensorFlow ops,
built exactly as ``permutohedral.cpp`` of Krähenbühl's densecrf builds it: features are
lifted onto the lattice, values splatted onto the d + 1 vertices of each point's simplex
with barycentric weights, blurred by [1/2 1 1/2] along the d + 1 lattice directions and
sliced back. Lattice vertices are found with ``tf.unique`` on integer codes instead of a
hash table, and splat, blur and slice are sparse matrix products whose structure is
computed once per image."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf


def build_lattice(features: tf.Tensor, image_ids: tf.Tensor, num_images: tf.Tensor):
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
    # Barycentric weights (Adams et al., section 3.1 and p. 10): the reference adds
    # each coordinate's residual at slot d - rank and subtracts it at the next slot.
    # Ranks order the residuals, so slot k holds the k-th smallest residual s_k minus
    # s_(k-1) (equal residuals are interchangeable): one row sort in place of a
    # scatter of d + 1 terms per point.
    ascending = tf.sort(residual, axis=1)
    weights = tf.concat(
        [
            ascending[:, :1] + (1.0 - ascending[:, d:]),  # slot 0 takes the wrap-around d + 1
            ascending[:, 1:] - ascending[:, :-1],
        ],
        axis=1,
    )

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
    sorted_index = tf.math.invert_permutation(order)
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


def blur_gain(num_directions: int) -> float:
    """densecrf's ``alpha``: corrects the blur's gain so that the response approximates
    the unit-deviation Gaussian (Adams et al., section 3.1), for d + 1 directions."""
    return 1.0 / (1.0 + 2.0 ** (1 - num_directions))


def stack_lattices(lattices):
    """Several lattices of the same points as one: ``build_lattice`` results with their
    vertices numbered one block after another, so that one ``LatticeFilter`` pass
    filters all of them and sums their responses (the CRF's two kernels at once).

    Returns ``build_lattice``'s four values; ``vertex_of`` and ``weights`` hold each
    lattice's d + 1 columns in turn, and a lattice with fewer directions than the
    longest is left unblurred in the others (no neighbours).
    """
    directions = max(len(lattice[2]) for lattice in lattices)
    offset = tf.constant(0, tf.int32)
    vertex_of, weights, blur = [], [], [[] for _ in range(directions)]
    for own_vertex_of, own_weights, own_blur, num_vertices in lattices:
        vertex_of.append(own_vertex_of + offset)
        weights.append(own_weights)
        for j in range(directions):
            if j < len(own_blur):
                up = own_blur[j]
                blur[j].append(tf.where(up >= 0, up + tf.cast(offset, tf.int64), -1))
            else:
                blur[j].append(tf.fill([num_vertices], tf.constant(-1, tf.int64)))
        offset += num_vertices
    blur = [tf.concat(parts, axis=0) for parts in blur]
    return tf.concat(vertex_of, axis=1), tf.concat(weights, axis=1), blur, offset


class LatticeFilter:
    """Splat / blur / slice of one lattice as sparse matrix products (graph-safe).

    ``__call__(values [P, C], splat_weights, slice_weights)`` returns
    T^T B_d ... B_0 S values with S [M, P] the splat (``splat_weights`` [P, K] at each
    point's K = d + 1 vertices) and T the slice (``slice_weights``, by default the
    same), B_j = I + (N_j + N_j^T) / 2 with N_j the neighbour pairs of direction j.
    With the barycentric weights and times ``blur_gain(d + 1)`` it is densecrf's
    ``Permutohedral::compute``; the CRF folds its per-pixel normalisation, the gain
    and the kernel weight into the two weight arrays, so that no pass over the values
    is spent on them.
    """

    def __init__(self, vertex_of, blur, num_vertices):
        num_points = tf.shape(vertex_of, out_type=tf.int64)[0]
        k = vertex_of.shape[-1]
        m = tf.cast(num_vertices, tf.int64)
        rows = tf.reshape(tf.broadcast_to(tf.range(num_points)[:, None], [num_points, k]), [-1])
        self._entries = tf.stack([rows, tf.cast(tf.reshape(vertex_of, [-1]), tf.int64)], axis=1)
        self._shape = tf.stack([num_points, m])
        # B_j = I + (N_j + N_j^T) / 2 as one product: the identity's entries, then the
        # pairs (v, n1(v)) and their transposes, each group in row order (n1 grows
        # with v, the codes being sorted). Only existing neighbours have entries: a
        # fifth fewer than rows of three with zeros for missing ones, and no search
        # for the opposite neighbour.
        own = tf.range(m)
        identity = tf.stack([own, own], axis=1)
        self.blur = []
        for up in blur:
            has_up = tf.where(up >= 0)[:, 0]
            pairs = tf.stack([has_up, tf.gather(up, has_up)], axis=1)
            entries = tf.concat([identity, pairs, tf.reverse(pairs, [1])], axis=0)
            values = tf.concat([tf.ones([m]), tf.fill(2 * tf.shape(has_up)[:1], 0.5)], axis=0)
            self.blur.append(tf.SparseTensor(entries, values, [m, m]))

    def points(self, weights: tf.Tensor) -> tf.SparseTensor:
        """The [P, M] matrix of ``weights`` [P, K] at each point's vertices."""
        return tf.SparseTensor(self._entries, tf.reshape(weights, [-1]), self._shape)

    def splat(self, values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """[M, C]: each point's values spread on its vertices, blurred."""
        lattice = tf.sparse.sparse_dense_matmul(self.points(weights), values, adjoint_a=True)
        for blur in self.blur:
            lattice = tf.sparse.sparse_dense_matmul(blur, lattice)
        return lattice

    def __call__(self, values: tf.Tensor, splat_weights, slice_weights=None) -> tf.Tensor:
        # TensorFlow's CPU kernel for these products is sequential; splitting them into
        # row blocks for parallel execution cost a third more CPU time and twice the
        # tracing time for no measurable gain on 2 shared cores, so it is not done.
        lattice = self.splat(values, splat_weights)
        weights = splat_weights if slice_weights is None else slice_weights
        result = tf.sparse.sparse_dense_matmul(self.points(weights), lattice)
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
    vertex_of, weights, blur, num_vertices = build_lattice(features, image_ids, tf.constant(1))
    lattice = LatticeFilter(vertex_of, blur, num_vertices)
    gain = blur_gain(len(blur))
    if not normalize:
        return lattice(values, weights) * gain
    norm = tf.math.rsqrt(lattice(tf.ones_like(values[:, :1]), weights) * gain + 1e-20)
    return lattice(values, weights * norm, weights * (gain * norm))
