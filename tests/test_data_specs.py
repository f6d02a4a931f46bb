"""Dataset declarations against independent references (official tables, typed here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deeplab_tf.data import specs

# cityscapesScripts helpers/labels.py, typed here: (name, id, trainId, color).
CITYSCAPES_OFFICIAL = [
    ("unlabeled", 0, 255, (0, 0, 0)), ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)), ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)), ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)), ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)), ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)), ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)), ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)), ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)), ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)), ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)), ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)), ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)), ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)), ("truck", 27, 14, (0, 0, 70)), ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)), ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)), ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
]  # fmt: skip


def test_registry_class_counts_and_ignore_label():
    counts = {"pascal_voc_2012": 21, "cityscapes": 19, "pascal_context": 60,
              "pascal_person_part": 7, "ade20k": 150, "shapes": 6}  # fmt: skip
    assert {name: s.num_classes for name, s in specs.SPECS.items()} == counts
    assert all(s.ignore_label == 255 and s.name == name for name, s in specs.SPECS.items())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'voc'.*cityscapes.*pascal_voc_2012"):
        specs.get_spec("voc")


def test_voc_palette_matches_devkit_colours():
    pal = specs.get_spec("pascal_voc_2012").palette()
    # VOCdevkit VOClabelcolormap.m: background, aeroplane, bicycle, person, tvmonitor, void.
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 15: (192, 128, 128),
                20: (0, 64, 128), 255: (224, 224, 192)}  # fmt: skip
    assert {i: tuple(pal[i].tolist()) for i in expected} == expected
    assert specs.get_spec("pascal_voc_2012").hard_class_ids == (2, 9, 11, 16, 18)


def test_cityscapes_label_ids_map_to_official_train_ids():
    spec = specs.get_spec("cityscapes")
    lut = spec.label_lut()
    for _, label_id, train_id, _ in CITYSCAPES_OFFICIAL:
        assert lut[label_id] == train_id
    assert (lut[34:255] == -1).all()  # not labelIds: an error, not a class
    trained = [row for row in CITYSCAPES_OFFICIAL if row[2] != 255]
    assert list(spec.class_names) == [row[0] for row in sorted(trained, key=lambda r: r[2])]
    assert [spec.colors[r[2]] for r in trained] == [r[3] for r in trained]
    raw = np.array([[7, 0, 33], [26, 24, 9]], np.uint8)
    np.testing.assert_array_equal(spec.map_raw_labels(raw), [[0, 255, 18], [13, 11, 255]])


def test_ade20k_zero_is_ignored_and_classes_shift_down():
    spec = specs.get_spec("ade20k")
    raw = np.array([0, 1, 2, 150, 255], np.uint8)
    np.testing.assert_array_equal(spec.map_raw_labels(raw), [255, 0, 1, 149, 255])
    with pytest.raises(ValueError, match=r"label values \[151, 200\]"):
        spec.map_raw_labels(np.array([3, 151, 200], np.uint8))


def test_identity_mapping_reports_out_of_range_values():
    spec = specs.get_spec("pascal_voc_2012")
    np.testing.assert_array_equal(spec.map_raw_labels(np.array([0, 20, 255])), [0, 20, 255])
    with pytest.raises(ValueError, match=r"\[21, 254\].*0\.\.20 or 255"):
        spec.map_raw_labels(np.array([[0, 21], [254, 21]], np.uint8))


def test_custom_json_spec_with_zero_as_ignore(tmp_path):
    path = tmp_path / "cells.json"
    path.write_text(json.dumps({"name": "cells", "class_names": ["bg", "nucleus", "wall"],
                                "ignore_value": 0}))  # fmt: skip
    spec = specs.get_spec(str(path))
    assert spec.num_classes == 3 and spec.colors == tuple(map(tuple, specs.voc_colormap(3)))
    np.testing.assert_array_equal(spec.map_raw_labels(np.array([0, 1, 3, 255])), [255, 0, 2, 255])
    with pytest.raises(ValueError, match=r"\[4\]"):
        spec.map_raw_labels(np.array([4]))


def test_custom_yaml_spec_with_colours_decodes_rgb_masks(tmp_path):
    path = tmp_path / "roads.yaml"
    path.write_text(
        "name: roads\nclass_names: [ground, road]\ncolors: [[10, 20, 30], [200, 0, 0]]\n"
        "ignore_color: [255, 255, 255]\n"
    )
    spec = specs.load_spec(path)
    rgb = np.array([[[10, 20, 30], [200, 0, 0]], [[255, 255, 255], [200, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(spec.colors_to_labels(rgb), [[0, 1], [255, 1]])
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"\(1, 2, 3\) are not colours of 'roads'"):
        spec.colors_to_labels(rgb)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"name": "x", "class_names": ["a"], "colour": []}', "unknown dataset keys"),
        ('{"name": "x", "class_names": ["a", "b"], "colors": [[0, 0, 0]]}', "1 colours for 2"),
        ('{"class_names": ["a"]}', "needs 'name'"),
        ("[1, 2]", "must be a mapping"),
        ("{", "cannot parse"),
    ],
)
def test_custom_spec_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"bad.json: .*{message}"):
        specs.load_spec(path)


def test_missing_declaration_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        specs.get_spec(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("name", sorted(specs.SPECS))
def test_dict_round_trip_through_json(name):
    spec = specs.SPECS[name]
    assert specs.spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
