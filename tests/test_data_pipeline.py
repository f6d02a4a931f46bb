"""Training and evaluation pipelines on a tiny TFRecord split of lossless PNG images."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf.data import pipeline, sources
from deeplab_tf.data.build import build_split
from deeplab_tf.data.specs import SPECS
from deeplab_tf.layers import IMAGENET_MEAN_RGB
from tests.data_helpers import random_image, random_label, write_png

SIZES = [(20, 30), (24, 24), (18, 26), (30, 22), (16, 16), (26, 28)]
MEAN = np.float32(IMAGENET_MEAN_RGB)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six PNG images of different sizes; class 4 only in images 1 and 4."""
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i, (h, w) in enumerate(SIZES):
        label = random_label(rng, h, w, 4)
        if i in (1, 4):
            label[:3, :3] = 4
        images.append(random_image(rng, h, w))
        labels.append(label)
        write_png(root / "images" / f"im{i}.png", images[-1])
        write_png(root / "masks" / f"im{i}.png", label)
    pairs = sources.folder_pairs(root / "images", root / "masks")
    build_split(pairs, SPECS["shapes"], root / "tf", "train", num_shards=3)
    return root / "tf", images, labels


def _match(image, label, images, labels):
    """(source index, flipped) of a padded (and maybe mirrored) whole source image.

    Padding comes before the flip, so a mirrored output has its padding on the left.
    """
    for flipped in (False, True):
        view, view_label = (image[:, ::-1], label[:, ::-1]) if flipped else (image, label)
        for i, (src, lab) in enumerate(zip(images, labels, strict=True)):
            h, w = lab.shape
            if np.array_equal(view[:h, :w], src):
                np.testing.assert_array_equal(view_label[:h, :w], lab)  # same flip, same window
                return i, flipped
    raise AssertionError("output matches no source image")


def _unscaled(data_dir, **kwargs):
    return pipeline.train_dataset(
        data_dir, batch_size=1, crop_size=40, min_scale=1.0, max_scale=1.0, repeat=False, **kwargs
    )


def test_train_batches_have_crop_shape_and_dtypes(data):
    ds = pipeline.train_dataset(data[0], batch_size=2, crop_size=(33, 41), seed=0)
    assert ds.element_spec[0].shape == (2, 33, 41, 3) and ds.element_spec[1].shape == (2, 33, 41)
    for image, label in ds.take(3):
        assert image.dtype == tf.float32 and label.dtype == tf.int32
        assert 0 <= image.numpy().min() and image.numpy().max() <= 255
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 255}


def test_padding_is_mean_pixel_and_ignore_and_flip_is_joint(data):
    data_dir, images, labels = data
    seen, flips = [], []
    for image, label in _unscaled(data_dir, seed=1):
        image, label = image[0].numpy(), label[0].numpy()
        i, flipped = _match(image, label, images, labels)
        seen.append(i)
        flips.append(flipped)
        if flipped:
            image, label = image[:, ::-1], label[:, ::-1]
        h, w = labels[i].shape
        pad = np.ones((40, 40), bool)
        pad[:h, :w] = False
        np.testing.assert_array_equal(image[pad], np.broadcast_to(MEAN, (pad.sum(), 3)))
        assert (label[pad] == 255).all()
    assert sorted(seen) == list(range(6))  # one epoch, every image once
    assert any(flips) and not all(flips)


@pytest.mark.parametrize("scales", [(0.5, 1.5, 0.25), (0.75, 1.25, 0.0)])
def test_scale_range_is_respected(data, scales):
    lo, hi, step = scales
    allowed = np.arange(lo, hi + 1e-6, step) if step else None
    ds = pipeline.train_dataset(
        data[0], batch_size=1, crop_size=48, min_scale=lo, max_scale=hi, scale_step=step, seed=2
    )
    sizes = {tuple(map(int, s)) for s in SIZES}
    for image, _ in ds.take(20):
        real = ~np.all(image[0].numpy() == MEAN, axis=-1)
        h, w = int(real.any(1).sum()), int(real.any(0).sum())
        if allowed is not None:
            candidates = {(round(a * s), round(b * s)) for a, b in sizes for s in allowed}
            assert (h, w) in candidates
        else:
            assert any(
                lo - 0.05 <= h / a <= hi + 0.05 and lo - 0.05 <= w / b <= hi + 0.05
                for a, b in sizes
            )


def test_seed_makes_the_stream_reproducible(data):
    def first(seed):
        ds = pipeline.train_dataset(data[0], batch_size=2, crop_size=24, seed=seed)
        return [(a.numpy(), b.numpy()) for a, b in ds.take(4)]

    a, b, c = first(5), first(5), first(6)
    for (ia, la), (ib, lb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


def test_oversampling_repeats_images_with_hard_classes(data):
    data_dir, images, labels = data
    ds = _unscaled(data_dir, seed=0, flip=False, oversample_classes=[4], oversample_factor=3)
    counts = np.zeros(6, int)
    for image, label in ds:
        counts[_match(image[0].numpy(), label[0].numpy(), images, labels)[0]] += 1
    expected = [3 if (lab == 4).any() else 1 for lab in labels]
    assert counts.tolist() == expected == [1, 3, 1, 1, 3, 1]


@pytest.mark.parametrize("num_shards_in_dir", ["files", "records"])
def test_input_context_gives_disjoint_shards(data, tmp_path, num_shards_in_dir):
    data_dir, images, labels = data
    if num_shards_in_dir == "records":  # one file: fewer files than pipelines
        pairs = sources.folder_pairs(data_dir.parent / "images", data_dir.parent / "masks")
        build_split(pairs, SPECS["shapes"], tmp_path, "train", num_shards=1)
        data_dir = tmp_path
    parts = []
    for worker in range(2):
        ctx = tf.distribute.InputContext(2, worker, num_replicas_in_sync=2)
        ds = pipeline.train_dataset(
            data_dir, batch_size=2, crop_size=40, min_scale=1.0, max_scale=1.0,
            repeat=False, input_context=ctx, seed=0, drop_remainder=False,
        )  # fmt: skip
        assert ds.element_spec[0].shape[0] is None  # per-replica batches of 1
        parts.append([_match(x[0].numpy(), y[0].numpy(), images, labels)[0] for x, y in ds])
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == list(range(6))


def test_eval_batch_one_is_whole_images_in_file_order(data):
    data_dir, images, labels = data
    ds = pipeline.eval_dataset(data_dir, "train")
    out = list(ds)
    assert len(out) == 6 == pipeline.num_examples(data_dir, "train")
    assert pipeline.dataset_spec(data_dir) == SPECS["shapes"]
    with pytest.raises(ValueError, match="no split 'val'; built: train"):
        pipeline.num_examples(data_dir, "val")
    for (image, label), src, lab in zip(out, images, labels, strict=True):
        np.testing.assert_array_equal(image[0], src.astype(np.float32))
        np.testing.assert_array_equal(label[0], lab)


def test_eval_padded_batches_carry_a_valid_mask(data):
    data_dir, images, labels = data
    batches = list(pipeline.eval_dataset(data_dir, "train", batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 2]
    image, label, valid = (t.numpy() for t in batches[0])
    assert image.shape == (4, 30, 30, 3) and valid.dtype == np.float32
    for k in range(4):
        h, w = SIZES[k]
        assert valid[k].sum() == h * w and valid[k, :h, :w].all()
        np.testing.assert_array_equal(image[k, :h, :w], images[k])
        np.testing.assert_array_equal(label[k, :h, :w], labels[k])
        pad = valid[k] == 0
        assert (label[k][pad] == 255).all()
        np.testing.assert_allclose(image[k][pad], np.broadcast_to(MEAN, (pad.sum(), 3)))
    fixed = next(iter(pipeline.eval_dataset(data_dir, "train", batch_size=2, pad_to=(32, 40))))
    assert fixed[0].shape == (2, 32, 40, 3) and fixed[2].shape == (2, 32, 40)


def test_eval_resize_uses_nearest_labels(data):
    data_dir, _, labels = data
    for (image, label), lab in zip(
        pipeline.eval_dataset(data_dir, "train", resize=(13, 17)), labels, strict=True
    ):
        assert image.shape == (1, 13, 17, 3) and label.shape == (1, 13, 17)
        assert set(np.unique(label)) <= set(np.unique(lab))
