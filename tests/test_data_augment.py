"""Joint image + label ops, one at a time, against numpy.

Images encode their own coordinates (R = row, G = column), labels the same coordinates
(row * 16 + column, a few pixels 255), so every output pixel says where it came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf.data import augment
from deeplab_tf.layers import IMAGENET_MEAN_RGB

H, W = 12, 15


def _coords() -> tuple[tf.Tensor, tf.Tensor]:
    r, c = np.mgrid[0:H, 0:W]
    image = np.stack([r, c, np.full_like(r, 7)], -1).astype(np.float32)
    label = (r * 16 + c).astype(np.int32) % 200
    label[:, 6] = 255  # an ignore band
    return tf.constant(image), tf.constant(label)


def _seed(i: int) -> tf.Tensor:
    return tf.constant([i, 17], tf.int32)


def test_pad_uses_mean_pixel_and_ignore_label_and_keeps_pixels_exact():
    image, label = _coords()
    padded_image, padded_label = augment.pad_to_size(image + 0.3, label, 20, 17)
    assert padded_image.shape == (20, 17, 3) and padded_label.shape == (20, 17)
    np.testing.assert_array_equal(padded_image[:H, :W], image.numpy() + np.float32(0.3))
    np.testing.assert_array_equal(padded_label[:H, :W], label)
    pad_pixels = np.concatenate([padded_image[H:].numpy().reshape(-1, 3),
                                 padded_image[:, W:].numpy().reshape(-1, 3)])  # fmt: skip
    np.testing.assert_array_equal(
        pad_pixels, np.broadcast_to(np.float32(IMAGENET_MEAN_RGB), pad_pixels.shape)
    )
    assert (padded_label[H:].numpy() == 255).all() and (padded_label[:, W:].numpy() == 255).all()
    same_image, same_label = augment.pad_to_size(image, label, 5, 5)  # already large enough
    assert same_image.shape == image.shape and same_label.shape == label.shape


@pytest.mark.parametrize("i", range(5))
def test_crop_takes_the_same_window_from_both(i):
    image, label = _coords()
    crop_image, crop_label = augment.random_crop(image, label, _seed(i), 5, 8)
    assert crop_image.shape == (5, 8, 3) and crop_label.shape == (5, 8)
    top, left = int(crop_image[0, 0, 0]), int(crop_image[0, 0, 1])
    np.testing.assert_array_equal(crop_image, image[top : top + 5, left : left + 8])
    np.testing.assert_array_equal(crop_label, label[top : top + 5, left : left + 8])


def test_crop_offsets_cover_the_whole_range():
    image, label = _coords()
    tops = {int(augment.random_crop(image, label, _seed(i), 10, 14)[0][0, 0, 0]) for i in range(60)}
    assert tops == {0, 1, 2}


def test_flip_applies_to_image_and_label_together():
    image, label = _coords()
    flipped = 0
    for i in range(20):
        out_image, out_label = augment.random_flip_left_right(image, label, _seed(i))
        if out_image[0, 0, 1] == W - 1:
            flipped += 1
            np.testing.assert_array_equal(out_image, image.numpy()[:, ::-1])
            np.testing.assert_array_equal(out_label, label.numpy()[:, ::-1])
        else:
            np.testing.assert_array_equal(out_image, image)
            np.testing.assert_array_equal(out_label, label)
    assert 0 < flipped < 20


def test_scale_factor_takes_the_discrete_steps_of_the_range():
    factors = {
        round(float(augment.random_scale_factor(_seed(i), 0.5, 2.0, 0.25)), 6) for i in range(200)
    }
    assert factors == {0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0}
    uniform = [float(augment.random_scale_factor(_seed(i), 0.5, 1.5, 0.0)) for i in range(200)]
    assert 0.5 <= min(uniform) < 0.6 and 1.4 < max(uniform) <= 1.5
    assert len(set(uniform)) == 200


@pytest.mark.parametrize("i", range(6))
def test_random_scale_size_and_nearest_labels(i):
    image, label = _coords()
    factor = float(augment.random_scale_factor(_seed(i), 0.5, 1.5, 0.25))
    out_image, out_label = augment.random_scale(image, label, _seed(i), 0.5, 1.5, 0.25)
    assert out_image.shape[:2] == out_label.shape == (round(H * factor), round(W * factor))
    # Nearest neighbour: only values of the source label, never a blend.
    assert set(np.unique(out_label)) <= set(np.unique(label))
    assert out_label.dtype == label.dtype


def test_upscaling_by_two_repeats_label_pixels_and_keeps_the_ignore_band():
    image, label = _coords()
    _, out_label = augment.random_scale(image, label, _seed(0), 2.0, 2.0, 0.0)
    expected = np.repeat(np.repeat(label.numpy(), 2, 0), 2, 1)
    np.testing.assert_array_equal(out_label, expected)
    assert (out_label.numpy()[:, 12:14] == 255).all()


def test_bilinear_image_resize_matches_numpy_at_half_size():
    image, label = _coords()
    out_image, _ = augment.resize(image, label, (6, 5))
    # Half-pixel centres: output row i samples input row 2i + 0.5, column j samples 3j + 1.
    np.testing.assert_allclose(
        out_image[..., 0], np.broadcast_to((np.arange(6) * 2 + 0.5)[:, None], (6, 5))
    )
    np.testing.assert_allclose(out_image[..., 1], np.broadcast_to(np.arange(5) * 3 + 1.0, (6, 5)))


def test_same_seed_same_result():
    image, label = _coords()

    def chain(seed):
        a, b = augment.random_scale(image, label, seed)
        a, b = augment.pad_to_size(a, b, 16, 16)
        a, b = augment.random_crop(a, b, seed, 16, 16)
        return augment.random_flip_left_right(a, b, seed)

    first, again, other = chain(_seed(3)), chain(_seed(3)), chain(_seed(4))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])
