"""The TensorFlow backend: the dense CRF's mean-field iterations with both kernels filtered
on permutohedral lattices (``lattice``): batched, GPU-capable and usable inside a
``tf.function`` or SavedModel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from deeplab_tf.crf.lattice import LatticeFilter, blur_gain, build_lattice, stack_lattices
from deeplab_tf.crf.params import PROBABILITY_FLOOR, SUM_TOLERANCE, CRFParams


def kernel_features(images: tf.Tensor, sa: Any, sb: Any, sg: Any):
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


def _kernel_lattices(images, sa, sb, sg):
    """What mean field needs of the image and the kernels' widths, whatever the weights
    w1, w2 and the iterations: the pixel order, the stacked lattice, each pixel's
    weights on it, and each kernel's normalisation (see ``_mean_field``)."""
    bilateral, spatial, image_ids, num_images = kernel_features(images, sa, sb, sg)
    vertex_of, weights, blur, num_vertices = build_lattice(bilateral, image_ids, num_images)
    # Mean field is per pixel apart from the filters, so pixels can be visited in any
    # order: the order of their bilateral lattice vertices makes splat and slice read
    # and write the lattice nearly sequentially (about 2x faster on CPU).
    order = tf.argsort(vertex_of[:, 0])
    bilateral_lattice = (tf.gather(vertex_of, order), tf.gather(weights, order), blur, num_vertices)
    spatial_lattice = build_lattice(
        tf.gather(spatial, order), tf.gather(image_ids, order), num_images
    )
    # Both kernels on one stacked lattice: each iteration is one splat, d + 1 blurs and
    # one slice whose products sum the two kernels' messages. The Gaussian kernel comes
    # first in each pixel's sum, as in the pydensecrf backend.
    lattices = (spatial_lattice, bilateral_lattice)
    vertex_of, weights, blur, num_vertices = stack_lattices(lattices)
    lattice = LatticeFilter(vertex_of, blur, num_vertices)
    # Each kernel's symmetric normalisation D^-1/2 K D^-1/2 (D = K 1), from one filter
    # pass over ones: each point's response sums its own vertices' entries.
    ones = lattice.splat(tf.ones_like(weights[:, :1]), weights)[:, 0]
    responses = weights * tf.gather(ones, vertex_of)
    splat_weights, slice_weights, start = [], [], 0
    for own_vertex_of, *_ in lattices:
        width = own_vertex_of.shape[-1]
        gain = blur_gain(width)
        own = slice(start, start + width)
        norm = tf.math.rsqrt(tf.reduce_sum(responses[:, own], 1, keepdims=True) * gain + 1e-20)
        splat_weights.append(weights[:, own] * norm)
        slice_weights.append(weights[:, own] * (gain * norm))  # times the kernel's weight
        start += width
    return order, vertex_of, blur, num_vertices, splat_weights, slice_weights


def _iterate(probabilities, lattices, w1, w2, iterations) -> tf.Tensor:
    """Mean field on ``_kernel_lattices``' lattices with kernel weights w1, w2."""
    order, vertex_of, blur, num_vertices, splat_weights, slice_weights = lattices
    lattice = LatticeFilter(vertex_of, blur, num_vertices)
    shape = tf.shape(probabilities)
    unary = -tf.math.log(
        tf.clip_by_value(tf.cast(probabilities, tf.float32), PROBABILITY_FLOOR, 1.0)
    )
    unary = tf.gather(tf.reshape(unary, [-1, shape[-1]]), order)
    splat = tf.concat(splat_weights, axis=1)
    kernel_weights = (tf.cast(w2, tf.float32), tf.cast(w1, tf.float32))  # the lattices' order
    slice_ = tf.concat([w * s for w, s in zip(kernel_weights, slice_weights, strict=True)], axis=1)

    def step(i, q):
        # Potts: the message to label l is sum_k w_k K_k Q(l) (up to a per-pixel
        # constant that the softmax removes).
        return i + 1, tf.nn.softmax(lattice(q, splat, slice_) - unary)

    _, q = tf.while_loop(lambda i, q: i < iterations, step, (tf.constant(0), tf.nn.softmax(-unary)))
    q = tf.gather(q, tf.math.invert_permutation(order))
    return tf.reshape(q, shape)


def _mean_field(images, probabilities, w1, sa, sb, w2, sg, iterations) -> tf.Tensor:
    return _iterate(probabilities, _kernel_lattices(images, sa, sb, sg), w1, w2, iterations)


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
        SUM_TOLERANCE,
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
_kernel_lattices_compiled = tf.function(_kernel_lattices, reduce_retracing=True)
_iterate_compiled = tf.function(_iterate, reduce_retracing=True)


def refine_tensorflow(image: np.ndarray, probabilities: np.ndarray, params: CRFParams):
    return refine_tensorflow_many(image, probabilities, [params])[0]


def refine_tensorflow_many(
    image: np.ndarray, probabilities: np.ndarray, params: Sequence[CRFParams]
) -> list[np.ndarray]:
    """``refine_tensorflow`` of one image for each of ``params``, which share sa, sb and
    sg: the lattices are built once (a third of one refinement's time at VOC size) and
    only the iterations run per parameter set (w1, w2, iterations)."""
    first = params[0]
    widths = (first.sa, first.sb, first.sg)
    if any((p.sa, p.sb, p.sg) != widths for p in params):
        raise ValueError(f"CRF parameter sets to refine together must share sa, sb, sg: {params}")
    try:
        lattices = _kernel_lattices_compiled(
            tf.constant(image[None]), *(tf.constant(float(v)) for v in widths)
        )
    except tf.errors.InvalidArgumentError as e:
        if "overflow" not in e.message:
            raise
        raise ValueError(
            f"CRF sa={first.sa}, sb={first.sb}, sg={first.sg} are too small for this "
            "image: its lattice coordinates overflow int64"
        ) from None
    probabilities = tf.constant(probabilities[None])
    return [
        _iterate_compiled(
            probabilities,
            lattices,
            tf.constant(float(p.w1)),
            tf.constant(float(p.w2)),
            tf.constant(p.iterations),
        )[0].numpy()
        for p in params
    ]
