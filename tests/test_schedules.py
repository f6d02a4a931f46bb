import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf.losses import SoftmaxCrossEntropy
from deeplab_tf.metrics import MeanIoU
from deeplab_tf.schedules import DeepLabSGD, PolyDecay, StepDecay, build_optimizer
from tests.test_losses import assert_init_args_in_config
from tests.test_metrics import numpy_confusion, numpy_scores

REPO = Path(__file__).resolve().parents[1]


def numpy_poly(step, lr0, total, power=0.9, end=0.0):
    t = min(max(step, 0), total)
    return (lr0 - end) * (1 - t / total) ** power + end


# === schedules ===


def test_poly_matches_formula_and_clamps():
    schedule = PolyDecay(0.007, 100, power=0.9, end_learning_rate=1e-4)
    # Float32 against float64: a subtraction, a division and a pow (each within a few
    # eps relative; pow scales its base's error by the power) and a product: 1e-5 is 84
    # eps, the same bound for each schedule below.
    for step in [-3, 0, 1, 37, 99, 100, 101, 10**6]:
        lr = float(schedule(step))
        assert np.isfinite(lr) and lr >= np.float32(1e-4)
        np.testing.assert_allclose(lr, numpy_poly(step, 0.007, 100, 0.9, 1e-4), rtol=1e-5)
    lr_50 = float(schedule(tf.constant(50, tf.int64)))
    np.testing.assert_allclose(lr_50, numpy_poly(50, 0.007, 100, 0.9, 1e-4), rtol=1e-5)


def test_poly_linear_warmup_joins_the_policy():
    schedule = PolyDecay(0.01, 100, warmup_steps=10, warmup_learning_rate=0.001)
    at_10 = numpy_poly(10, 0.01, 100)
    for step, expected in [(0, 0.001), (4, 0.001 + (at_10 - 0.001) * 0.4), (10, at_10)]:
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(60)), numpy_poly(60, 0.01, 100), rtol=1e-5)


def test_step_policy():
    schedule = StepDecay(0.001, 2000, gamma=0.1)
    for step, expected in [(0, 1e-3), (1999, 1e-3), (2000, 1e-4), (4001, 1e-5), (-5, 1e-3)]:
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)
    warm = StepDecay(0.001, 2000, warmup_steps=4)
    np.testing.assert_allclose(float(warm(1)), 0.00025, rtol=1e-5)


@pytest.mark.parametrize(
    "schedule",
    [PolyDecay(0.007, 30000, 0.8, 1e-5, 100, 1e-4), StepDecay(0.001, 2000, 0.5, 10, 1e-5)],
)
def test_schedule_config_round_trip(schedule):
    assert_init_args_in_config(schedule)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert type(restored) is type(schedule) and restored.get_config() == schedule.get_config()


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="decay_steps"):
        PolyDecay(0.1, 0)
    with pytest.raises(ValueError, match="step_size"):
        StepDecay(0.1, 2.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        PolyDecay(0.1, 10, warmup_steps=-1)
    with pytest.raises(ValueError, match="l2_weight_decay"):
        build_optimizer(0.1, weight_decay=-1.0)


# === optimiser ===


def test_l2_decay_and_lr_multipliers_against_hand_computation():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.DepthwiseConv2D(3, name="dw"),
            keras.layers.Conv2D(2, 1, name="logits"),
        ]
    )
    lr, momentum, wd = 0.1, 0.9, 0.05
    optimizer = build_optimizer(
        lr, momentum, wd, lr_multipliers={"logits": 10.0, "logits/bias": 20.0, "lo": 99.0}
    )
    # (lr multiplier, decayed) written out by hand: kernels decay, biases and BN do not.
    expected_rules = {
        "conv/kernel": (1, True),
        "conv/bias": (1, False),
        "bn/gamma": (1, False),
        "bn/beta": (1, False),
        "dw/kernel": (1, True),
        "dw/bias": (1, False),
        "logits/kernel": (10, True),
        "logits/bias": (20, False),
    }
    variables = model.trainable_variables
    # Sequential prefixes its name (sequential/conv/kernel): keys match whole components.
    paths = [v.path.split("/", 1)[1] for v in variables]
    assert paths == list(expected_rules) and variables[0].path.startswith("sequential")
    rng = np.random.default_rng(3)
    for v in variables:  # BN starts at gamma 1, beta 0; make decay visible everywhere
        v.assign(rng.normal(size=v.shape))
    w = {p: v.numpy().astype(np.float64) for p, v in zip(paths, variables, strict=True)}
    velocity = {p: np.zeros_like(x) for p, x in w.items()}
    for _ in range(3):
        grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        for g, p in zip(grads, paths, strict=True):
            mult, decayed = expected_rules[p]
            velocity[p] = momentum * velocity[p] - lr * mult * (g + wd * w[p] * decayed)
            w[p] = w[p] + velocity[p]
    # Three float32 momentum steps of about six roundings each on values of order 1
    # (about 20 eps, 2.4e-6 relative); atol for the values that cancel to near 0.
    for p, v in zip(paths, variables, strict=True):
        np.testing.assert_allclose(v.numpy(), w[p], rtol=1e-5, atol=1e-6, err_msg=p)


def test_optimizer_config_round_trip():
    optimizer = build_optimizer(
        PolyDecay(0.007, 100), 0.8, 1e-4, {"logits": 10.0}, nesterov=True, clipnorm=1.0
    )
    config = optimizer.get_config()
    params = set(inspect.signature(DeepLabSGD.__init__).parameters) - {"self", "kwargs"}
    assert params <= set(config)
    assert config["l2_weight_decay"] == 1e-4 and config["weight_decay"] is None
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, DeepLabSGD)
    assert isinstance(restored._learning_rate, PolyDecay)
    assert json.dumps(restored.get_config(), sort_keys=True, default=str) == json.dumps(
        config, sort_keys=True, default=str
    )


# === end to end: fit on one device and on two logical CPUs against numpy ===

NUM_CLASSES = 3
VALID_PIXELS = [16, 8, 2, 1, 12, 3, 16, 5]  # no 2 + 2 split of a batch has equal halves
LR0, TOTAL, MOMENTUM, WD, MULT = 0.05, 4, 0.9, 0.1, 10.0


def fit_problem():
    r = np.random.default_rng(7)
    x = r.normal(size=(8, 4, 4, 3)).astype("float32")
    y = r.integers(0, NUM_CLASSES, (8, 16))
    for i, n in enumerate(VALID_PIXELS):
        y[i, n:] = 255
    weights = [r.normal(size=s).astype("float32") for s in [(1, 1, 3, 3), (3,)] * 2]
    return x, y.reshape(8, 4, 4), weights


def fit_and_evaluate(strategy) -> dict:
    """Two fit steps (batch 4) and an evaluate, in ``strategy``; results as lists."""
    x, y, weights = fit_problem()
    with strategy.scope():
        inputs = keras.Input((4, 4, 3))
        outputs = keras.layers.Add()(
            [
                keras.layers.Conv2D(NUM_CLASSES, 1, name="conv")(inputs),
                keras.layers.Conv2D(NUM_CLASSES, 1, name="logits")(inputs),
            ]
        )
        model = keras.Model(inputs, outputs)
        model.set_weights(weights)
        optimizer = build_optimizer(
            PolyDecay(LR0, TOTAL), MOMENTUM, WD, lr_multipliers={"logits": MULT}
        )
        loss = SoftmaxCrossEntropy()
        metric = MeanIoU(NUM_CLASSES)
        model.compile(optimizer=optimizer, loss=loss, metrics=[metric])
        loss.set_step_source(optimizer.iterations)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    logs = model.evaluate(x, y[..., None], batch_size=4, return_dict=True, verbose=0)
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "mean_iou": float(logs["mean_iou"]),
        "confusion": np.asarray(metric.confusion_matrix.numpy()).tolist(),
        "logits": model.predict(x, verbose=0).tolist(),
    }


def numpy_fit():
    """The same two steps: gradient of the mean CE over the batch's valid pixels, L2 on
    kernels, 10x on ``logits``, momentum, poly lr."""
    x, y, weights = fit_problem()
    w = [a[0, 0].astype(np.float64) if a.ndim == 4 else a.astype(np.float64) for a in weights]
    velocity = [np.zeros_like(a) for a in w]
    multipliers, decayed = [1, 1, MULT, MULT], [True, False, True, False]
    for step in range(2):
        xb, yb = x[4 * step : 4 * step + 4].astype(np.float64), y[4 * step : 4 * step + 4]
        logits = xb @ w[0] + w[1] + xb @ w[2] + w[3]
        softmax = np.exp(logits - logits.max(-1, keepdims=True))
        softmax /= softmax.sum(-1, keepdims=True)
        valid = yb != 255
        dlogits = (softmax - np.eye(NUM_CLASSES)[np.where(valid, yb, 0)]) * valid[..., None]
        dlogits /= valid.sum()
        g_kernel = np.einsum("nhwi,nhwc->ic", xb, dlogits)
        g_bias = dlogits.sum((0, 1, 2))
        lr = numpy_poly(step, LR0, TOTAL)
        for i, g in enumerate([g_kernel, g_bias, g_kernel, g_bias]):
            g_total = multipliers[i] * (g + WD * w[i] * decayed[i])
            velocity[i] = MOMENTUM * velocity[i] - lr * g_total
            w[i] = w[i] + velocity[i]
    return w


def check_fit_results(results):
    expected = numpy_fit()
    # Two float32 steps whose gradients are means over up to 4x16 pixels (sums of 64
    # terms per weight, 10 * sqrt(64) eps = 1e-5 relative, also the all-reduce's other
    # order across replicas), times lr multipliers of up to 10 and momentum: 1e-4
    # relative to the update; atol for the weights that cancel to near 0.
    for i, (actual, ref) in enumerate(zip(results["weights"], expected, strict=True)):
        actual = np.reshape(actual, ref.shape)
        np.testing.assert_allclose(actual, ref, rtol=1e-4, atol=1e-5, err_msg=str(i))
    _, y, _ = fit_problem()
    predictions = np.asarray(results["logits"]).argmax(-1)
    confusion = numpy_confusion(y, predictions, NUM_CLASSES)
    np.testing.assert_array_equal(results["confusion"], confusion)
    # From the same integer counts: a float32 division and a mean of a few IoUs.
    np.testing.assert_allclose(results["mean_iou"], numpy_scores(confusion)["mean_iou"], rtol=1e-6)


def test_fit_one_device_matches_numpy():
    check_fit_results(fit_and_evaluate(tf.distribute.get_strategy()))


def test_fit_mirrored_two_cpus_matches_numpy():
    # Logical devices must be configured before TF initialises them: a fresh process.
    script = textwrap.dedent(
        """
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        from tests.test_schedules import fit_and_evaluate
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        print("RESULT " + json.dumps(fit_and_evaluate(strategy)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    check_fit_results(json.loads(lines[-1][len("RESULT ") :]))


def test_keras_file_keeps_optimizer_state(tmp_path):
    x, y, _ = fit_problem()
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Conv2D(NUM_CLASSES, 1, name="logits")]
    )
    optimizer = build_optimizer(
        PolyDecay(LR0, TOTAL), MOMENTUM, WD, lr_multipliers={"logits/bias": 3.0}
    )
    model.compile(optimizer=optimizer, loss=SoftmaxCrossEntropy(), metrics=[MeanIoU(3)])
    model.fit(x, y, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, DeepLabSGD)
    assert loaded.optimizer.get_config() == optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 1
    for a, b in zip(loaded.optimizer.variables, optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The next step (momentum, lr at step 1, multipliers) is the same after the round trip.
    model.fit(x, y, batch_size=8, verbose=0)
    loaded.fit(x, y, batch_size=8, verbose=0)
    # The same weights, optimizer state and batch through the same kernels: equal up
    # to a last rounding (1e-6 is 8 eps).
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
