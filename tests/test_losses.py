import inspect
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf.losses import (
    SoftmaxCrossEntropy,
    class_weights_from_frequencies,
    resize_labels_nearest,
    resize_logits_bilinear,
)
from tests.tolerances import sum_rtol

rng = np.random.default_rng(0)
# A float32 loss against the float64 reference: a mean of at most 3x7x9 per-pixel
# losses, each a log-sum-exp over at most 5 classes; their 945 terms in float32.
LOSS_RTOL = sum_rtol(3 * 7 * 9 * 5)


# === numpy references ===


def numpy_bilinear_aligned(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, h, w, C] -> [N, H, W, C]; output i sits on input i (h-1)/(H-1) (corners aligned)."""

    def axis_weights(n_in, n_out):
        pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    r0, r1, fr = axis_weights(x.shape[1], size[0])
    c0, c1, fc = axis_weights(x.shape[2], size[1])
    fr, fc = fr[None, :, None, None], fc[None, None, :, None]
    top = x[:, r0][:, :, c0] * (1 - fc) + x[:, r0][:, :, c1] * fc
    bottom = x[:, r1][:, :, c0] * (1 - fc) + x[:, r1][:, :, c1] * fc
    return top * (1 - fr) + bottom * fr


def numpy_nearest_aligned(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    def index(n_in, n_out):
        return np.floor(np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1) + 0.5).astype(int)

    return labels[:, index(labels.shape[1], size[0])][:, :, index(labels.shape[2], size[1])]


def numpy_pixel_losses(labels, logits, class_weights=None, ignore=255):
    """Per-pixel (weighted) cross-entropy in float64 and the valid mask, both flattened."""
    labels = labels.reshape(-1).astype(np.int64)
    logits = logits.reshape(labels.size, -1).astype(np.float64)
    valid = labels != ignore
    z = logits - logits.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    safe = np.where(valid, labels, 0)
    losses = -log_softmax[np.arange(labels.size), safe]
    if class_weights is not None:
        losses = losses * np.asarray(class_weights)[safe]
    return np.where(valid, losses, 0.0), valid


def numpy_loss(labels, logits, class_weights=None, top_k_fraction=1.0, ignore=255):
    """Mean over the valid pixels of the batch, or over the top floor(r |V|) of them."""
    losses, valid = numpy_pixel_losses(labels, logits, class_weights, ignore)
    if not valid.any():
        return 0.0
    kept = np.sort(losses[valid])[::-1]
    if top_k_fraction < 1.0:
        kept = kept[: max(1, int(np.floor(top_k_fraction * valid.sum())))]
    return float(kept.mean())


def random_labels(shape, num_classes, ignore_fraction=0.3):
    labels = rng.integers(0, num_classes, shape)
    labels[rng.random(shape) < ignore_fraction] = 255
    return labels


def assert_init_args_in_config(obj, base_keys=()):
    params = {
        n
        for n, p in inspect.signature(type(obj).__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    assert params == set(obj.get_config()) - set(base_keys)
    clone = type(obj).from_config(obj.get_config())
    assert json.dumps(clone.get_config(), sort_keys=True) == json.dumps(
        obj.get_config(), sort_keys=True
    )


# === tests ===


@pytest.mark.parametrize("label_dtype", ["int32", "uint8", "float32"])
@pytest.mark.parametrize("channel_axis", [False, True])
def test_matches_numpy_mean_over_valid_pixels(label_dtype, channel_axis):
    labels = random_labels((3, 7, 9), 5)
    labels[0, :6] = 255  # images with very different valid counts: not a mean of means
    logits = rng.normal(size=(3, 7, 9, 5)).astype("float32") * 3
    y = labels[..., None] if channel_axis else labels
    value = SoftmaxCrossEntropy()(y.astype(label_dtype), logits)
    np.testing.assert_allclose(float(value), numpy_loss(labels, logits), rtol=LOSS_RTOL)

    losses, valid = numpy_pixel_losses(labels, logits)
    per_image = losses.reshape(3, -1).sum(1) / np.maximum(valid.reshape(3, -1).sum(1), 1)
    assert abs(per_image.mean() - numpy_loss(labels, logits)) > 1e-3


def test_gradient_matches_numpy():
    labels = random_labels((2, 4, 5), 3)
    logits = tf.Variable(rng.normal(size=(2, 4, 5, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        value = SoftmaxCrossEntropy()(labels, logits)
    grad = tape.gradient(value, logits).numpy()
    x = logits.numpy().astype(np.float64)
    softmax = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    valid = labels != 255
    onehot = np.eye(3)[np.where(valid, labels, 0)]
    expected = (softmax - onehot) * valid[..., None] / valid.sum()
    # Each element is a float32 softmax (a 3-term sum, a division) minus 0 or 1, over
    # the valid count: a few eps at most 1, far below 1e-6 (8 eps).
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_upsamples_logits_bilinearly_to_the_label_size():
    labels = random_labels((2, 9, 13), 4)
    logits = rng.normal(size=(2, 5, 4, 4)).astype("float32")
    value = SoftmaxCrossEntropy(upsample_logits=True)(labels, logits)
    expected = numpy_loss(labels, numpy_bilinear_aligned(logits.astype(np.float64), (9, 13)))
    np.testing.assert_allclose(float(value), expected, rtol=LOSS_RTOL)
    np.testing.assert_allclose(
        resize_logits_bilinear(logits, (9, 13)).numpy(),
        numpy_bilinear_aligned(logits, (9, 13)),
        atol=sum_rtol(4) * np.abs(logits).max(),  # 4-term float32 interpolation
    )
    # Same size: the logits themselves, bit for bit.
    same = resize_logits_bilinear(logits, (5, 4)).numpy()
    np.testing.assert_array_equal(same, logits)


def test_subsamples_labels_nearest_to_the_logits_size():
    labels = random_labels((2, 17, 11), 4)
    logits = rng.normal(size=(2, 5, 4, 4)).astype("float32")
    value = SoftmaxCrossEntropy(upsample_logits=False)(labels, logits)
    expected = numpy_loss(numpy_nearest_aligned(labels, (5, 4)), logits)
    np.testing.assert_allclose(float(value), expected, rtol=LOSS_RTOL)

    # 513 -> 65 at output stride 8 keeps exactly every 8th pixel; never an interpolated value.
    big = rng.integers(0, 256, (1, 513, 513)).astype("int32")
    small = resize_labels_nearest(tf.constant(big), (65, 33)).numpy()
    np.testing.assert_array_equal(small, big[:, ::8, ::16])
    odd = resize_labels_nearest(tf.constant(big[:, :100, :37]), (13, 7)).numpy()
    np.testing.assert_array_equal(odd, numpy_nearest_aligned(big[:, :100, :37], (13, 7)))


def test_class_weights():
    weights = [0.5, 2.0, 1.0, 3.0]
    labels = random_labels((2, 6, 6), 4)
    logits = rng.normal(size=(2, 6, 6, 4)).astype("float32")
    value = SoftmaxCrossEntropy(class_weights=weights)(labels, logits)
    np.testing.assert_allclose(float(value), numpy_loss(labels, logits, weights), rtol=LOSS_RTOL)
    with pytest.raises(ValueError, match="class_weights has 3 entries"):
        SoftmaxCrossEntropy(class_weights=[1.0, 1.0, 1.0])(labels, logits)


def test_top_k_hard_pixel_mining_with_linear_warmup():
    labels = random_labels((2, 6, 7), 4)  # about 59 valid pixels
    logits = rng.normal(size=(2, 6, 7, 4)).astype("float32") * 2
    weights = [1.0, 0.5, 2.0, 1.5]
    step = keras.Variable(0, dtype="int64", trainable=False)
    loss = SoftmaxCrossEntropy(
        class_weights=weights, top_k_percent_pixels=0.2, hard_example_mining_step=100
    )
    # No step source: the final fraction.
    np.testing.assert_allclose(
        float(loss(labels, logits)), numpy_loss(labels, logits, weights, 0.2), rtol=LOSS_RTOL
    )
    loss.set_step_source(step)
    for t, fraction in [(0, 1.0), (30, 0.3 * 0.2 + 0.7), (77, 0.77 * 0.2 + 0.23), (100, 0.2)]:
        step.assign(t)
        expected = numpy_loss(labels, logits, weights, fraction)
        np.testing.assert_allclose(float(loss(labels, logits)), expected, rtol=LOSS_RTOL)
    step.assign(5000)  # clamps at the final fraction
    np.testing.assert_allclose(
        float(loss(labels, logits)), numpy_loss(labels, logits, weights, 0.2), rtol=LOSS_RTOL
    )
    assert numpy_loss(labels, logits, weights, 0.2) > numpy_loss(labels, logits, weights) * 1.3


@pytest.mark.parametrize("top_k", [1.0, 0.25])
def test_all_ignored_gives_zero_and_finite_gradients(top_k):
    labels = np.full((2, 3, 4), 255)
    logits = tf.Variable(rng.normal(size=(2, 3, 4, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        value = SoftmaxCrossEntropy(top_k_percent_pixels=top_k)(labels, logits)
    grad = tape.gradient(value, logits).numpy()
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_hard_mining_reads_the_optimizer_step_inside_fit():
    # lr 0: the model is fixed, so each epoch's loss differs only by the mining fraction.
    x = rng.normal(size=(2, 5, 6, 3)).astype("float32")
    y = random_labels((2, 5, 6), 3, ignore_fraction=0.2)
    model = keras.Sequential([keras.Input((5, 6, 3)), keras.layers.Conv2D(3, 1, name="logits")])
    optimizer = keras.optimizers.SGD(learning_rate=0.0)
    loss = SoftmaxCrossEntropy(top_k_percent_pixels=0.1, hard_example_mining_step=2)
    model.compile(optimizer=optimizer, loss=loss)
    loss.set_step_source(optimizer.iterations)
    history = model.fit(x, y, batch_size=2, epochs=3, verbose=0, shuffle=False)
    logits = model.predict(x, verbose=0)
    expected = [numpy_loss(y, logits, None, f) for f in (1.0, 0.55, 0.1)]
    np.testing.assert_allclose(history.history["loss"], expected, rtol=LOSS_RTOL)


def test_config_and_keras_file_round_trip(tmp_path):
    loss = SoftmaxCrossEntropy(
        ignore_label=0,
        upsample_logits=False,
        class_weights=[1.0, 2.0],
        top_k_percent_pixels=0.5,
        hard_example_mining_step=10,
    )
    assert_init_args_in_config(loss)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 1, name="logits")])
    model.compile(optimizer="sgd", loss=loss)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.loss, SoftmaxCrossEntropy)
    assert loaded.loss.get_config() == loss.get_config()


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k_percent_pixels"):
        SoftmaxCrossEntropy(top_k_percent_pixels=0.0)
    with pytest.raises(ValueError, match="hard_example_mining_step"):
        SoftmaxCrossEntropy(hard_example_mining_step=-1)
    with pytest.raises(ValueError, match="class_weights"):
        SoftmaxCrossEntropy(class_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="reduction"):
        SoftmaxCrossEntropy(reduction="sum")


def test_class_weights_from_frequencies():
    counts = [600, 300, 100, 0]
    f = np.array([0.6, 0.3, 0.1])

    w = np.array(class_weights_from_frequencies(counts, "inverse_sqrt"))
    assert w[3] == 0.0
    np.testing.assert_allclose(w[:3] / w[0], np.sqrt(0.6 / f))
    np.testing.assert_allclose(np.sum(f * w[:3]), 1.0)

    w = np.array(class_weights_from_frequencies(counts, "inverse"))
    np.testing.assert_allclose(w[:3], 1 / (3 * f))

    w = class_weights_from_frequencies([0.6, 0.3, 0.1, 0.0], "median_frequency")
    np.testing.assert_allclose(w, [0.5, 1.0, 3.0, 0.0])

    with pytest.raises(ValueError, match="method"):
        class_weights_from_frequencies(counts, "log")
    with pytest.raises(ValueError, match="frequencies"):
        class_weights_from_frequencies([0, 0], "inverse")
