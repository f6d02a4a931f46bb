import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deeplab_tf import visualize
from deeplab_tf.data.specs import SPECS, spec_from_dict
from deeplab_tf.training.callbacks import PredictionImages

rng = np.random.default_rng(5)


class TestPalettes:
    def test_voc_bit_shift_colours(self):
        """The VOC devkit's colour map: bits of the id spread over R, G, B from the top."""
        colours = visualize.palette(SPECS["pascal_voc_2012"])
        assert colours.shape == (256, 3) and colours.dtype == np.uint8
        expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 8: (64, 0, 0),
                    15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}  # fmt: skip
        for class_id, colour in expected.items():
            assert tuple(colours[class_id]) == colour, class_id

    def test_cityscapes_colours_and_black_ignore(self):
        colours = visualize.palette(SPECS["cityscapes"])
        assert tuple(colours[0]) == (128, 64, 128)  # road
        assert tuple(colours[18]) == (119, 11, 32)  # bicycle
        assert tuple(colours[255]) == (0, 0, 0)

    def test_generated_for_custom_datasets(self):
        """A custom dataset without colours gets the VOC map for its classes, like an
        unknown model (a number of classes): every id its own colour."""
        spec = spec_from_dict({"name": "cells", "class_names": ["bg", "nucleus", "membrane"]})
        colours = visualize.palette(spec)
        np.testing.assert_array_equal(colours[:3], visualize.palette(3)[:3])
        assert len({tuple(c) for c in visualize.palette(None)[:255]}) == 255


def test_colorize_and_indexed_png_round_trip(tmp_path):
    labels = rng.integers(0, 6, (13, 17)).astype(np.uint8)
    labels[0, :5] = 255
    colours = visualize.palette(SPECS["shapes"])
    rgb = visualize.colorize(labels, colours)
    assert rgb.shape == (13, 17, 3) and tuple(rgb[0, 0]) == (224, 224, 192)
    np.testing.assert_array_equal(rgb[3, 4], colours[labels[3, 4]])
    visualize.indexed_png(labels, colours).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as png:
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), labels)  # pixel values are the ids
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), rgb)


def test_overlay_blends_and_leaves_ignore_pixels_clear():
    image = rng.integers(0, 256, (8, 9, 3)).astype(np.uint8)
    labels = rng.integers(0, 3, (8, 9))
    labels[2] = 255
    colours = visualize.palette(3)
    np.testing.assert_array_equal(visualize.overlay(image, labels, colours, alpha=0.0), image)
    full = visualize.overlay(image, labels, colours, alpha=1.0)
    np.testing.assert_array_equal(full[labels != 255], colours[labels[labels != 255]])
    half = visualize.overlay(image, labels, colours, alpha=0.5).astype(int)
    expected = (image.astype(int) + colours[labels % 255]) / 2
    assert np.abs(half - expected)[labels != 255].max() <= 1
    np.testing.assert_array_equal(half[2], image[2])  # ignore row untouched
    with pytest.raises(ValueError, match="alpha must be in"):
        visualize.overlay(image, labels, colours, alpha=1.5)


def test_legend_lists_the_colours_of_the_classes_asked_for():
    names = list(SPECS["shapes"].class_names)
    colours = visualize.palette(SPECS["shapes"])
    full = visualize.legend(names, colours)
    some = visualize.legend(names, colours, classes=[1, 4])
    assert full.shape[0] > some.shape[0] and full.dtype == np.uint8
    present = {tuple(c) for c in some.reshape(-1, 3)}
    assert tuple(colours[1]) in present and tuple(colours[4]) in present
    assert tuple(colours[2]) not in present


def test_panels_place_image_label_and_prediction_side_by_side():
    image = rng.integers(0, 256, (10, 7, 3)).astype(np.uint8)
    label, prediction = rng.integers(0, 4, (2, 10, 7))
    colours = visualize.palette(4)
    panel = visualize.panels(image, [label, prediction], colours, gap=2)
    assert panel.shape == (10, 3 * 7 + 2 * 2, 3)
    np.testing.assert_array_equal(panel[:, :7], image)
    np.testing.assert_array_equal(panel[:, 9:16], colours[label])
    np.testing.assert_array_equal(panel[:, 18:], colours[prediction])
    assert (panel[:, 7:9] == 255).all()


def test_confusion_matrix_image_shades_by_row_fraction():
    confusion = np.array([[90, 10, 0], [0, 0, 0], [5, 5, 40]])
    picture = visualize.confusion_matrix_image(confusion, ["a", "b", "c"])
    assert picture.dtype == np.uint8 and picture.ndim == 3
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    # White (0) to dark blue (1): the 90% and 80% cells have their shades; the empty
    # row (class b) is white, not an error.
    for fraction in (0.9, 0.8, 0.1):
        assert tuple(int(255 - fraction * (255 - c)) for c in (8, 48, 107)) in colours


def test_line_plot_draws_each_series():
    plot = visualize.line_plot([1, 2, 5], {"a": [10, 20, 30], "b": [50, 40, 45]}, "t", "x", "y")
    assert plot.shape == (420, 640, 3)
    colours = {tuple(c) for c in plot.reshape(-1, 3)}
    assert visualize.PLOT_COLOURS[0] in colours and visualize.PLOT_COLOURS[1] in colours


def test_tensorboard_images_are_the_visualize_panels(tmp_path):
    """training.PredictionImages writes image | label | prediction panels from visualize."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(3, 1)])
    images = rng.uniform(0, 255, (2, 12, 10, 3)).astype("float32")
    labels = rng.integers(0, 3, (2, 12, 10))
    colours = visualize.palette(3)
    callback = PredictionImages(tmp_path, images, labels, colours)
    callback.set_model(model)
    callback.on_epoch_end(0)
    predictions = np.asarray(model(images)).argmax(-1)
    written = []
    for event_file in (tmp_path / "images").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                encoded = tf.make_ndarray(value.tensor)[2:]  # width, height, then PNGs
                written += [np.asarray(Image.open(io.BytesIO(png))) for png in encoded]
    assert len(written) == 2
    for image, label, prediction, picture in zip(images, labels, predictions, written, strict=True):
        expected = visualize.panels(image, [label, prediction], colours)
        np.testing.assert_array_equal(picture, expected)
