"""Joint (image, label) augmentation ops, pure TensorFlow, usable inside tf.data.

Every op takes and returns ``(image, label)`` with image float32 [H, W, 3] in
[0, 255] and label an integer [H, W] tensor (255 = ignore). Images are resized
bilinearly, labels only by nearest neighbour; images are padded with the mean pixel
(zero after the model's normalisation) and labels with the ignore label. Random ops
are stateless: the same ``seed`` (int32 [2]) gives the same result, which makes the
pipelines reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from deeplab_tf.data.specs import IGNORE_LABEL
from deeplab_tf.layers import IMAGENET_MEAN_RGB

Pair = tuple[tf.Tensor, tf.Tensor]


def resize(image: tf.Tensor, label: tf.Tensor, size: tf.Tensor | Sequence[int]) -> Pair:
    """Resizes to ``size`` = (height, width): image bilinear, label nearest."""
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
    label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
    return image, label


def scale(image: tf.Tensor, label: tf.Tensor, factor: tf.Tensor | float) -> Pair:
    """Rescales both by ``factor`` (new size rounded, at least 1 pixel)."""
    hw = tf.cast(tf.shape(image)[:2], tf.float32) * tf.cast(factor, tf.float32)
    size = tf.maximum(tf.cast(tf.round(hw), tf.int32), 1)
    return resize(image, label, size)


def random_scale_factor(
    seed: tf.Tensor, min_scale: float = 0.5, max_scale: float = 2.0, step: float = 0.25
) -> tf.Tensor:
    """A scale factor in [min_scale, max_scale]: uniform if ``step`` is 0, else drawn
    uniformly from {min_scale, min_scale + step, ..., max_scale} (DeepLab's recipe)."""
    if min_scale > max_scale or min_scale <= 0:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    if step < 0:
        raise ValueError(f"scale step must be >= 0, got {step}")
    if min_scale == max_scale:
        return tf.constant(min_scale, tf.float32)
    if step == 0:
        return tf.random.stateless_uniform([], seed, min_scale, max_scale, tf.float32)
    # Small epsilon so that e.g. (2.0 - 0.5) / 0.25 = 6 steps despite rounding.
    num_steps = int((max_scale - min_scale) / step + 1e-6) + 1
    index = tf.random.stateless_uniform([], seed, 0, num_steps, tf.int32)
    return min_scale + step * tf.cast(index, tf.float32)


def random_scale(
    image: tf.Tensor,
    label: tf.Tensor,
    seed: tf.Tensor,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    step: float = 0.25,
) -> Pair:
    """Rescales by :func:`random_scale_factor` (v3: 0.5..2.0 step 0.25; v2: 0.5..1.5)."""
    return scale(image, label, random_scale_factor(seed, min_scale, max_scale, step))


def pad_to_size(
    image: tf.Tensor,
    label: tf.Tensor,
    height: int | tf.Tensor,
    width: int | tf.Tensor,
    mean_pixel: Sequence[float] = IMAGENET_MEAN_RGB,
    ignore_label: int = IGNORE_LABEL,
) -> Pair:
    """Pads bottom and right up to at least (height, width): image with the mean pixel,
    label with the ignore label. Larger inputs are left as they are."""
    shape = tf.shape(image)
    pad_h = tf.maximum(height - shape[0], 0)
    pad_w = tf.maximum(width - shape[1], 0)
    paddings = [[0, pad_h], [0, pad_w]]
    image = tf.cast(image, tf.float32)
    # Channel by channel, so every channel gets its own mean and real pixels stay exact.
    image = tf.stack(
        [tf.pad(image[..., c], paddings, constant_values=float(mean_pixel[c])) for c in range(3)],
        axis=-1,
    )
    label = tf.pad(label, paddings, constant_values=tf.cast(ignore_label, label.dtype))
    return image, label


def random_crop(
    image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, height: int, width: int
) -> Pair:
    """Crops the same random (height, width) window from both; inputs must be large
    enough (pad first)."""
    shape = tf.shape(image)
    tf.debugging.assert_greater_equal(
        shape[:2], tf.constant([height, width]), message="random_crop: pad the input first"
    )
    offset = tf.random.stateless_uniform([2], seed, 0, tf.int32.max, tf.int32) % (
        shape[:2] - tf.constant([height, width]) + 1
    )
    image = tf.slice(image, [offset[0], offset[1], 0], [height, width, 3])
    label = tf.slice(label, offset, [height, width])
    return image, label


def random_flip_left_right(
    image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, probability: float = 0.5
) -> Pair:
    """Mirrors both horizontally with ``probability``."""
    flip = tf.random.stateless_uniform([], seed) < probability
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
    return image, label
