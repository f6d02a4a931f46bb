"""Shared test helpers: the one layer check used for every layer, and numpy references."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import stat
from pathlib import Path

import keras
import numpy as np
import pytest

from deeplab_tf.precision import bfloat16_cannot_run
from tests.tolerances import network_rtol, sum_bound

BASE_LAYER_CONFIG_KEYS = set(keras.layers.Layer().get_config())


def assert_init_args_in_config(layer: keras.layers.Layer) -> None:
    """Every ``__init__`` argument appears in ``get_config`` and nothing else does."""
    params = {
        name
        for name, p in inspect.signature(type(layer).__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    config_keys = set(layer.get_config()) - BASE_LAYER_CONFIG_KEYS
    assert params == config_keys, (
        f"{type(layer).__name__}: __init__ args not in get_config: {sorted(params - config_keys)}; "
        f"get_config keys that are no __init__ arg: {sorted(config_keys - params)}"
    )


def run_layer_checks(
    layer: keras.layers.Layer,
    inputs: np.ndarray | list[np.ndarray],
    tmp_path: Path,
    atol: float = 1e-5,
) -> None:
    """The round-trip check every layer gets (STYLE.md principle 2).

    * ``__init__`` arguments == ``get_config`` keys;
    * ``get_config`` -> ``from_config`` -> the same config JSON;
    * inside a model, ``.keras`` save/load gives identical outputs.
    """
    assert_init_args_in_config(layer)
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert json.dumps(clone.get_config(), sort_keys=True, default=str) == json.dumps(
        config, sort_keys=True, default=str
    )

    batch = inputs if isinstance(inputs, list) else [inputs]
    model_inputs = [keras.Input(shape=(None,) * (x.ndim - 2) + x.shape[-1:]) for x in batch]
    outputs = layer(model_inputs if isinstance(inputs, list) else model_inputs[0])
    model = keras.Model(model_inputs, outputs)
    expected = np.asarray(model(batch, training=False))
    path = tmp_path / f"{layer.name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    # The same weights through the same kernels: equal up to last roundings of the
    # layers' O(1) outputs (1e-5 is 84 eps); callers with larger outputs pass atol.
    np.testing.assert_allclose(np.asarray(loaded(batch, training=False)), expected, atol=atol)
    assert type(loaded.layers[-1]) is type(layer)


ROOT = Path(__file__).resolve().parents[1]  # the checkout

# For tests that compute in bfloat16: where oneDNN's instruction-set cap leaves it no
# bfloat16 convolution (``precision.bfloat16_cannot_run``) nothing can compute it; the
# package's own answer there is tested in test_folding and test_training.
needs_bfloat16 = pytest.mark.skipif(
    bfloat16_cannot_run() is not None, reason=f"bfloat16 cannot run: {bfloat16_cannot_run()}"
)


def assert_close_relative(actual, expected, rtol: float, varies: bool = True) -> None:
    """``actual`` equals ``expected`` to ``rtol`` times the largest ``|expected|`` (an
    untrained network's outputs can be tiny, where a fixed tolerance proves nothing).
    With ``varies``, [N, H, W, ...] ``expected`` must also vary over space, or the
    comparison proves nothing either."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0
    if varies:
        assert np.std(expected, axis=(1, 2)).mean() > 0.1 * np.std(expected)
    np.testing.assert_allclose(actual, expected, atol=rtol * scale)


def trained_in_mixed_bfloat16(reference: keras.Model, build) -> keras.Model:
    """``build()`` under the global policy that bfloat16 training sets (and its .keras
    file keeps), with ``reference``'s weights."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.set_weights(reference.get_weights())
    return model


def assert_same_weights(a: keras.layers.Layer, b: keras.layers.Layer) -> None:
    """Layers (or models) ``a`` and ``b`` hold equal weights, in the same order."""
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def numpy_atrous_conv2d(x: np.ndarray, w: np.ndarray, rate: int, padding: str) -> np.ndarray:
    """y[n, i, j, o] = sum_{a, b, c} x[n, i + rate*a, j + rate*b, c] w[a, b, c, o]."""
    k = w.shape[0]
    xp = _pad(x, rate * (k - 1) // 2 if padding == "same" else 0)
    out_h = xp.shape[1] - rate * (k - 1)
    out_w = xp.shape[2] - rate * (k - 1)
    y = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]), np.float64)
    for a in range(k):
        for b in range(k):
            patch = xp[:, rate * a : rate * a + out_h, rate * b : rate * b + out_w, :]
            y += patch @ w[a, b]
    return y


def numpy_atrous_conv2d_bound(x: np.ndarray, w: np.ndarray, rate: int, padding: str):
    """Higham's bound (``tolerances.sum_bound``) on a float32 evaluation of
    ``numpy_atrous_conv2d(x, w, ...)``: sums of k x k taps x C channels, magnitudes
    from |x| and |w|."""
    magnitudes = numpy_atrous_conv2d(np.abs(x), np.abs(w), rate, padding)
    return sum_bound(int(np.prod(w.shape[:3])), magnitudes)


def numpy_atrous_conv2d_grads(
    x: np.ndarray, w: np.ndarray, rate: int, padding: str, dy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of sum(y * dy) w.r.t. x and w, from the same definition."""
    k = w.shape[0]
    pad = rate * (k - 1) // 2 if padding == "same" else 0
    xp = _pad(x, pad)
    out_h, out_w = dy.shape[1:3]
    dxp = np.zeros_like(xp, dtype=np.float64)
    dw = np.zeros_like(w, dtype=np.float64)
    for a in range(k):
        for b in range(k):
            rows = slice(rate * a, rate * a + out_h)
            cols = slice(rate * b, rate * b + out_w)
            dw[a, b] = np.einsum("nijc,nijo->co", xp[:, rows, cols, :], dy)
            dxp[:, rows, cols, :] += dy @ w[a, b].T
    dx = dxp[:, pad : pad + x.shape[1], pad : pad + x.shape[2], :]
    return dx, dw


def _pad(x: np.ndarray, pad: int) -> np.ndarray:
    return np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))


# === File modes ===


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_tree_modes(root: Path, directory: int = 0o755, regular: int = 0o644) -> None:
    """Every path under ``root`` (and root) has the modes mkdir/open give under the umask."""
    paths = [root, *root.rglob("*")]
    assert len(paths) > 1
    for path in paths:
        expected = directory if path.is_dir() else regular
        assert file_mode(path) == expected, (str(path), oct(file_mode(path)))


# === Small models for the inference, evaluation and prediction tests ===


# tiny_variant()'s float32 bound (tests/tolerances.py): MobileNetV2's 52 layers and the
# head's 3 in series, sums of at most 480 terms.
TINY_RTOL = network_rtol(55, 480)


def tiny_variant():
    """MobileNetV2 x0.35 with a 16-wide ASPP: a real DeepLab v3 that runs in milliseconds."""
    import dataclasses

    from deeplab_tf import get_variant

    return dataclasses.replace(
        get_variant("deeplabv3-mobilenetv2"), name="tiny", alpha=0.35, head_filters=16
    )


def calibrate_batch_norm(
    model: keras.Model, seed: int = 0, size: int = 64, images: np.ndarray | None = None
) -> keras.Model:
    """Random BN affine parameters and moving statistics from one random batch (or from
    ``images``), in every nested layer: with the initial statistics a deep net's logits
    are nearly constant (about 1e-10), which would hide any spatial or stride error."""
    rng = np.random.default_rng(seed)
    batch_norms = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in batch_norms:
        c = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.8, 1.2, c).astype("float32"))
        layer.beta.assign(rng.normal(0, 0.1, c).astype("float32"))
        layer.momentum = 0.0
    if images is None:
        images = rng.uniform(0, 255, size=(2, size, size, 3))
    model(np.asarray(images, "float32"), training=True)
    for layer in batch_norms:
        layer.momentum = 0.99
    return model


def tiny_model(
    num_classes: int, output_stride: int = 16, seed: int = 0, images: np.ndarray | None = None
) -> keras.Model:
    """``tiny_variant()`` with calibrated batch norm and a classifier rescaled so that on
    random images (or on ``images``, whose statistics then set the batch norm) its
    logits have mean 0 and standard deviation about 2 per class: probabilities neither
    uniform nor saturated, varying over the image."""
    from deeplab_tf import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(tiny_variant(), num_classes, output_stride=output_stride)
    calibrate_batch_norm(model, seed, images=images)
    classifier = model.get_layer("logits")
    head = keras.Model(model.inputs, classifier.output)
    if images is None:
        images = np.random.default_rng(seed + 1).uniform(0, 255, (2, 64, 64, 3))
    x = np.asarray(images, "float32")
    logits = np.asarray(head(x, training=False)).reshape(-1, num_classes)
    kernel, bias = classifier.get_weights()
    scale = 2.0 / logits.std(axis=0).mean()
    classifier.set_weights([kernel * scale, (bias - logits.mean(axis=0)) * scale])
    return model


def write_model_dir(
    model: keras.Model, model_dir: Path, data_dir: Path | None, output_stride: int = 16
) -> Path:
    """A model directory as training leaves it: best.keras and config.json."""
    import dataclasses

    from deeplab_tf.files import save_model_atomic, write_json_atomic
    from deeplab_tf.recipes import get_recipe
    from deeplab_tf.training import TrainConfig

    model_dir.mkdir(parents=True, exist_ok=True)
    save_model_atomic(model, model_dir / "best.keras")
    recipe = dataclasses.replace(get_recipe("shapes-cpu"), output_stride=output_stride)
    data_dir = None if data_dir is None else str(data_dir)
    config = TrainConfig(tiny_variant(), recipe, str(model_dir), data_dir=data_dir)
    write_json_atomic(model_dir / "config.json", {**config.to_dict(), "data_dir": data_dir})
    return model_dir
