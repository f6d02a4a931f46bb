import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf.metrics import MeanIoU, confusion_matrix, confusion_matrix_scores
from tests.test_losses import assert_init_args_in_config, numpy_bilinear_aligned, random_labels

rng = np.random.default_rng(1)


# === numpy reference ===


def numpy_confusion(labels, predictions, num_classes, weights=None, ignore=255):
    """M[t, p] = number (or weight) of pixels with label t predicted p, ignoring 255."""
    m = np.zeros((num_classes, num_classes))
    w = np.ones(labels.shape) if weights is None else np.broadcast_to(weights, labels.shape)
    for t, p, wt in zip(labels.ravel(), predictions.ravel(), w.ravel(), strict=True):
        if t != ignore:
            m[t, p] += wt
    return m


def test_numpy_confusion_matrix_counts_as_the_reference_loop():
    """``metrics.confusion_matrix`` (the CRF search's counts) against the loop above."""
    labels = rng.integers(0, 5, (3, 17, 23))
    labels[:, ::4] = 255  # ignored rows
    predictions = rng.integers(0, 5, labels.shape)
    counts = confusion_matrix(labels, predictions, 5)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, numpy_confusion(labels, predictions, 5))


def numpy_scores(m):
    """FCN-style scores (Long et al. 2015, section 5), NaN-aware."""
    with np.errstate(invalid="ignore", divide="ignore"):
        tp = np.diag(m)
        gt, pred = m.sum(1), m.sum(0)
        iou = tp / (gt + pred - tp)  # NaN where a class is absent from both
        acc = tp / gt  # NaN where a class is absent from the labels
    freq = gt / m.sum()
    return {
        "mean_iou": np.nanmean(iou),
        "per_class_iou": iou,
        "pixel_accuracy": tp.sum() / m.sum(),
        "mean_class_accuracy": np.nanmean(acc),
        "frequency_weighted_iou": np.sum(freq[gt > 0] * iou[gt > 0]),
    }


def assert_scores_equal(actual, expected):
    """Scores from the same integer confusion matrix, computed in float64 both ways: a
    few roundings (1e-10 relative is 5e5 float64 eps, 1e-6 times float32's)."""
    assert set(actual) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(actual[key]), value, rtol=1e-10, err_msg=key)


# === tests ===


def test_streaming_matches_numpy_over_several_updates():
    c = 6
    metric = MeanIoU(num_classes=c)
    all_labels, all_predictions = [], []
    for i in range(4):
        labels = random_labels((2, 9, 7), c - 1)  # class 5 never labelled ...
        logits = rng.normal(size=(2, 9, 7, c)).astype("float32")
        logits[..., 4] -= 100.0  # ... class 4 never predicted; both stay in the mean
        predictions = logits.argmax(-1)
        if i == 0:
            metric.update_state(labels, logits)  # logits
        elif i == 1:
            metric.update_state(labels[..., None].astype("float32"), tf.nn.softmax(logits))
        elif i == 2:
            metric.update_state(labels.astype("uint8"), predictions)  # class ids [N, H, W]
        else:
            metric.update_state(labels[..., None], predictions[..., None])
        all_labels.append(labels)
        all_predictions.append(predictions)
    expected = numpy_confusion(np.stack(all_labels), np.stack(all_predictions), c)
    assert expected[:, 4].sum() == 0 and expected[5].sum() == 0 and expected[5, 5] == 0
    np.testing.assert_array_equal(metric.confusion_matrix.numpy(), expected)

    reference = numpy_scores(expected)
    assert_scores_equal(metric.scores(), reference)
    # result() is float32 (Keras metrics): a division and a mean, a few float32 eps.
    np.testing.assert_allclose(float(metric.result()), reference["mean_iou"], rtol=1e-6)
    np.testing.assert_allclose(metric.per_class_iou(), reference["per_class_iou"], rtol=1e-10)

    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_absent_classes_are_excluded_from_the_mean():
    m = np.array([[5, 1, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    scores = {k: v.numpy() for k, v in confusion_matrix_scores(m).items()}
    assert np.isnan(scores["per_class_iou"][2])
    assert scores["per_class_iou"][3] == 0.0  # labelled, never right: counts as 0
    np.testing.assert_allclose(scores["mean_iou"], (5 / 8 + 3 / 7 + 0.0) / 3)
    np.testing.assert_allclose(scores["mean_class_accuracy"], (5 / 6 + 3 / 5 + 0.0) / 3)
    np.testing.assert_allclose(scores["pixel_accuracy"], 8 / 12)
    np.testing.assert_allclose(scores["frequency_weighted_iou"], (6 * 5 / 8 + 5 * 3 / 7) / 12)
    assert_scores_equal(scores, numpy_scores(m.astype(float)))
    empty = confusion_matrix_scores(np.zeros((3, 3)))
    assert float(empty["mean_iou"]) == 0.0 and float(empty["pixel_accuracy"]) == 0.0


def test_resizes_logits_bilinearly_and_ids_nearest():
    c = 4
    labels = random_labels((2, 9, 11), c)
    logits = rng.normal(size=(2, 5, 6, c)).astype("float32")
    metric = MeanIoU(num_classes=c)
    metric.update_state(labels, logits)
    predictions = numpy_bilinear_aligned(logits.astype(np.float64), (9, 11)).argmax(-1)
    np.testing.assert_array_equal(
        metric.confusion_matrix.numpy(), numpy_confusion(labels, predictions, c)
    )

    metric.reset_state()
    ids = rng.integers(0, c, (2, 5, 6))
    metric.update_state(labels, ids)
    rows, cols = np.array([0, 1, 1, 2, 2, 3, 3, 4, 4]), np.array([0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    # (11 - 1) / (6 - 1) = 2 and (9 - 1) / (5 - 1) = 2: each id covers the pixels it is nearest.
    np.testing.assert_array_equal(rows, np.floor(np.arange(9) * 4 / 8 + 0.5).astype(int))
    np.testing.assert_array_equal(cols, np.floor(np.arange(11) * 5 / 10 + 0.5).astype(int))
    expected = numpy_confusion(labels, ids[:, rows][:, :, cols], c)
    np.testing.assert_array_equal(metric.confusion_matrix.numpy(), expected)


def test_sample_weight_scales_counts():
    c = 3
    labels = random_labels((3, 4, 5), c)
    predictions = rng.integers(0, c, (3, 4, 5))
    weights = np.array([1.0, 0.0, 2.5])
    metric = MeanIoU(num_classes=c)
    metric.update_state(labels, predictions, sample_weight=weights)
    expected = numpy_confusion(labels, predictions, c, weights[:, None, None])
    np.testing.assert_allclose(metric.confusion_matrix.numpy(), expected)


def test_out_of_range_labels_raise():
    metric = MeanIoU(num_classes=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes"):
        metric.update_state(np.full((1, 2, 2), 7), np.zeros((1, 2, 2), "int32"))
    with pytest.raises(ValueError, match="channels"):
        metric.update_state(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 5)))


def test_in_model_evaluate_and_keras_file(tmp_path):
    c = 3
    x = rng.normal(size=(6, 5, 4, 3)).astype("float32")
    y = random_labels((6, 5, 4), c)
    model = keras.Sequential([keras.Input((5, 4, 3)), keras.layers.Conv2D(c, 1, name="logits")])
    model.compile(loss="mse", metrics=[MeanIoU(num_classes=c, name="miou")])
    logs = model.evaluate(x, y[..., None], batch_size=4, return_dict=True, verbose=0)
    predictions = model.predict(x, verbose=0).argmax(-1)
    reference = numpy_scores(numpy_confusion(y, predictions, c))
    # The same counts; float32 result: a few eps.
    np.testing.assert_allclose(logs["miou"], reference["mean_iou"], rtol=1e-6)

    metric = MeanIoU(num_classes=c, ignore_label=0, name="m")
    assert_init_args_in_config(metric)
    model.compile(loss="mse", metrics=[metric])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    loaded.evaluate(x[:1], np.minimum(y[:1, ..., None], 2), verbose=0)  # builds its metrics
    restored = [m for m in loaded.metrics[-1].metrics if isinstance(m, MeanIoU)]
    assert restored and restored[0].get_config() == metric.get_config()
