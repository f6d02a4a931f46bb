"""Dense CRF: both backends against each other and against numpy references."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from deeplab_tf import crf
from deeplab_tf.crf import pydensecrf_backend
from deeplab_tf.crf.mean_field import refine_tensorflow_many
from tests.tolerances import assert_refinements_agree, sum_rtol, sum_to_one_atol

BACKENDS = ("pydensecrf", "tensorflow")


def disc_case(seed: int, h: int = 48, w: int = 64, blur: float = 6.0, contrast: float = 100.0):
    """A sharp two-colour image of a disc, its labels, and "network" probabilities that
    are the labels blurred (as by a coarse-stride network) and not confident."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)
    labels = ((rows - cy) ** 2 + (cols - cx) ** 2 < 14**2).astype(np.int64)
    background = np.array([100.0, 80.0, 70.0])
    colours = np.where(labels[..., None] == 1, background + contrast, background)
    image = np.clip(colours + rng.normal(0, 3, colours.shape), 0, 255).astype(np.uint8)
    foreground = 0.1 + 0.8 * np.clip(ndimage.gaussian_filter(labels.astype(float), blur), 0, 1)
    probabilities = np.stack([1 - foreground, foreground], axis=-1).astype(np.float32)
    return image, probabilities, labels


def shapes_case(seed: int, h: int = 40, w: int = 56, num_classes: int = 5):
    """Several classes: random boxes of random colours, noisy softmax probabilities."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.int64)
    image = np.full((h, w, 3), 128.0)
    for cls in range(1, num_classes):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        dy, dx = rng.integers(8, 20, size=2)
        labels[y : y + dy, x : x + dx] = cls
        image[y : y + dy, x : x + dx] = rng.integers(0, 256, 3)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    logits = ndimage.gaussian_filter(np.eye(num_classes)[labels] * 4, (3, 3, 0))
    logits += rng.normal(0, 0.5, logits.shape)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return image, probabilities.astype(np.float32), labels


def foreground_iou(prediction: np.ndarray, labels: np.ndarray) -> float:
    return float(
        ((prediction == 1) & (labels == 1)).sum() / ((prediction == 1) | (labels == 1)).sum()
    )


def confusion(labels: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels.ravel(), prediction.ravel()), 1)
    return matrix


def mean_iou(matrix: np.ndarray) -> float:
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def exact_gaussian_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """D^-1/2 K D^-1/2 v with K_ij = exp(-|f_i - f_j|^2 / 2), by brute force."""
    kernel = np.exp(-0.5 * ((features[:, None] - features[None]) ** 2).sum(-1))
    norm = 1 / np.sqrt(kernel.sum(1))
    return norm[:, None] * (kernel @ (norm[:, None] * values))


# === Behaviour of the CRF ===


@pytest.mark.parametrize("backend", BACKENDS)
def test_restores_sharp_boundary_of_blurred_probabilities(backend):
    for seed in range(2):
        image, probabilities, labels = disc_case(seed)
        before = foreground_iou(probabilities.argmax(-1), labels)
        after = foreground_iou(crf.refine(image, probabilities, backend=backend).argmax(-1), labels)
        assert before < 0.85  # the blur really displaced the boundary
        assert after > 0.97
        assert after - before > 0.15


def test_backends_agree():
    cases = [disc_case(seed) for seed in range(2)] + [shapes_case(seed) for seed in range(2)]
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (1, 5), (3, 2)):  # degenerate sizes: lattices of a few points
        probabilities = rng.dirichlet(np.ones(3), (h, w)).astype(np.float32)
        cases.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), probabilities, None))
    for params in (crf.CRFParams(), crf.CRFParams(w1=6, sa=30, sb=5, iterations=5)):
        for image, probabilities, _ in cases:
            reference = crf.refine(image, probabilities, params, backend="pydensecrf")
            ours = crf.refine(image, probabilities, params, backend="tensorflow")
            # The TensorFlow lattice is the reference's lattice: only the order of its
            # float32 sums differs, each over at most all the image's pixels.
            assert_refinements_agree(ours, reference, sum_rtol(image.shape[0] * image.shape[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_iterations_return_the_input_argmax(backend):
    image, probabilities, _ = shapes_case(0)
    q = crf.refine(image, probabilities, crf.CRFParams(iterations=0), backend=backend)
    np.testing.assert_array_equal(q.argmax(-1), probabilities.argmax(-1))
    floored = np.maximum(probabilities, crf.PROBABILITY_FLOOR)
    # A float32 normalisation (a few-term sum, one division) at values <= 1: a few eps.
    np.testing.assert_allclose(q, floored / floored.sum(-1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_probabilities_stay_normalised(backend):
    image, probabilities, _ = shapes_case(1)
    image.flags.writeable = False  # as np.asarray(PIL image) gives
    q = crf.refine(image, probabilities, backend=backend)
    assert q.dtype == np.float32 and q.shape == probabilities.shape
    assert q.min() >= 0
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=sum_to_one_atol(q.shape[-1]))


@pytest.mark.parametrize(
    ("image", "probabilities", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), np.full((8, 8, 2), 0.5), "uint8 RGB"),
        (np.zeros((8, 8), np.uint8), np.full((8, 8, 2), 0.5), "uint8 RGB"),
        (np.zeros((8, 8, 4), np.uint8), np.full((8, 8, 2), 0.5), "uint8 RGB"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 9, 2), 0.5), "8x9 but the image is 8x8"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 0.5), r"\[H, W, C\]"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 2), 3.0), "sum to 1"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 2), [1.5, -0.5]), ">= 0"),
        (np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 2), np.int64), "floating point"),
    ],
)
def test_bad_inputs_raise_clear_errors(image, probabilities, message):
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=message):
            crf.refine(image, probabilities, backend=backend)


def test_tiny_sigmas_that_overflow_the_lattice_raise_a_clear_error():
    image, probabilities, _ = shapes_case(0, h=20, w=20)
    with pytest.raises(ValueError, match="too small for this image"):
        crf.refine(image, probabilities, crf.CRFParams(sa=0.001, sb=0.0005), "tensorflow")


def test_params_validation_and_json_round_trip(tmp_path):
    params = crf.CRFParams(w1=5, sa=80, sb=4, iterations=7)
    params.save(tmp_path / "crf.json")
    assert crf.CRFParams.load(tmp_path / "crf.json") == params
    assert json.loads((tmp_path / "crf.json").read_text())["sa"] == 80.0
    (tmp_path / "bad.json").write_text(json.dumps({"w1": 4, "sigma": 3}))
    with pytest.raises(ValueError, match="unknown CRF parameters"):
        crf.CRFParams.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        crf.CRFParams.load(tmp_path / "missing.json")
    for bad in ({"sa": 0}, {"w1": -1}, {"iterations": 2.5}, {"sb": float("nan")}):
        with pytest.raises(ValueError, match="CRF"):
            crf.CRFParams(**bad)


def test_missing_pydensecrf_falls_back_to_tensorflow_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(pydensecrf_backend, "pydensecrf_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="deeplab_tf.crf"):
        assert crf.resolve_backend("auto") == "tensorflow"
        assert crf.resolve_backend("pydensecrf") == "tensorflow"
    assert "pydensecrf2 is not installed" in caplog.text
    assert crf.resolve_backend("tensorflow") == "tensorflow"
    with pytest.raises(ValueError, match="unknown CRF backend"):
        crf.resolve_backend("cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_many_in_parallel_workers_matches_refine(backend):
    # Processes for pydensecrf, threads for TensorFlow (concurrent calls of one graph).
    cases = [shapes_case(0), disc_case(1), shapes_case(2, h=24, w=30), shapes_case(3)]
    images, probabilities, _ = zip(*cases, strict=True)
    refined = crf.refine_many(images, probabilities, backend=backend, workers=3)
    assert len(refined) == len(cases)
    for (image, probs, _), q in zip(cases, refined, strict=True):
        # The same function on the same values in a worker: the same kernels, the same
        # sums, up to a last rounding of probabilities <= 1.
        np.testing.assert_allclose(q, crf.refine(image, probs, backend=backend), atol=1e-6)


# === The TensorFlow backend ===


def test_lattices_shared_by_parameter_sets_of_the_same_widths():
    """``refine_tensorflow_many`` builds the lattices once for parameter sets that
    share sa, sb and sg: each set's result is its own refinement's (the same ops on the
    same values, so equal), and sets of other widths are refused."""
    image, probabilities, _ = shapes_case(4)
    params = [crf.CRFParams(w1=3), crf.CRFParams(w1=5, w2=1), crf.CRFParams(iterations=2)]
    shared = refine_tensorflow_many(image, probabilities, params)
    for p, q in zip(params, shared, strict=True):
        np.testing.assert_array_equal(q, crf.refine(image, probabilities, p, "tensorflow"))
    assert np.abs(shared[0] - shared[1]).max() > 1e-3  # the weights did change it
    with pytest.raises(ValueError, match="must share sa, sb, sg"):
        refine_tensorflow_many(image, probabilities, [crf.CRFParams(), crf.CRFParams(sa=60)])


def test_permutohedral_filter_approximates_the_exact_bilateral_filter():
    # A 12x16 image with smooth colours and an edge; bilateral features as in the CRF.
    rng = np.random.default_rng(0)
    h, w = 12, 16
    colours = ndimage.gaussian_filter(rng.uniform(0, 255, (h, w, 3)), (1.5, 1.5, 0)) * 3
    colours[:, w // 2 :] += 60
    rows, cols = np.mgrid[0:h, 0:w]
    values = rng.random((h * w, 3))
    for sa, sb in ((2.0, 10.0), (3.0, 5.0), (4.0, 20.0), (3.0, 30.0)):
        features = np.concatenate([np.stack([cols, rows], -1) / sa, colours / sb], -1)
        features = features.reshape(-1, 5)
        exact = exact_gaussian_filter(features, values)
        lattice = crf.permutohedral_filter(features.astype("f4"), values.astype("f4")).numpy()
        error = np.linalg.norm(lattice - exact) / np.linalg.norm(exact)
        # Measured 4.6-8.7 % of the response (the reference lattice's kernel is a little
        # narrower than the nominal Gaussian) ...
        assert error < 0.12, (sa, sb, error)
        # ... while a position-only filter, blind to colour, misses nearly all of the
        # response's variation (85-99 %; the lattice 10-35 %).
        spread = np.linalg.norm(exact - exact.mean(0))
        spatial_only = exact_gaussian_filter(features[:, :2], values)
        assert np.linalg.norm(spatial_only - exact) > 0.8 * spread
        assert np.linalg.norm(lattice - exact) < 0.4 * spread


def test_batch_equals_single_images_and_saved_model_round_trip(tmp_path):
    cases = [shapes_case(seed) for seed in range(2)]
    images = np.stack([c[0] for c in cases])
    probabilities = np.stack([c[1] for c in cases])
    params = crf.CRFParams(iterations=5)
    batched = crf.crf_tensorflow(images, probabilities, params).numpy()
    # A batch's lattice holds both images' vertices: each vertex's splat sums the same
    # terms in another order (at most all pixels of a batch).
    bound = sum_rtol(images[:1].size // 3 * 2)
    for k in range(2):  # images of a batch do not leak into each other's lattice
        single = crf.refine(images[k], probabilities[k], params, backend="tensorflow")
        assert_refinements_agree(batched[k], single, bound)

    module = tf.Module()
    module.refine = tf.function(
        lambda images, probabilities: crf.crf_tensorflow(images, probabilities, params),
        input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8),
            tf.TensorSpec([None, None, None, 5], tf.float32),
        ],
    )
    tf.saved_model.save(module, str(tmp_path / "crf"))
    loaded = tf.saved_model.load(str(tmp_path / "crf"))
    assert_refinements_agree(loaded.refine(images, probabilities).numpy(), batched, bound)


# === Parameter search ===


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_finds_the_known_best_parameters(backend):
    # Low colour contrast and a wide blur: only a strong (w1 = 5), long-range (sa = 50),
    # colour-selective (sb = 3) bilateral kernel restores the discs completely. The
    # TensorFlow search refines each image once per (sa, sb) for all w1; the rows are
    # checked against refinements one parameter set at a time.
    cases = [disc_case(seed, blur=6.0, contrast=30.0) for seed in range(2)]
    images, probabilities, labels = zip(*cases, strict=True)
    grid = crf.SearchGrid(w1=(1, 5), sa=(5, 50), sb=(3, 100))
    ticks = []
    result = crf.search_params(
        images,
        probabilities,
        labels,
        num_classes=2,
        grid=grid,
        rounds=1,
        backend=backend,
        workers=2,
        progress=lambda done, total: ticks.append((done, total)),
    )
    assert result.best == crf.CRFParams(w1=5, sa=50, sb=3)
    assert ticks[0] == (0, 16) and ticks[-1] == (16, 16)
    assert len(result.rows) == 8
    assert [r["mean_iou"] for r in result.rows] == sorted(
        (r["mean_iou"] for r in result.rows), reverse=True
    )
    # Every row against an independent evaluation: refine, then a numpy confusion matrix.
    for row in result.rows:
        params = crf.CRFParams(w1=row["w1"], sa=row["sa"], sb=row["sb"])
        total = sum(
            confusion(lab, crf.refine(img, p, params, backend).argmax(-1), 2)
            for img, p, lab in cases
        )
        assert row["mean_iou"] == pytest.approx(mean_iou(total), abs=1e-12)
    baseline = sum(confusion(lab, p.argmax(-1), 2) for _, p, lab in cases)
    assert result.baseline_mean_iou == pytest.approx(mean_iou(baseline), abs=1e-12)
    assert result.best_mean_iou > result.baseline_mean_iou + 0.1
    table = crf.format_results_table(result, top=3)
    assert len(table.splitlines()) == 5 and "     5      50      3" in table


def test_search_refines_around_the_best_and_writes_loadable_json(tmp_path):
    coarse = crf.SearchGrid()
    assert (
        coarse.sa == (30, 40, 50, 60, 70, 80, 90, 100)
        and len(coarse.combinations(crf.CRFParams())) == 128
    )
    fine = coarse.around(crf.CRFParams(w1=4, sa=70, sb=3))
    assert fine == crf.SearchGrid(w1=(3.5, 4, 4.5), sa=(65, 70, 75), sb=(2.5, 3, 3.5))
    assert crf.SearchGrid(w1=(4,), sa=(5, 9), sb=(1, 3)).around(
        crf.CRFParams(w1=4, sa=5, sb=1)
    ) == crf.SearchGrid(w1=(4,), sa=(3, 5, 7), sb=(1, 2))  # sb 0 dropped: sigmas stay > 0

    image, probabilities, labels = disc_case(0, h=24, w=32)
    result = crf.search_params(
        [image],
        [probabilities],
        [labels],
        num_classes=2,
        grid=crf.SearchGrid(w1=(2, 4), sa=(10, 20), sb=(3,)),
        base=crf.CRFParams(iterations=3),
        rounds=2,
        backend="tensorflow",
    )
    first = result.rows[0]
    assert result.best == crf.CRFParams(
        w1=first["w1"], sa=first["sa"], sb=first["sb"], iterations=3
    )
    second_round = [r for r in result.rows if r["round"] == 2]
    assert second_round and len(result.rows) == 4 + len(second_round)
    crf.write_search_result(tmp_path / "best.json", result)
    assert crf.CRFParams.load(tmp_path / "best.json") == result.best
    saved = json.loads((tmp_path / "best.json").read_text())
    assert saved["results"][0] == dataclasses.asdict(result)["rows"][0]
