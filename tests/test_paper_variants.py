"""Every DeepLab v1/v2 and Yu-Koltun variant: its paper recipe, a few training steps on
shapes images, and the ``.keras`` file of the trained model."""

import dataclasses

import keras
import numpy as np
import pytest

from deeplab_tf import VARIANTS, build_model, get_variant
from deeplab_tf.backbones import vgg
from deeplab_tf.backbones.resnet import RESNET_UNITS
from deeplab_tf.data.shapes import SPEC, ensure_shapes_tfrecords, render_example
from deeplab_tf.files import save_model_atomic
from deeplab_tf.recipes import default_recipe
from deeplab_tf.training import TrainConfig, compile_model
from deeplab_tf.training import train as run_training
from tests.helpers import assert_close_relative

PAPER_VARIANTS = [
    name
    for name, variant in VARIANTS.items()
    if variant.backbone in vgg.VGG_BACKBONES or variant.head == "atrous_logits"
]


def test_the_papers_systems_are_registered():
    assert PAPER_VARIANTS == [
        "deeplabv1",
        "deeplabv1-7x7",
        "deeplabv1-4x4-r8",
        "deeplabv1-largefov",
        "deeplabv1-msc-largefov",
        "deeplabv2-vgg16-aspp-s",
        "deeplabv2-vgg16-aspp-l",
        "deeplabv2-resnet101-largefov",
        "deeplabv2-resnet101-aspp-l",
        "deeplabv2-resnet101-msc-aspp-l",
        "dilation-frontend",
        "dilation-context-basic",
        "dilation-context-large",
    ]
    for name in PAPER_VARIANTS:
        assert VARIANTS[name].paper and VARIANTS[name].output_stride == 8


@pytest.mark.parametrize(
    "name, recipe",
    [
        ("deeplabv1", "v1-voc-step"),
        ("deeplabv1-7x7", "v1-voc-step"),
        ("deeplabv1-4x4-r8", "v1-voc-step"),
        ("deeplabv1-largefov", "v1-voc-step"),
        ("deeplabv1-msc-largefov", "v1-voc-msc"),
        ("deeplabv2-vgg16-aspp-s", "v2-voc-poly"),
        ("deeplabv2-vgg16-aspp-l", "v2-voc-poly"),
        ("deeplabv2-resnet101-largefov", "v2-voc-resnet101"),
        ("deeplabv2-resnet101-aspp-l", "v2-voc-resnet101"),
        ("deeplabv2-resnet101-msc-aspp-l", "v2-voc-resnet101"),
        ("dilation-frontend", "yu-koltun-frontend"),
        ("dilation-context-basic", "yu-koltun-context"),
        ("dilation-context-large", "yu-koltun-context"),
    ],
)
def test_train_py_uses_the_paper_protocol(name, recipe):
    """``train.py --variant NAME --data-dir VOC`` (DESIGN.md, training protocols)."""
    chosen = default_recipe(name, "pascal_voc_2012")
    assert chosen.name == recipe
    if recipe.startswith(("v1", "v2")):  # v1 section 5, v2 section 4.1
        assert (chosen.optimizer, chosen.momentum, chosen.weight_decay) == ("sgd", 0.9, 5e-4)
        assert (chosen.learning_rate, chosen.classifier_lr_multiplier) == (0.001, 10.0)
        assert (chosen.crop_size, chosen.output_stride, chosen.upsample_logits) == (321, 8, False)
    if recipe.startswith("v1"):
        policy = (chosen.lr_policy, chosen.lr_step_size, chosen.lr_step_gamma, chosen.batch_size)
        assert policy == ("step", 2000, 0.1, 20)
    elif recipe.startswith("v2"):  # v2 section 4.1.2, Table 2
        assert (chosen.lr_policy, chosen.lr_power, chosen.batch_size) == ("poly", 0.9, 10)
    else:  # Yu-Koltun section 4
        assert (chosen.learning_rate, chosen.momentum, chosen.batch_size) == (0.001, 0.9, 14)
    assert chosen.train_only_new_layers == (recipe in ("v1-voc-msc", "yu-koltun-context"))


# Smaller through the same code, to keep these runs to seconds on a CPU: the 4096-wide
# fc6/fc7 (50-120M weights, 0.5-1 GB files) train 64 wide and VGG-16's blocks an eighth
# as wide (the real layers: tests/test_vgg.py builds and counts them; the Yu-Koltun
# front end runs them on 186-pixel margins, 388x388 for a 16-pixel image), and
# ResNet-101 keeps one unit of block1 and block2 and two of block3 (the first strided or
# dilated, then one as the rest), all three of block4 (ResNet-101 itself:
# tests/test_backbones.py, test_model.py).
SHORT_RESNET101_UNITS = (1, 1, 2, 3)
NARROW_VGG16_BLOCKS = tuple((filters // 8, convs) for filters, convs in vgg.VGG16_BLOCKS)


def _test_sized(name: str):
    """The variant with fc6/fc7 64 wide (4096 or 1024 in the papers: the dilated
    convolutions' backward pass on them takes seconds per step on a CPU); the rest
    (recipe, heads, rates, stages) as registered."""
    variant = get_variant(name)
    if variant.head == "vgg_fc" and variant.head_filters > 64:
        variant = dataclasses.replace(variant, head_filters=64)
    return variant


@pytest.fixture(scope="module", autouse=True)
def test_sized_backbones():
    """ResNet-101 with ``SHORT_RESNET101_UNITS`` units and VGG-16 with
    ``NARROW_VGG16_BLOCKS`` while this module runs (its first-stage files included)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(RESNET_UNITS, "resnet101", SHORT_RESNET101_UNITS)
        patch.setattr(vgg, "VGG16_BLOCKS", NARROW_VGG16_BLOCKS)
        yield


# The first stages of the second-stage variants, as train.py saves them.
FIRST_STAGES = {"deeplabv1-msc-largefov": "deeplabv1-largefov"}
FIRST_STAGES.update(
    dict.fromkeys(("dilation-context-basic", "dilation-context-large"), "dilation-frontend")
)


@pytest.fixture(scope="module")
def first_stage_checkpoints(test_sized_backbones, tmp_path_factory):
    paths = {}
    for first in sorted(set(FIRST_STAGES.values())):
        keras.utils.set_random_seed(0)
        paths[first] = tmp_path_factory.mktemp("first") / f"{first}.keras"
        build_model(_test_sized(first), SPEC.num_classes).save(paths[first])
    return paths


def _shapes_batch(size, count=2):
    """``count`` shapes images (rendered at 33 px, cropped to ``size``) and labels."""
    rng = np.random.default_rng(1)
    images, labels = zip(*(render_example(rng, 33) for _ in range(count)), strict=True)
    images, labels = np.stack(images)[:, :size, :size], np.stack(labels)[:, :size, :size]
    return images.astype("float32"), labels.astype("int32")


@pytest.mark.parametrize("name", PAPER_VARIANTS)
def test_trains_a_few_steps_and_round_trips(name, first_stage_checkpoints, tmp_path):
    """Two steps of the variant's paper recipe (batch 1) on two shapes images, the
    second stages (MSc, context) from a first-stage file with the rest frozen; the
    trained model's ``.keras`` file (as train.py writes it) gives the same logits.

    Eagerly: tracing the training step of ResNet-101 takes most of a minute on a CPU
    (graph-mode training: tests/test_msc.py, test_dilation.py, test_training.py)."""
    keras.utils.set_random_seed(0)
    recipe = dataclasses.replace(default_recipe(name, "pascal_voc_2012"), batch_size=1)
    if recipe.freeze_bn:
        # v2 keeps the ImageNet batch norm statistics; those of an untrained ResNet
        # (mean 0, variance 1) let its activations overflow.
        recipe = dataclasses.replace(recipe, freeze_bn=False)
    first = FIRST_STAGES.get(name)
    config = TrainConfig(
        _test_sized(name),
        recipe,
        str(tmp_path),
        init_checkpoint=first and str(first_stage_checkpoints[first]),
        atrous_implementation="dilated",
    )
    model = compile_model(config, num_classes=SPEC.num_classes)
    model.run_eagerly = True
    x, y = _shapes_batch(16 if name.startswith("dilation") else 33)
    trainable = {id(v) for v in model.trainable_variables}
    before = [(v, np.asarray(v)) for v in model.weights]
    history = model.fit(x, y, batch_size=1, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.optimizer.iterations.numpy() == 2
    changed = {id(v) for v, value in before if not np.array_equal(value, np.asarray(v))}
    assert trainable <= changed  # every trained weight moved ...
    if first:  # ... and nothing of the first stage did
        assert changed == trainable
    path = tmp_path / "last.keras"
    save_model_atomic(model, path)
    loaded = keras.models.load_model(path, compile=False)
    assert type(loaded) is type(model) and loaded.name == name
    # The same weights through the same kernels in a newly traced graph: equal up to
    # the last roundings of fused operations (1e-5 of the largest output is 84 eps).
    assert_close_relative(loaded(x), model(x), 1e-5, varies=False)


def test_train_runs_a_v1_recipe_end_to_end(tmp_path):
    """``train()`` with a v1 recipe: logits at the output stride for the loss (labels
    subsampled), validation against full-size labels, prediction images in
    TensorBoard at the image size, checkpoints."""
    data_dir = ensure_shapes_tfrecords(tmp_path / "shapes", num_train=4, num_val=2, image_size=33)
    recipe = dataclasses.replace(
        default_recipe("deeplabv1-largefov", "pascal_voc_2012"),
        dataset="shapes",  # the v1 protocol on shapes images
        train_split="train",
        crop_size=33,
        batch_size=2,
        steps=2,
        checkpoint_every=1,
    )
    variant = dataclasses.replace(get_variant("deeplabv1-largefov"), head_filters=32)
    config = TrainConfig(
        variant,
        recipe,
        str(tmp_path / "run"),
        data_dir=str(data_dir),
        atrous_implementation="dilated",
        verbose=0,
    )
    results = run_training(config)
    assert results["steps"] == 2 and 0 <= results["mean_iou"] <= 1
    assert {"best.keras", "last.keras", "results.json"} <= {
        p.name for p in (tmp_path / "run").iterdir()
    }
