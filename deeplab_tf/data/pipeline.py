"""tf.data input pipelines of the DeepLab papers, reading the shards of ``tfrecord.py``.

Training (v3 paper, section 4.1; v2 section 4.1): decode, random scale, pad to the crop
size with the mean pixel / ignore label, random crop, random left-right flip, batch.
Evaluation: whole images at their original size (or resized), batch 1 or padded
batches with a valid-pixel mask.

Both yield float32 images in [0, 255] (the model normalises) and int32 labels with
255 = ignore.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow as tf

from deeplab_tf.data import augment, tfrecord
from deeplab_tf.data.specs import IGNORE_LABEL, DatasetSpec, spec_from_dict
from deeplab_tf.layers import IMAGENET_MEAN_RGB

AUTOTUNE = tf.data.AUTOTUNE

# (min_scale, max_scale, step) of the papers' random scaling.
V3_SCALES = (0.5, 2.0, 0.25)  # v3 section 4.1 / the DeepLab train flags
V2_SCALES = (0.5, 1.5, 0.25)  # v2 section 4.1: "randomly scaling the input images (0.5 to 1.5)"


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def read_examples(
    data_dir: str | Path,
    split: str,
    *,
    input_context: tf.distribute.InputContext | None = None,
    shuffle_files_seed: int | None = None,
    shuffle_files: bool = False,
    interleave: bool = True,
) -> tf.data.Dataset:
    """Parsed (undecoded) examples of a split, sharded for ``input_context``.

    Files are sharded across input pipelines when there are enough of them, records
    otherwise, so every pipeline sees a disjoint part of the split. Without
    ``interleave`` the records come in file order (shard 0 first).
    """
    files = tfrecord.list_shards(data_dir, split)
    ds = tf.data.Dataset.from_tensor_slices(files)
    shard_records = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(files) >= input_context.num_input_pipelines:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        else:
            shard_records = True
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=shuffle_files_seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 4) if interleave else 1,
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    if shard_records:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds.map(tfrecord.parse_example, num_parallel_calls=AUTOTUNE)


def oversample(ds: tf.data.Dataset, class_ids: Sequence[int], factor: int = 2) -> tf.data.Dataset:
    """Repeats ``factor`` times every example containing one of ``class_ids``.

    v3 bootstrapping (section 4.1): "duplicate the images that contain the hard classes".
    Reads the classes-present list of the schema, so no label is decoded.
    """
    if factor < 1:
        raise ValueError(f"oversample factor must be >= 1, got {factor}")
    if not class_ids or factor == 1:
        return ds
    wanted = tf.constant(list(class_ids), tf.int64)

    def repeat(example: dict[str, tf.Tensor]) -> tf.data.Dataset:
        present = example[tfrecord.CLASSES_PRESENT]
        hit = tf.reduce_any(tf.equal(present[:, None], wanted[None, :]))
        count = tf.where(hit, tf.constant(factor, tf.int64), tf.constant(1, tf.int64))
        return tf.data.Dataset.from_tensors(example).repeat(count)

    return ds.flat_map(repeat)


def train_dataset(
    data_dir: str | Path,
    split: str = "train",
    *,
    batch_size: int,
    crop_size: int | Sequence[int] = 513,
    min_scale: float = V3_SCALES[0],
    max_scale: float = V3_SCALES[1],
    scale_step: float = V3_SCALES[2],
    flip: bool = True,
    seed: int | None = None,
    shuffle_buffer: int = 1000,
    repeat: bool = True,
    oversample_classes: Sequence[int] = (),
    oversample_factor: int = 2,
    input_context: tf.distribute.InputContext | None = None,
    mean_pixel: Sequence[float] = IMAGENET_MEAN_RGB,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """The training pipeline: yields (image float32 [B, h, w, 3], label int32 [B, h, w]).

    Args:
        data_dir: TFRecord directory written by the builders.
        split: split name, e.g. "train_aug".
        batch_size: global batch size; with ``input_context`` each pipeline yields its
            per-replica share.
        crop_size: int or (h, w); 513 for v3, 321 for v1/v2.
        min_scale, max_scale, scale_step: random scale range (``V3_SCALES``,
            ``V2_SCALES``); step 0 draws uniformly.
        flip: random left-right flip.
        seed: makes the whole stream reproducible (order and augmentation).
        shuffle_buffer: examples in the shuffle buffer.
        repeat: repeat forever (fit with ``steps_per_epoch``).
        oversample_classes: class ids whose images are repeated ``oversample_factor``
            times (v3 bootstrapping).
        input_context: from ``tf.distribute`` for multi-worker input.
        mean_pixel: image padding value (RGB): the pixel the model's normalisation
            maps to zero (``layers.normalization_mean(model)``); the default is the
            ImageNet mean of ResNet/VGG, not MobileNetV2's 127.5.
        drop_remainder: keep batch shapes static.
    """
    crop_h, crop_w = _pair(crop_size)
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        if seed is not None:  # workers must not draw identical augmentations
            seed = seed * 1000 + input_context.input_pipeline_id
    ds = read_examples(
        data_dir, split, input_context=input_context, shuffle_files=True, shuffle_files_seed=seed
    )
    ds = oversample(ds, oversample_classes, oversample_factor)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    # One independent stateless seed per element: reproducible under parallel map.
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds))

    def preprocess(example: dict[str, tf.Tensor], seed_pair: tf.Tensor) -> augment.Pair:
        keys = tf.random.experimental.stateless_split(seed_pair, 3)
        image, label = tfrecord.decode_example(example)
        image = tf.cast(image, tf.float32)
        label = tf.cast(label, tf.int32)
        image, label = augment.random_scale(image, label, keys[0], min_scale, max_scale, scale_step)
        image, label = augment.pad_to_size(image, label, crop_h, crop_w, mean_pixel)
        image, label = augment.random_crop(image, label, keys[1], crop_h, crop_w)
        if flip:
            image, label = augment.random_flip_left_right(image, label, keys[2])
        image.set_shape([crop_h, crop_w, 3])
        label.set_shape([crop_h, crop_w])
        return image, label

    ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = seed is not None
    return ds.with_options(options).prefetch(AUTOTUNE)


def eval_dataset(
    data_dir: str | Path,
    split: str = "val",
    *,
    batch_size: int = 1,
    resize: int | Sequence[int] | None = None,
    pad_to: int | Sequence[int] | None = None,
    input_context: tf.distribute.InputContext | None = None,
    mean_pixel: Sequence[float] = IMAGENET_MEAN_RGB,
) -> tf.data.Dataset:
    """The evaluation pipeline over whole images, in the order they were written.

    With ``batch_size == 1`` and no ``pad_to`` it yields (image float32 [1, H, W, 3],
    label int32 [1, H, W]) at each image's own size. Otherwise images are padded (bottom
    and right, mean pixel / ignore label) to the largest in the batch or to ``pad_to``
    and it yields (image, label, valid) with ``valid`` float32 [B, H, W], 1 on real
    pixels, which Keras reads as a sample weight. ``resize`` = (h, w) resizes every
    image (labels nearest); metrics at the original resolution need ``resize=None``.
    """
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    ds = read_examples(data_dir, split, input_context=input_context, interleave=False)

    def decode(example: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = tfrecord.decode_example(example)
        image, label = tf.cast(image, tf.float32), tf.cast(label, tf.int32)
        if resize is not None:
            image, label = augment.resize(image, label, _pair(resize))
        return image, label

    ds = ds.map(decode, num_parallel_calls=AUTOTUNE)
    if batch_size == 1 and pad_to is None:
        return ds.batch(1).prefetch(AUTOTUNE)

    def add_mask(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return image, label, tf.ones(tf.shape(label), tf.float32)

    shapes = ([None, None, 3], [None, None], [None, None])
    if pad_to is not None:
        h, w = _pair(pad_to)
        shapes = ([h, w, 3], [h, w], [h, w])
    ds = ds.map(add_mask).padded_batch(
        batch_size, padded_shapes=shapes, padding_values=(0.0, IGNORE_LABEL, 0.0)
    )
    mean = tf.constant(mean_pixel, tf.float32)

    def fill_mean(image: tf.Tensor, label: tf.Tensor, valid: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return image + (1.0 - valid[..., None]) * mean, label, valid

    return ds.map(fill_mean, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def eval_examples(
    data_dir: str | Path, split: str, count: int | None = None, skip: int = 0
) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
    """(image, label) batches of one of ``eval_dataset``, the first ``count`` images
    less the first ``skip`` (done by an interrupted run); a truncated or corrupt shard
    is a one-line ValueError naming it."""
    dataset = eval_dataset(data_dir, split).take(-1 if count is None else count)
    try:
        yield from dataset.skip(skip)
    except tf.errors.DataLossError as error:
        raise tfrecord.corrupt_shard_error(data_dir, [split], error) from None


def num_examples(data_dir: str | Path, split: str) -> int:
    """Examples in a split, from the manifest (for ``steps_per_epoch``)."""
    splits = tfrecord.read_manifest(data_dir)["splits"]
    if split not in splits:
        raise ValueError(f"{data_dir}: no split {split!r}; built: {', '.join(sorted(splits))}")
    return int(splits[split]["num_examples"])


def dataset_spec(data_dir: str | Path) -> DatasetSpec:
    """The dataset declaration a TFRecord directory was built with (classes, colours)."""
    return spec_from_dict(tfrecord.read_manifest(data_dir)["dataset"])
