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


class LatticeFilter:
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
    def of_points(cls, features, image_ids, num_images) -> LatticeFilter:
        return cls(*build_lattice(features, image_ids, num_images))

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
    lattice = LatticeFilter.of_points(features, image_ids, tf.constant(1))
    if not normalize:
        return lattice(values) * lattice.alpha
    norm = tf.math.rsqrt(lattice(tf.ones_like(values[:, :1])) * lattice.alpha + 1e-20)
    return lattice(values * norm) * (lattice.alpha * norm)
