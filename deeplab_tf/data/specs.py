"""Dataset declarations: classes, colours, ignore label, raw-label mapping and splits.

Every dataset is one frozen :class:`DatasetSpec` in the explicit ``SPECS`` dict. A
user-defined dataset is a small JSON or YAML file read by :func:`load_spec`::

    name: my_cells
    class_names: [background, nucleus, membrane]
    colors: [[0, 0, 0], [255, 0, 0], [0, 255, 0]]   # optional (VOC colour map otherwise)
    ignore_value: 255                               # optional: raw value meaning "ignore"
    splits: [train, val]                            # optional

Raw label values are mapped to class ids before anything is written: the raw value
``ignore_value`` (and always 255) becomes the ignore label 255, and the raw values of
the classes are the remaining values in increasing order. With ``ignore_value: 0``
(ADE20K's "other") raw 1..N become classes 0..N-1, so no ignore pixel is ever trained
as a class. Datasets with an irregular mapping (Cityscapes labelIds) give it
explicitly in ``raw_to_class``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_LABEL = 255
Color = tuple[int, int, int]


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (uint8 [n, 3]): bits of the index spread over R, G, B.

    Index 255 is (224, 224, 192), the colour of VOC's ignore band.
    """
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A segmentation dataset's label space.

    Args:
        name: registry name, also written into TFRecord manifests.
        class_names: one name per class id 0..N-1.
        colors: one RGB colour per class (palette PNGs, RGB masks, overlays).
        splits: split names the builders produce.
        ignore_value: the raw label value that means "ignore" (mapped to 255).
        raw_to_class: explicit (raw value, class id or 255) pairs; overrides the
            ``ignore_value`` rule when given (Cityscapes labelId -> trainId).
        ignore_color: colour of the ignore label in palettes and RGB masks.
        hard_classes: classes duplicated by v3 bootstrapping (v3 paper, section 4.1).
        void_boundaries: the annotations carry a band of ignore label along object
            boundaries (VOC); boundary ("trimap") scores measure from that band.
        reference: where the class list and colours come from.
    """

    name: str
    class_names: tuple[str, ...]
    colors: tuple[Color, ...]
    splits: tuple[str, ...] = ("train", "val")
    ignore_value: int = IGNORE_LABEL
    raw_to_class: tuple[tuple[int, int], ...] | None = None
    ignore_color: Color = (224, 224, 192)
    hard_classes: tuple[str, ...] = ()
    void_boundaries: bool = False
    reference: str = ""

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if not 1 <= n <= IGNORE_LABEL:
            raise ValueError(f"dataset {self.name!r}: {n} classes; need 1..255 (255 is ignore)")
        if len(self.colors) != n:
            raise ValueError(f"dataset {self.name!r}: {len(self.colors)} colours for {n} classes")
        if len(set(self.class_names)) != n:
            raise ValueError(f"dataset {self.name!r}: class names are not unique")
        if not 0 <= self.ignore_value <= 255:
            raise ValueError(f"dataset {self.name!r}: ignore_value must be in 0..255")
        unknown = sorted(set(self.hard_classes) - set(self.class_names))
        if unknown:
            raise ValueError(f"dataset {self.name!r}: hard classes {unknown} are not classes")
        for raw, cls in self.raw_to_class or ():
            if not (0 <= raw <= 255 and (0 <= cls < n or cls == IGNORE_LABEL)):
                raise ValueError(f"dataset {self.name!r}: bad raw_to_class pair ({raw}, {cls})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ignore_label(self) -> int:
        return IGNORE_LABEL

    @property
    def hard_class_ids(self) -> tuple[int, ...]:
        return tuple(self.class_names.index(c) for c in self.hard_classes)

    def label_lut(self) -> np.ndarray:
        """int16 [256] lookup raw value -> class id, 255 for ignore, -1 for invalid."""
        lut = np.full(256, -1, np.int16)
        if self.raw_to_class is not None:
            for raw, cls in self.raw_to_class:
                lut[raw] = cls
        else:
            for raw in range(256):
                cls = raw if raw < self.ignore_value else raw - 1
                lut[raw] = cls if cls < self.num_classes else -1
            lut[self.ignore_value] = IGNORE_LABEL
        lut[IGNORE_LABEL] = IGNORE_LABEL
        return lut

    def map_raw_labels(self, raw: np.ndarray) -> np.ndarray:
        """Maps a raw label array to class ids (uint8, 255 = ignore).

        Raises:
            ValueError: naming the raw values that are neither a class nor ignore.
        """
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            bad = np.unique(raw[(raw < 0) | (raw > 255)])
            if bad.size:
                raise ValueError(self._bad_values_message(bad))
            raw = raw.astype(np.uint8)
        mapped = self.label_lut()[raw]
        if (mapped < 0).any():
            raise ValueError(self._bad_values_message(np.unique(raw[mapped < 0])))
        return mapped.astype(np.uint8)

    def _bad_values_message(self, bad: np.ndarray) -> str:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        return (
            f"label values [{shown}] are not classes of {self.name!r} "
            f"(expected 0..{self.num_classes - 1} or 255 after mapping)"
        )

    def palette(self) -> np.ndarray:
        """uint8 [256, 3] palette: class colours, ``ignore_color`` at 255, VOC map elsewhere."""
        pal = voc_colormap(256)
        pal[: self.num_classes] = self.colors
        pal[IGNORE_LABEL] = self.ignore_color
        return pal

    def colors_to_labels(self, rgb: np.ndarray) -> np.ndarray:
        """Maps an RGB colour mask [H, W, 3] back to class ids through ``colors``.

        The ignore colour maps to 255. Raises ValueError naming unknown colours.
        """
        table = {tuple(int(v) for v in c): i for i, c in enumerate(self.colors)}
        if len(table) != self.num_classes:
            raise ValueError(f"dataset {self.name!r} has repeated colours; RGB masks are ambiguous")
        if tuple(self.ignore_color) in table:
            raise ValueError(f"dataset {self.name!r}: the ignore colour is also a class colour")
        table[tuple(self.ignore_color)] = IGNORE_LABEL
        rgb = np.asarray(rgb, np.uint8)
        keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8)
        keys |= rgb[..., 2]
        uniq, inverse = np.unique(keys, return_inverse=True)
        colours = [((k >> 16) & 255, (k >> 8) & 255, k & 255) for k in uniq.tolist()]
        unknown = [c for c in colours if c not in table]
        if unknown:
            shown = ", ".join(str(c) for c in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise ValueError(f"mask colours {shown} are not colours of {self.name!r}")
        values = np.array([table[c] for c in colours], np.uint8)
        return values[inverse.reshape(keys.shape)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :func:`spec_from_dict` inverts it (manifests embed it)."""
        # Through JSON so nested tuples become lists and a round trip compares equal.
        return json.loads(json.dumps(dataclasses.asdict(self)))


def spec_from_dict(d: Mapping[str, Any]) -> DatasetSpec:
    """Builds a spec from the custom-dataset format; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown dataset keys {unknown}; allowed: {sorted(fields)}")
    for key in ("name", "class_names"):
        if key not in d:
            raise ValueError(f"dataset declaration needs {key!r}")
    names = tuple(str(c) for c in d["class_names"])
    colors = d.get("colors")
    if colors is None:
        colors = voc_colormap(len(names)).tolist()
    kwargs: dict[str, Any] = dict(d)
    kwargs.update(
        class_names=names,
        colors=tuple(_color(c) for c in colors),
        splits=tuple(d.get("splits", ("train", "val"))),
        hard_classes=tuple(d.get("hard_classes", ())),
        ignore_color=_color(d.get("ignore_color", (224, 224, 192))),
    )
    if d.get("raw_to_class") is not None:
        kwargs["raw_to_class"] = tuple((int(r), int(c)) for r, c in d["raw_to_class"])
    return DatasetSpec(**kwargs)


def _color(c: Sequence[int]) -> Color:
    if len(c) != 3 or not all(0 <= int(v) <= 255 for v in c):
        raise ValueError(f"colour {list(c)} is not an RGB triple in 0..255")
    return (int(c[0]), int(c[1]), int(c[2]))


def load_spec(path: str | Path) -> DatasetSpec:
    """Reads a custom dataset declaration from a ``.json``, ``.yaml`` or ``.yml`` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: dataset declaration file does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # only custom YAML declarations need it

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        # The parser's own position ("line 3, column 5") without its multi-line context.
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ValueError(f"{path}: cannot parse dataset declaration ({where}{problem})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: dataset declaration must be a mapping")
    try:
        return spec_from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def get_spec(name_or_path: str | Path | DatasetSpec) -> DatasetSpec:
    """Returns a registered spec by name, or loads a JSON/YAML declaration file."""
    if isinstance(name_or_path, DatasetSpec):
        return name_or_path
    key = str(name_or_path)
    if key in SPECS:
        return SPECS[key]
    if Path(key).suffix.lower() in (".json", ".yaml", ".yml"):
        return load_spec(key)
    raise ValueError(
        f"unknown dataset {key!r}; known: {', '.join(sorted(SPECS))} (or a .json/.yaml file)"
    )


# === Declarations ===

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# cityscapesScripts helpers/labels.py: (labelId, trainId) for labelIds 0..33; trainId 255
# is ignored in training and evaluation ('license plate', id -1, never appears in PNGs).
CITYSCAPES_LABELID_TO_TRAINID = (
    (0, 255), (1, 255), (2, 255), (3, 255), (4, 255), (5, 255), (6, 255), (7, 0), (8, 1),
    (9, 255), (10, 255), (11, 2), (12, 3), (13, 4), (14, 255), (15, 255), (16, 255), (17, 5),
    (18, 255), (19, 6), (20, 7), (21, 8), (22, 9), (23, 10), (24, 11), (25, 12), (26, 13),
    (27, 14), (28, 15), (29, 255), (30, 255), (31, 16), (32, 17), (33, 18),
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# PASCAL-Context, 59 most frequent classes + background (v2 paper, section 4.2).
PASCAL_CONTEXT_CLASSES = (
    *VOC_CLASSES[:11], "table", *VOC_CLASSES[12:], "bag", "bed", "bench", "book",
    "building", "cabinet", "ceiling", "cloth", "computer", "cup", "door", "fence", "floor",
    "flower", "food", "grass", "ground", "keyboard", "light", "mountain", "mouse", "curtain",
    "platform", "sign", "plate", "road", "rock", "shelves", "sidewalk", "sky", "snow",
    "bedclothes", "track", "tree", "truck", "wall", "water", "window", "wood",
)  # fmt: skip

PASCAL_PERSON_PART_CLASSES = (
    "background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg",
)  # fmt: skip

# ADE20K SceneParsing (150 classes); raw 0 is "other" and is ignored.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

SHAPES_CLASSES = ("background", "disk", "square", "triangle", "ring", "cross")


def _voc_colors(n: int) -> tuple[Color, ...]:
    return tuple(tuple(int(v) for v in c) for c in voc_colormap(n))  # type: ignore[misc]


SPECS: dict[str, DatasetSpec] = {
    "pascal_voc_2012": DatasetSpec(
        name="pascal_voc_2012",
        class_names=VOC_CLASSES,
        colors=_voc_colors(21),
        splits=("train", "val", "trainval", "train_aug"),
        hard_classes=("bicycle", "chair", "diningtable", "pottedplant", "sofa"),
        void_boundaries=True,
        reference="PASCAL VOC 2012 devkit; v1/v2/v3 papers; hard classes: v3 section 4.1",
    ),
    "cityscapes": DatasetSpec(
        name="cityscapes",
        class_names=CITYSCAPES_CLASSES,
        colors=CITYSCAPES_COLORS,
        splits=("train", "val", "test", "train_extra"),
        raw_to_class=CITYSCAPES_LABELID_TO_TRAINID,
        ignore_color=(0, 0, 0),
        reference="cityscapesScripts helpers/labels.py (labelIds -> trainIds); v2 section 4.4",
    ),
    "pascal_context": DatasetSpec(
        name="pascal_context",
        class_names=PASCAL_CONTEXT_CLASSES,
        colors=_voc_colors(60),
        reference="Mottaghi et al. CVPR 2014, 59 classes + background; v2 section 4.2",
    ),
    "pascal_person_part": DatasetSpec(
        name="pascal_person_part",
        class_names=PASCAL_PERSON_PART_CLASSES,
        colors=_voc_colors(7),
        reference="Chen et al. CVPR 2014 (person parts merged to 6 + background); v2 section 4.3",
    ),
    "ade20k": DatasetSpec(
        name="ade20k",
        class_names=ADE20K_CLASSES,
        # VOC colour map shifted by one so that black stays the "other"/ignore colour.
        colors=_voc_colors(151)[1:],
        ignore_value=0,
        ignore_color=(0, 0, 0),
        reference="ADE20K SceneParsing benchmark (150 classes; raw 0 'other' is ignored)",
    ),
    "shapes": DatasetSpec(
        name="shapes",
        class_names=SHAPES_CLASSES,
        colors=_voc_colors(6),
        void_boundaries=True,
        reference="built-in synthetic dataset, deeplab_tf.data.shapes",
    ),
}
