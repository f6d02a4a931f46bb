import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
from deeplab_tf.data.shapes import ensure_shapes_tfrecords
from deeplab_tf.evaluation import Evaluator, trimap_band
from deeplab_tf.evaluation import evaluate as evaluate_split
from deeplab_tf.inference import InferenceError, Predictor
from tests.data_helpers import read_records
from tests.helpers import assert_tree_modes, tiny_model, umask, write_model_dir
from tests.test_metrics import numpy_confusion, numpy_scores

rng = np.random.default_rng(7)


# === numpy references, written from the definitions ===


def numpy_edge_boundary(label):
    """Pixels with a 4-neighbour of another value (both sides of each edge)."""
    h, w = label.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                if 0 <= y + dy < h and 0 <= x + dx < w and label[y + dy, x + dx] != label[y, x]:
                    out[y, x] = True
    return out


def numpy_band(boundary, width):
    """Pixels whose Euclidean distance to some boundary pixel is at most ``width``."""
    ys, xs = np.nonzero(boundary)
    band = np.zeros(boundary.shape, bool)
    if ys.size:
        for y in range(boundary.shape[0]):
            for x in range(boundary.shape[1]):
                band[y, x] = ((ys - y) ** 2 + (xs - x) ** 2).min() <= width**2
    return band


def assert_json_scores(actual, expected_confusion):
    """JSON scores against numpy's from the same integer counts, both float64 (JSON
    writes the repr): a few float64 roundings, far below 1e-10."""
    expected = numpy_scores(expected_confusion)
    for key in ("mean_iou", "pixel_accuracy", "mean_class_accuracy", "frequency_weighted_iou"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-10, err_msg=key)
    per_class = np.array([np.nan if v is None else v for v in actual["per_class_iou"]])
    np.testing.assert_allclose(per_class, expected["per_class_iou"], rtol=1e-10)


def blocky_labels(h, w, c):
    """Random blocks of classes with random ignore pixels (VOC-like and noisy)."""
    label = np.kron(rng.integers(0, c, (h // 5 + 1, w // 5 + 1)), np.ones((5, 5), int))[:h, :w]
    label[rng.random((h, w)) < 0.1] = 255
    return label


# === Scores and trimap bands on random labels ===


@pytest.mark.parametrize("source", ["ignore", "edges"])
def test_scores_and_trimap_match_numpy(source):
    c, widths = 5, (1, 2, 5)
    evaluator = Evaluator(c, widths, source)
    labels, predictions, bands = [], [], {w: [] for w in widths}
    for h, w in [(17, 23), (30, 11), (9, 9)]:
        label = blocky_labels(h, w, c - 1)  # class 4 never labelled ...
        prediction = np.where(rng.random((h, w)) < 0.6, label % 255, rng.integers(0, c, (h, w)))
        prediction[prediction == 3] = 2  # ... and class 3 never predicted
        evaluator.update(label, prediction)
        boundary = label == 255 if source == "ignore" else numpy_edge_boundary(label)
        for width in widths:
            bands[width].append(numpy_band(boundary, width).ravel())
        labels.append(label.ravel())
        predictions.append(prediction.ravel())
    labels, predictions = np.concatenate(labels), np.concatenate(predictions)
    results = evaluator.results()

    confusion = numpy_confusion(labels, predictions, c)
    np.testing.assert_array_equal(results["confusion_matrix"], confusion)
    assert_json_scores(results, confusion)
    trimap = results["trimap"]
    assert trimap["source"] == source and trimap["widths"] == list(widths)
    for width in widths:
        band = np.concatenate(bands[width])
        band_confusion = numpy_confusion(labels, predictions, c, weights=band.astype(float))
        scores = trimap["scores"][str(width)]
        assert_json_scores(scores, band_confusion)
        assert scores["pixels"] == band_confusion.sum()
    pixels = [trimap["scores"][str(w)]["pixels"] for w in widths]
    assert 0 < pixels[0] < confusion.sum() and pixels == sorted(pixels)  # a real band


# === The band definition on hand-made labels ===

IGNORE_PIXEL = np.ones((9, 9), int)
IGNORE_PIXEL[4, 4] = 255

DISK_1 = """
.........
.........
.........
....X....
...XXX...
....X....
.........
.........
.........
"""
DISK_2 = """
.........
.........
....X....
...XXX...
..XXXXX..
...XXX...
....X....
.........
.........
"""
# One pixel of class 1 in class 0: the boundary is that pixel and its four
# neighbours (each has a neighbour of another class); width 1 adds their neighbours.
ONE_PIXEL = np.zeros((7, 7), int)
ONE_PIXEL[3, 3] = 1
PLUS_BAND_1 = """
.......
...X...
..XXX..
.XXXXX.
..XXX..
...X...
.......
"""


def mask(text):
    return np.array([[ch == "X" for ch in row] for row in text.strip().splitlines()])


class TestTrimapBand:
    def test_euclidean_disk_around_an_ignore_pixel(self):
        """Distance is Euclidean between pixel centres: width 1 is the 4-neighbourhood
        (a chessboard distance would give 3x3), width 2 a 13-pixel disk (not 5x5)."""
        np.testing.assert_array_equal(trimap_band(IGNORE_PIXEL, 1, "ignore"), mask(DISK_1))
        np.testing.assert_array_equal(trimap_band(IGNORE_PIXEL, 2, "ignore"), mask(DISK_2))
        # At 2.9 the 5x5 square's corners (sqrt(8) = 2.83) and (+-1, +-2) (sqrt(5)) join.
        assert trimap_band(IGNORE_PIXEL, 2.9, "ignore").sum() == 25

    def test_label_edges(self):
        np.testing.assert_array_equal(trimap_band(ONE_PIXEL, 1, "edges"), mask(PLUS_BAND_1))
        halves = np.zeros((5, 8), int)
        halves[:, 4:] = 2
        for width, columns in [(0, [3, 4]), (1, [2, 3, 4, 5]), (2.5, [1, 2, 3, 4, 5, 6])]:
            expected = np.zeros((5, 8), bool)
            expected[:, columns] = True
            np.testing.assert_array_equal(trimap_band(halves, width, "edges"), expected)

    def test_no_boundary_no_band(self):
        assert not trimap_band(np.ones((4, 4), int), 40, "ignore").any()
        assert not trimap_band(np.ones((4, 4), int), 40, "edges").any()


# === A dataset split, and evaluate.py ===


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return ensure_shapes_tfrecords(root, num_train=1, num_val=4, image_size=48)


@pytest.fixture(scope="module")
def model_dir(shapes_dir, tmp_path_factory) -> Path:
    return write_model_dir(tiny_model(6), tmp_path_factory.mktemp("run") / "run", shapes_dir)


def test_evaluate_split_matches_numpy(shapes_dir, model_dir):
    """Predictions at the label's full size, every image of the split, scores and trimap
    from the ignore band (shapes has one) as the numpy reference computes them."""
    predictor = Predictor(model_dir)
    evaluation = evaluate_split(predictor, shapes_dir, "val", trimap_widths=(2,), progress=False)
    records = read_records(shapes_dir, "val")
    labels = np.concatenate([r["label"].ravel() for r in records])
    predictions = np.concatenate([predictor.predict_labels(r["image"]).ravel() for r in records])
    band = np.concatenate([numpy_band(r["label"] == 255, 2).ravel() for r in records])
    results = evaluation.results
    assert results["num_images"] == 4 and results["trimap"]["source"] == "ignore"
    np.testing.assert_array_equal(
        results["confusion_matrix"], numpy_confusion(labels, predictions, 6)
    )
    assert results["trimap"]["scores"]["2"]["pixels"] == (band & (labels != 255)).sum()


class TestEvaluateCli:
    def test_writes_results_tables_and_pictures(self, model_dir, tmp_path, capsys):
        out = tmp_path / "eval"
        with umask(0o022):
            code = evaluate.main(
                ["--checkpoint", str(model_dir), "--output-dir", str(out), "--output-stride",
                 "8", "--scales", "0.75,1", "--flip", "--trimap", "1,2,5", "--panels", "2"]
            )  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert_tree_modes(out)  # what mkdir and open give under umask 022
        results = json.loads((out / "results.json").read_text())
        assert results["inference"]["output_stride"] == 8
        assert results["inference"]["scales"] == [0.75, 1.0] and results["inference"]["flip"]
        assert results["num_images"] == 4 and len(results["class_names"]) == 6
        assert list(results["trimap"]["scores"]) == ["1", "2", "5"]
        pixels = [results["trimap"]["scores"][w]["pixels"] for w in ("1", "2", "5")]
        assert pixels == sorted(pixels) and pixels[0] > 0  # wider bands hold more pixels
        assert "| **mean_iou** |" in captured.out and "| band width (px) |" in captured.out
        assert (out / "results.md").read_text().strip() in captured.out
        assert " left " in captured.out  # progress lines (not a terminal: plain lines)
        for name in ("confusion_matrix.png", "trimap.png", "panels/0000.png", "panels/0001.png"):
            with Image.open(out / name) as picture:
                assert picture.mode == "RGB" and min(picture.size) > 40
        with Image.open(out / "panels" / "0000.png") as panel:
            assert panel.size == (3 * 48 + 2 * 2, 48)  # image | label | prediction

    def test_existing_output_dir_is_left_alone(self, model_dir, tmp_path, capsys):
        out = tmp_path / "eval"
        out.mkdir()
        (out / "results.json").write_text("mine")
        code = evaluate.main(["--checkpoint", str(model_dir), "--output-dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "pass --overwrite" in err, err
        assert [p.name for p in out.iterdir()] == ["results.json"]
        assert (out / "results.json").read_text() == "mine"

    def test_checkpoint_for_other_classes(self, shapes_dir, tmp_path, capsys):
        run = write_model_dir(tiny_model(4), tmp_path / "run4", shapes_dir)
        code = evaluate.main(["--checkpoint", str(run), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "predicts 4 classes but dataset 'shapes'" in err and "has 6" in err
        assert not (run / "eval-val").exists()

    @pytest.mark.parametrize(
        "args, message",
        [
            (["--trimap", "1,x"], "--trimap must be comma-separated integers"),
            (["--scales", "1,-0.5"], "--scales must be positive"),
            (["--split", "test"], "no split 'test'"),
        ],
    )
    def test_bad_arguments(self, model_dir, tmp_path, capsys, args, message):
        code = evaluate.main(
            ["--checkpoint", str(model_dir), "--output-dir", str(tmp_path / "e"), *args]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err

    def test_checkpoint_without_data(self, tmp_path, capsys):
        (tmp_path / "run").mkdir()
        tiny_model(6).save(tmp_path / "run" / "model.keras")
        code = evaluate.main(["--checkpoint", str(tmp_path / "run" / "model.keras")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "--data-dir is required" in err, err
        code = evaluate.main(["--checkpoint", str(tmp_path / "nothing")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "no such file or directory" in err, err


def test_predictor_settings_are_checked_before_the_data(model_dir):
    with pytest.raises(InferenceError, match="trimap source must be one of"):
        evaluate_split(Predictor(model_dir), "unused", trimap_source="diagonal")
