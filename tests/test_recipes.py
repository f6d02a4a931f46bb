"""Choosing the recipe of a run: from the variant and the data's manifest, never
validating on training images, and saying where each number came from."""

import dataclasses
import math

import pytest

from deeplab_tf import VARIANTS, get_variant
from deeplab_tf.data.sources import VOC_EXPECTED_COUNTS, voc2012_pairs
from deeplab_tf.recipes import (
    _PROTOCOLS,
    RECIPES,
    Recipe,
    choose_recipe,
    default_recipe,
    format_recipe,
    get_recipe,
    paper_recipe,
)
from deeplab_tf.registry import changed
from tests.data_helpers import make_voc_tree


def _manifest(name: str, splits: dict[str, int], size=(375, 500), names=None) -> dict:
    """A manifest as the builders write it (only the keys recipes read)."""
    return {
        "dataset": {"name": name},
        "splits": {
            split: {
                "num_examples": n,
                "max_image_size": list(size),
                "names": (names or {}).get(split, [f"{split}_{i}" for i in range(n)]),
            }
            for split, n in splits.items()
        },
    }


VOC = _manifest("pascal_voc_2012", {"train_aug": 10582, "val": 1449, "trainval": 2913})
CITYSCAPES = _manifest("cityscapes", {"train": 2975, "val": 500}, size=(1024, 2048))


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=list(RECIPES))
def test_no_registered_recipe_validates_on_its_training_images(recipe, tmp_path_factory):
    """Checked against the split lists the VOC builder reads (a VOC/SBD tree in the
    real layout), not against the declaration the recipes use."""
    if recipe.val_split is None:
        return
    if recipe.dataset == "pascal_voc_2012":
        tree = _voc_tree(tmp_path_factory)
        names = {
            split: {p.name for p in voc2012_pairs(tree["voc"], split, tree["sbd"])}
            for split in (recipe.train_split, recipe.val_split)
        }
        assert names[recipe.train_split] and names[recipe.val_split]
        assert not names[recipe.train_split] & names[recipe.val_split]
    else:  # shapes and Cityscapes: separately generated / separately listed folders
        assert recipe.train_split != recipe.val_split
        assert (recipe.dataset, recipe.train_split, recipe.val_split) in {
            ("shapes", "train", "val"),
            ("cityscapes", "train", "val"),
        }


_TREE: dict = {}


def _voc_tree(tmp_path_factory) -> dict:
    if not _TREE:
        import numpy as np

        _TREE.update(make_voc_tree(tmp_path_factory.mktemp("voc"), np.random.default_rng(0)))
    return _TREE


def test_a_recipe_validating_on_training_images_is_refused_when_declared():
    trainaug = get_recipe("v3-voc-trainaug")
    with pytest.raises(ValueError, match=r"validation split 'val' shares images with .*trainval"):
        dataclasses.replace(trainaug, name="bad", train_split="trainval")
    with pytest.raises(ValueError, match="shares images"):
        dataclasses.replace(trainaug, name="bad", train_split="val")
    trainval = get_recipe("v3-voc-trainval-os8")
    assert trainval.val_split is None and "no validation" in trainval.paper


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_recipe_follows_the_manifest(variant):
    """Without --recipe: VOC gives the variant's VOC protocol, Cityscapes its
    Cityscapes protocol where its paper has one, no --data-dir the shapes recipe."""
    voc, voc_sources = choose_recipe(variant, VOC)
    assert voc == default_recipe(variant, "pascal_voc_2012") == paper_recipe(variant)
    assert (
        voc.dataset == "pascal_voc_2012" and voc_sources.pop("dataset") == "manifest of --data-dir"
    )
    assert set(voc_sources.values()) == {f"recipe {voc.name} ({variant} on pascal_voc_2012)"}
    shapes, _ = choose_recipe(variant, None)
    assert shapes.dataset == "shapes" and shapes.name == "shapes-cpu"
    city, sources = choose_recipe(variant, CITYSCAPES)
    assert city.dataset == "cityscapes" and (city.train_split, city.val_split) == ("train", "val")
    expected = {"v3-voc-trainaug": "v3-cityscapes", "v2-voc-resnet101": "v2-cityscapes-resnet101"}
    if voc.name in expected or variant in (
        "deeplabv1-largefov",
        "deeplabv2-vgg16-aspp-s",
        "deeplabv2-vgg16-aspp-l",
    ):
        assert city.name == expected.get(voc.name, "v2-cityscapes")
    else:  # no Cityscapes protocol in the paper (v1, Yu-Koltun): derived from the VOC one
        assert city.name == f"{voc.name}-finetune" and sources["steps"].startswith("derived")


def test_the_protocol_table_names_registered_variants_and_recipes_of_its_datasets():
    for variant, (voc, cityscapes) in _PROTOCOLS.items():
        assert variant in VARIANTS
        assert RECIPES[voc].dataset == "pascal_voc_2012"
        assert cityscapes is None or RECIPES[cityscapes].dataset == "cityscapes"


def test_a_derived_row_keeps_its_base_but_states_its_own_figures():
    base = get_variant("deeplabv3")
    row = changed(base, "deeplabv3-x", "a test row", backbone="resnet50")
    assert base.reference_miou and row.reference_miou == ()
    assert (row.name, row.paper, row.backbone) == ("deeplabv3-x", "a test row", "resnet50")
    assert dataclasses.replace(row, name=base.name, paper=base.paper, backbone=base.backbone,
                               reference_miou=base.reference_miou) == base  # fmt: skip


def test_cityscapes_protocols_are_the_papers():
    v3 = get_recipe("v3-cityscapes")  # v3 appendix C: as VOC but 90K steps, 769 crops
    voc = get_recipe("v3-voc-trainaug")
    assert (v3.steps, v3.crop_size) == (90_000, 769)
    differ = {
        f.name for f in dataclasses.fields(Recipe) if getattr(v3, f.name) != getattr(voc, f.name)
    }
    assert differ == {"name", "paper", "dataset", "train_split", "steps", "crop_size"}


def test_a_custom_dataset_gets_a_fine_tuning_protocol_derived_from_its_data():
    """Steps: the paper's epochs (steps x batch / its 10,582 images) over this dataset's
    images; crop: the largest image side as k x OS + 1 when under the paper's 513."""
    manifest = _manifest("my_parts", {"train": 300, "val": 40}, size=(180, 240))
    recipe, sources = choose_recipe("deeplabv3", manifest)
    paper = get_recipe("v3-voc-trainaug")
    epochs = 30_000 * 16 / VOC_EXPECTED_COUNTS["train_aug"]
    assert recipe.steps == round(epochs * 300 / 16) == 851
    assert recipe.crop_size == 241  # 15 x 16 + 1 >= 240
    assert (recipe.dataset, recipe.train_split, recipe.val_split) == ("my_parts", "train", "val")
    assert recipe.checkpoint_every == math.ceil(851 / 10)
    for name in ("optimizer", "learning_rate", "momentum", "weight_decay", "output_stride"):
        assert getattr(recipe, name) == getattr(paper, name)
        assert sources[name] == "recipe v3-voc-trainaug (deeplabv3's paper protocol)"
    for name in ("steps", "crop_size", "checkpoint_every"):
        assert sources[name].startswith("derived:"), sources[name]
    assert sources["dataset"] == "manifest of --data-dir"
    # v1's step policy assumes its 6000 steps: a derived run decays with poly instead;
    # the classifiers keep the paper's 10x learning rate.
    v1, sources = choose_recipe("deeplabv1-largefov", manifest)
    assert (v1.lr_policy, v1.classifier_lr_multiplier) == ("poly", 10.0)
    assert sources["lr_policy"].startswith("derived")
    assert v1.crop_size == 241  # 30 x 8 + 1


def test_a_derived_recipe_does_not_validate_on_training_images():
    same = _manifest("mine", {"train": 4, "val": 2}, names={"train": list("abcd"), "val": ["a"]})
    recipe, sources = choose_recipe("deeplabv3", same)
    assert recipe.val_split is None and "no validation" in sources["val_split"]
    only_train = _manifest("mine", {"all": 5})
    recipe, sources = choose_recipe("deeplabv3", only_train)
    assert (recipe.train_split, recipe.val_split) == ("all", None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "cityscapes"}, "--dataset cityscapes does not match --data-dir, built from"),
        ({"recipe": "v3-cityscapes"}, "--recipe v3-cityscapes is for cityscapes; --data-dir holds"),
        ({"recipe": "shapes-cpu"}, "--recipe shapes-cpu is for shapes"),
        ({"overrides": {"val_split": "trainval"}}, "shares images with training split"),
    ],
)
def test_flags_that_disagree_with_the_manifest_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        choose_recipe("deeplabv3", VOC, **kwargs)
    assert "\n" not in str(error.value)


def test_without_data_dir_a_voc_recipe_asks_for_one():
    with pytest.raises(ValueError, match="--data-dir is required for dataset 'pascal_voc_2012'"):
        choose_recipe("deeplabv3", None, recipe="v3-voc-trainaug")


def test_the_printed_block_says_where_each_value_came_from():
    recipe, sources = choose_recipe(
        "deeplabv3", VOC, overrides={"steps": 50, "crop_size": 97, "batch_size": None}
    )
    assert (recipe.steps, recipe.crop_size, recipe.batch_size) == (50, 97, 16)
    assert sources["steps"] == "flag --steps" and sources["crop_size"] == "flag --crop-size"
    block = format_recipe(recipe, sources).splitlines()
    assert block[0] == f"recipe v3-voc-trainaug: {recipe.paper}"
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in block[1:]}
    assert rows["steps"] == ["50", "flag --steps"]
    assert rows["learning_rate"] == [
        "0.007",
        "recipe v3-voc-trainaug (deeplabv3 on pascal_voc_2012)",
    ]
    assert set(rows) == {f.name for f in dataclasses.fields(Recipe)} - {"name", "paper"}
