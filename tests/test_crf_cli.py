"""Dense CRF in the CLIs: evaluate.py --crf, predict.py --crf and tune_crf.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
import predict
import tune_crf
from deeplab_tf import crf
from deeplab_tf.crf_tuning import parse_values
from deeplab_tf.data.shapes import ensure_shapes_tfrecords
from deeplab_tf.inference import Predictor
from tests.data_helpers import read_records
from tests.helpers import tiny_model, write_model_dir
from tests.test_evaluate import assert_json_scores, numpy_band
from tests.test_metrics import numpy_confusion, numpy_scores

PARAMS = crf.CRFParams(w1=5, sa=10, sb=20, iterations=5)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return ensure_shapes_tfrecords(root, num_train=1, num_val=3, image_size=48)


@pytest.fixture(scope="module")
def model_dir(shapes_dir, tmp_path_factory) -> Path:
    # Calibrated on the val images: on shapes' smooth textures a noise-calibrated tiny
    # model predicts one class per image, which leaves the CRF nothing to change.
    images = np.stack([r["image"] for r in read_records(shapes_dir, "val")])
    model = tiny_model(6, images=images)
    return write_model_dir(model, tmp_path_factory.mktemp("run") / "run", shapes_dir)


@pytest.fixture(scope="module")
def network(shapes_dir, model_dir):
    """(image uint8, network probabilities, label) of each val image, as the CLIs see them."""
    predictor = Predictor(model_dir)
    return [
        (r["image"], predictor.predict(r["image"]), r["label"].astype(np.int64))
        for r in read_records(shapes_dir, "val")
    ]


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "crf.json"
    PARAMS.save(path)
    return path


def _run(module, capsys, *args):
    code = module.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_evaluate_reports_scores_before_and_after_crf(model_dir, network, params_file, capsys):
    out = model_dir.parent / "eval-crf"
    code, stdout, err = _run(
        evaluate, capsys, "--checkpoint", model_dir, "--output-dir", out, "--quiet",
        "--trimap", "1,3", "--crf-params", params_file, "--crf-backend", "pydensecrf",
        "--crf-workers", "2", "--panels", "2",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    after = results["crf"]
    assert after["params"] == PARAMS.to_dict() and after["backend"] == "pydensecrf"

    # Independent recomputation: the network's argmax, and crf.refine's argmax, each
    # scored by a numpy confusion matrix over all pixels and within the ignore band.
    labels = np.concatenate([label.ravel() for _, _, label in network])
    before = np.concatenate([p.argmax(-1).ravel() for _, p, _ in network])
    refined = np.concatenate(
        [crf.refine(i, p, PARAMS, "pydensecrf").argmax(-1).ravel() for i, p, _ in network]
    )
    assert (refined != before).mean() > 0.02  # the CRF really changed the labels
    for scores, prediction in ((results, before), (after, refined)):
        confusion = numpy_confusion(labels, prediction, 6)
        np.testing.assert_array_equal(scores["confusion_matrix"], confusion)
        assert_json_scores(scores, confusion)
        for width in (1, 3):
            band = np.concatenate([numpy_band(lab == 255, width).ravel() for *_, lab in network])
            band_confusion = numpy_confusion(labels, prediction, 6, weights=band.astype(float))
            assert_json_scores(scores["trimap"]["scores"][str(width)], band_confusion)

    markdown = (out / "results.md").read_text()
    assert "| IoU | IoU + CRF |" in markdown and "mean_iou + CRF" in markdown
    mean_ious = (
        f"| **mean_iou** | {100 * results['mean_iou']:.2f} | {100 * after['mean_iou']:.2f} |"
    )
    assert mean_ious in markdown and mean_ious in stdout
    for name in ("trimap.png", "confusion_matrix.png", "confusion_matrix_crf.png"):
        assert (out / name).is_file()
    panels = sorted((out / "panels").iterdir())
    assert len(panels) == 2
    with Image.open(panels[0]) as panel:  # image | label | prediction | CRF prediction
        assert panel.size == (4 * 48 + 3 * 2, 48)


def test_tune_crf_writes_params_that_evaluate_accepts(model_dir, network, tmp_path, capsys):
    out = tmp_path / "tune"
    args = [
        "--checkpoint", model_dir, "--output-dir", out, "--num-images", "2", "--quiet",
        "--w1", "2,6", "--sa", "5:15:20", "--sb", "10", "--iterations", "3",
        "--crf-backend", "pydensecrf", "--crf-workers", "2", "--top", "3",
    ]  # fmt: skip
    code, stdout, err = _run(tune_crf, capsys, *args)
    assert code == 0, err
    assert "computing the network's probabilities of 2 images" in stdout
    saved = json.loads((out / "crf_params.json").read_text())
    best = crf.CRFParams.load(out / "crf_params.json")
    assert best.iterations == 3 and best.w2 == 3 and best.sg == 3
    assert saved["grid"] == {"w1": [2, 6], "sa": [5, 20], "sb": [10]} and saved["num_images"] == 2
    rounds = [row["round"] for row in saved["results"]]
    assert rounds.count(1) == 4 and rounds.count(2) > 0  # then steps halved around the best
    # The best row's score, recomputed from crf.refine on the first two images.
    labels = np.concatenate([label.ravel() for *_, label in network[:2]])
    refined = np.concatenate(
        [crf.refine(i, p, best, "pydensecrf").argmax(-1).ravel() for i, p, _ in network[:2]]
    )
    expected = numpy_scores(numpy_confusion(labels, refined, 6))["mean_iou"]
    assert saved["mean_iou"] == pytest.approx(expected, abs=1e-12)
    assert saved["mean_iou"] == max(row["mean_iou"] for row in saved["results"])
    assert "CRF search on 2 images (pydensecrf)" in stdout and "rank round" in stdout
    assert (out / "search.md").read_text().count("\n") == 2 + 2 + 3  # fences, 2 heads, 3 rows

    # A rerun reuses the cached probabilities (the network's, for these images).
    cache = out / "probabilities.npz"
    with np.load(cache) as arrays:
        np.testing.assert_array_equal(arrays["image_1"], network[1][0])
        # The CLI ran in this process: the same Predictor, kernels and image, so the
        # same probabilities up to a last rounding (1e-6 is 8 eps at 1); the score
        # above, from labels, therefore matches exactly.
        np.testing.assert_allclose(arrays["probabilities_1"], network[1][1], atol=1e-6)
    stamp = cache.stat().st_mtime_ns
    code, stdout, err = _run(tune_crf, capsys, *args, "--rounds", "1", "--overwrite")
    assert code == 0, err
    assert "reusing the network's probabilities cached in" in stdout
    assert cache.stat().st_mtime_ns == stamp
    assert all(
        row["round"] == 1 for row in json.loads((out / "crf_params.json").read_text())["results"]
    )

    code, _, err = _run(
        evaluate, capsys, "--checkpoint", model_dir, "--output-dir", tmp_path / "eval",
        "--quiet", "--max-images", "1", "--crf-params", out / "crf_params.json",
    )  # fmt: skip
    assert code == 0, err
    evaluation = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluation["crf"]["params"] == crf.CRFParams.load(out / "crf_params.json").to_dict()


def test_predict_writes_crf_refined_masks(model_dir, network, params_file, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for k, (image, *_) in enumerate(network[:2]):
        Image.fromarray(image).save(images / f"{k}.png")
    out = tmp_path / "out"
    code, _, err = _run(
        predict, capsys, images, "--checkpoint", model_dir, "--output-dir", out,
        "--crf-params", params_file, "--crf-backend", "tensorflow", "--save-probabilities",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["crf"] == {"params": PARAMS.to_dict(), "backend": "tensorflow"}
    for k, (image, probabilities, _) in enumerate(network[:2]):
        refined = crf.refine(image, probabilities, PARAMS, "tensorflow")
        with Image.open(out / f"{k}.png") as mask:
            np.testing.assert_array_equal(np.asarray(mask), refined.argmax(-1))
        # In this process: the same network and CRF on the same values, up to the
        # last roundings of the mean field's sums (1e-5 is 84 eps at 1).
        np.testing.assert_allclose(np.load(out / f"{k}_probabilities.npy"), refined, atol=1e-5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read CRF parameters"),
        ("{not json", "cannot read CRF parameters"),
        (json.dumps({"w1": 4, "sigma": 3}), "unknown CRF parameters ['sigma']"),
        (json.dumps({"sa": -1}), "CRF sa must be a finite number > 0"),
        (json.dumps([4, 67, 3]), "must be a JSON object"),
    ],
)
def test_bad_params_file_is_a_one_line_error(model_dir, tmp_path, capsys, content, message):
    path = tmp_path / "crf.json"
    if content is not None:
        path.write_text(content)
    for module, args in (
        (evaluate, ["--output-dir", tmp_path / "eval"]),
        (predict, [tmp_path, "--output-dir", tmp_path / "pred"]),
    ):
        code, _, err = _run(module, capsys, "--checkpoint", model_dir, "--crf-params", path, *args)
        assert code == 2 and len(err.splitlines()) == 1, err
        # One line of at most 200 characters: a long path keeps its last parts.
        assert f"{tmp_path.name}/crf.json" in err and message in err, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "pred").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sa", "30:-10:100"], "--sa: range '30:-10:100' needs a positive step"),
        (["--w1", "3,x"], "--w1 must be numbers or START:STEP:STOP ranges"),
        (["--sb", "0,3"], "CRF sb must be a finite number > 0"),
        (["--num-images", "0"], "--num-images must be positive"),
        (["--rounds", "0"], "--rounds must be positive"),
        (["--split", "test"], "no split 'test'"),
    ],
)
def test_tune_crf_bad_arguments(model_dir, tmp_path, capsys, args, message):
    code, _, err = _run(
        tune_crf, capsys, "--checkpoint", model_dir, "--output-dir", tmp_path / "t", *args
    )
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "t" / "crf_params.json").exists()


def test_tune_crf_keeps_earlier_results_without_overwrite(model_dir, tmp_path, capsys):
    (tmp_path / "crf_params.json").write_text("mine")
    code, _, err = _run(tune_crf, capsys, "--checkpoint", model_dir, "--output-dir", tmp_path)
    assert code == 2 and "pass --overwrite" in err, err
    assert (tmp_path / "crf_params.json").read_text() == "mine"


def test_grid_values_in_the_papers_notation():
    assert parse_values("30:10:100", "--sa") == tuple(range(30, 101, 10))
    assert parse_values("3:6", "--w1") == (3, 4, 5, 6)
    assert parse_values("0.5:0.25:1,4", "--sb") == (0.5, 0.75, 1.0, 4)
