"""Batch norm folded into convolutions for inference (``deeplab_tf.folding``) and the
inference precision (``deeplab_tf.precision``): the folded copy against the model as
trained, the fold against numpy, what must not be folded, bfloat16 and its fallback."""

import json
import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab_tf import build_model, precision
from deeplab_tf.export.bundle import keras_model_for_apps
from deeplab_tf.folding import count_batch_norms, fold_batch_norm, in_precision, inference_copy
from deeplab_tf.inference import InferenceError, Predictor
from deeplab_tf.layers import (
    ASPP,
    AtrousSeparableConv2D,
    ConvBNReLU,
    FoldableBatchNormalization,
)
from deeplab_tf.multiscale import MultiScaleInputs
from deeplab_tf.precision import cpu_flags, onednn_runs, resolve_precision
from tests.helpers import (
    ROOT,
    assert_close_relative,
    calibrate_batch_norm,
    needs_bfloat16,
    trained_in_mixed_bfloat16,
)
from tests.tolerances import model_probability_atol, network_rtol

rng = np.random.default_rng(3)


def _batch_norm_weights(model: keras.Model) -> list[np.ndarray]:
    return [
        w.numpy()
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
        for w in layer.weights
    ]


@pytest.mark.parametrize("folded", [False, True])
def test_foldable_batch_norm_round_trip(tmp_path, folded):
    """Keras's batch norm with one more argument, ``folded``: its config round trip and
    .keras file (Keras's own arguments pass through as keywords, so the shared
    harness's check of named ``__init__`` arguments does not apply)."""
    layer = FoldableBatchNormalization(epsilon=1e-3, folded=folded, name="bn")
    config = layer.get_config()
    assert config["folded"] is folded and config["epsilon"] == 1e-3
    assert FoldableBatchNormalization.from_config(config).get_config() == config
    inputs = keras.Input((None, None, 4))
    model = keras.Model(inputs, layer(inputs))
    x = rng.normal(size=(2, 5, 6, 4)).astype("float32")
    calibrate_batch_norm(model, images=x)
    path = tmp_path / "bn.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("bn")) is FoldableBatchNormalization
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    bn = model.get_layer("bn")
    expected = x + bn.beta.numpy() if folded else bn(x, training=False)
    np.testing.assert_allclose(model(x, training=False), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "variant, layers, terms",
    [
        # resnet10_cpu's 12 convolutions in series, the ASPP's branch and projection, the
        # classifier; sums of 3x3x128 terms. Convolutions without bias.
        ("deeplabv3-resnet10-cpu", 12, 9 * 128),
        # and the decoder's two 3x3 convolutions.
        ("deeplabv3plus-resnet10-cpu", 14, 9 * 128),
    ],
)
def test_folded_copy_equals_the_model(variant, layers, terms):
    """Every batch norm of the model is folded and the logits are the model's up to
    float32 rounding: the scaled kernels and the offsets reorder each layer's sums.
    (Shallow models only: random deep ones with calibrated batch norm amplify rounding,
    ResNet-50's relative difference doubling each stage from 5e-7 to 3e-4, so the bound
    of independent per-layer errors does not hold for them; the folds of their layers,
    convolutions with a bias and depthwise ones, are checked against numpy below.)"""
    images = rng.uniform(0, 255, (2, 61, 47, 3)).astype("float32")
    # Statistics of these images: logits that vary over the image, as a trained net's.
    model = calibrate_batch_norm(build_model(variant, 5, upsample_logits=False), images=images)
    before = [w.copy() for w in model.get_weights()]
    folded = fold_batch_norm(model)
    total = len(_batch_norm_weights(model)) // 4
    assert count_batch_norms(folded) == {"folded": total} and total > 10
    expected = model(images, training=False)
    assert_close_relative(folded(images, training=False), expected, network_rtol(layers, terms))
    assert folded.name == model.name
    with pytest.raises(ValueError, match="folded already"):
        fold_batch_norm(folded)
    for a, b in zip(model.get_weights(), before, strict=True):  # the model is untouched
        np.testing.assert_array_equal(a, b)


def test_the_copy_draws_no_initial_values(monkeypatch):
    """Every weight of the copy comes from the model, so making it draws no random
    initial values (for deeplabv3, 58 million from truncated normals)."""
    model = build_model("deeplabv3plus-resnet10-cpu", 5, upsample_logits=False)

    def no_draw(self, *args, **kwargs):
        raise AssertionError(f"the copy drew initial values from {type(self).__name__}")

    for initializer in (keras.initializers.VarianceScaling, keras.initializers.RandomNormal):
        monkeypatch.setattr(initializer, "__call__", no_draw)  # he_normal is VarianceScaling
    with pytest.raises(AssertionError, match="drew initial values"):  # the patch bites
        build_model("deeplabv3plus-resnet10-cpu", 5)
    images = rng.uniform(0, 255, (1, 33, 41, 3)).astype("float32")
    # The network and bound of test_folded_copy_equals_the_model's second case.
    assert_close_relative(
        fold_batch_norm(model)(images, training=False),
        model(images, training=False),
        network_rtol(14, 9 * 128),
    )


def _aspp_implementations(model: keras.Model) -> set[str]:
    return {
        branch.conv.implementation
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, ASPP)
        for branch in layer.branches
        if isinstance(branch, ConvBNReLU) and branch.rate > 1
    }


@pytest.mark.parametrize("size", [(61, 47), (161, 129)])
def test_aspp_tap_by_tap_equals_the_model(size):
    """``fold_batch_norm`` with the ASPP's atrous branches as taps (what
    ``inference_copy`` runs in bfloat16): the model's logits up to float32 rounding, as
    in the test above (the taps reorder a branch's 9 x 128 terms, which the same bound
    covers). 61x47 gives a 4x3 map at OS16, where every tap of rates 6, 12 and 18 but
    the centre reads only padding; 161x129 an 11x9 map, where rate 6 reads inside it."""
    images = rng.uniform(0, 255, (2, *size, 3)).astype("float32")
    model = build_model("deeplabv3-resnet10-cpu", 5, upsample_logits=False)
    model = calibrate_batch_norm(model, images=images)
    copy = fold_batch_norm(model, aspp_implementation="taps")
    assert _aspp_implementations(model) == {"direct"} and _aspp_implementations(copy) == {"taps"}
    total = len(_batch_norm_weights(model)) // 4
    assert count_batch_norms(copy) == {"folded": total}
    expected = model(images, training=False)
    assert_close_relative(copy(images, training=False), expected, network_rtol(12, 9 * 128))


def test_inference_copy_runs_the_aspp_tap_by_tap_in_bfloat16_and_on_tensorflows_kernels():
    """float32 keeps the model's form where oneDNN runs it (this test runs with either
    kernels: NUMERICS)."""
    model = build_model("deeplabv3-resnet10-cpu", 5)
    float32 = "direct" if onednn_runs("float32") else "taps"
    assert _aspp_implementations(inference_copy(model)) == {float32}
    assert _aspp_implementations(inference_copy(model, "bfloat16")) == {"taps"}


@pytest.mark.parametrize("variant", ["deeplabv3-mobilenetv2-cpu", "deeplabv3plus-xception65"])
def test_every_batch_norm_of_the_backbones_is_folded(variant):
    """MobileNetV2 (depthwise convolutions and batch norms in a functional graph) and
    aligned Xception (atrous separable convolutions in one): nothing left to normalise."""
    model = build_model(variant, 5, upsample_logits=False)
    total = len(_batch_norm_weights(model)) // 4
    assert count_batch_norms(fold_batch_norm(model)) == {"folded": total}


def test_fold_against_numpy_and_what_stays():
    """The folded kernel is kernel * gamma / sqrt(var + eps) per output channel (a
    depthwise kernel's channel c * multiplier + m), the offset beta + (bias - mean)
    * that scale; a batch norm after a convolution whose output something else reads
    too, or after an activation, is left to normalise."""
    inputs = keras.Input((None, None, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)  # with a bias
    a = keras.layers.BatchNormalization(epsilon=1e-3, name="a_bn")(a)
    b = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False,
                                     name="b")(a)  # fmt: skip
    b = keras.layers.BatchNormalization(name="b_bn")(b)
    shared = keras.layers.Conv2D(8, 1, use_bias=False, name="shared")(b)
    kept = keras.layers.BatchNormalization(name="kept_bn")(shared)  # shared is read twice
    c = keras.layers.Conv2D(8, 1, activation="relu", name="c")(b)
    after_relu = keras.layers.BatchNormalization(name="after_relu_bn")(c)
    x = keras.layers.Add()([kept, shared, after_relu])
    x = ConvBNReLU(6, 3, rate=2, name="unit")(x)
    outputs = AtrousSeparableConv2D(5, rate=2, name="separable")(x)
    model = calibrate_batch_norm(keras.Model(inputs, outputs), size=24)
    folded = fold_batch_norm(model)

    assert count_batch_norms(folded) == {"folded": 5, "normalising": 2}
    assert not folded.get_layer("kept_bn").folded and not folded.get_layer("after_relu_bn").folded
    assert folded.get_layer("a").bias is None  # moved into a_bn's offset

    def scale(bn):
        return bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)

    a_bn, b_bn = model.get_layer("a_bn"), model.get_layer("b_bn")
    np.testing.assert_allclose(
        folded.get_layer("a").kernel.numpy(),
        model.get_layer("a").kernel.numpy() * scale(a_bn),
        rtol=1e-6,  # one float64 product rounded to float32
    )
    offset = a_bn.beta.numpy() + (model.get_layer("a").bias.numpy() - a_bn.moving_mean) * scale(
        a_bn
    )
    np.testing.assert_allclose(folded.get_layer("a_bn").beta.numpy(), offset, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        folded.get_layer("b").kernel.numpy(),
        model.get_layer("b").kernel.numpy() * scale(b_bn).reshape(4, 2),
        rtol=1e-6,
    )
    unit, separable = folded.get_layer("unit"), folded.get_layer("separable")
    assert unit.bn.folded and separable.depthwise_bn.folded and separable.pointwise_bn.folded
    np.testing.assert_allclose(
        separable.depthwise_kernel.numpy(),
        model.get_layer("separable").depthwise_kernel.numpy()
        * scale(model.get_layer("separable").depthwise_bn).reshape(-1, 1),
        rtol=1e-6,
    )
    images = rng.uniform(-1, 1, (2, 13, 17, 3)).astype("float32")
    # Eight layers in series at most, sums of up to 3x3x8 terms.
    assert_close_relative(
        folded(images, training=False), model(images, training=False), network_rtol(8, 72)
    )


@needs_bfloat16
def test_bfloat16_copy_computes_in_bfloat16_with_float32_variables():
    model = calibrate_batch_norm(
        build_model("deeplabv3plus-resnet10-cpu", 3, upsample_logits=False)
    )
    copy = fold_batch_norm(model, "bfloat16")
    assert keras.mixed_precision.global_policy().name == "float32"  # the caller's, restored
    policies = {layer.dtype_policy.name for layer in copy._flatten_layers(include_self=False)}
    assert policies == {"mixed_bfloat16"}
    assert {w.dtype for w in copy.weights} == {"float32"}
    assert copy(np.zeros((1, 32, 32, 3), "float32")).dtype == tf.bfloat16
    assert count_batch_norms(copy) == {"folded": 21}


@needs_bfloat16
def test_multi_scale_model_gets_a_folded_network():
    """The v2 multi-scale wrapper is copied around a folded copy of its network: the
    same fused logits up to float32 rounding, and bfloat16 arithmetic in bfloat16."""
    images = rng.uniform(0, 255, (2, 61, 47, 3)).astype("float32")
    base = calibrate_batch_norm(
        build_model("deeplabv3-resnet10-cpu", 3, upsample_logits=False), images=images
    )
    model = MultiScaleInputs(base, (1.0, 0.5), upsample_logits=False, name="msc")
    folded = fold_batch_norm(model)
    assert isinstance(folded, MultiScaleInputs) and folded.scales == model.scales
    assert count_batch_norms(folded) == {"folded": count_batch_norms(model)["normalising"]}
    # As test_folded_copy_equals_the_model: 12 layers in series, sums of 3x3x128 terms;
    # the max fusion and the resizes pass the differences on, never add to them. (Not
    # ``varies``: a random network's fused logits are mostly per-class offsets; an
    # unfolded or wrongly folded batch norm still moves them by far more than the bound.)
    assert_close_relative(
        folded(images, training=False),
        model(images, training=False),
        network_rtol(12, 9 * 128),
        varies=False,
    )
    in_bfloat16 = fold_batch_norm(model, "bfloat16")
    assert _policies(in_bfloat16.base) == {"mixed_bfloat16"}
    assert in_bfloat16(images).dtype == tf.float32  # the wrapper's fusion stays float32


def _policies(model: keras.Model) -> set[str]:
    return {
        layer.dtype_policy.name
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, (keras.layers.InputLayer, keras.Model))
    }


def _plain_convolutions() -> keras.Model:  # no batch norm: nothing to fold
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(3, 3, padding="same", name="b")(x))


@needs_bfloat16
@pytest.mark.parametrize("with_batch_norm", [False, True])
def test_model_trained_in_bfloat16_runs_float32(with_batch_norm):
    """A model trained under ``mixed_bfloat16`` keeps that policy: its float32 copies
    (``in_precision``, and the fold, even with no batch norm to fold) compute what the
    same weights compute in a model built in float32, and the Predictor's default
    precision runs it in float32, not in the bfloat16 it was trained in."""
    # As test_folded_copy_equals_the_model's (a single small image's batch statistics
    # make a random network that amplifies rounding beyond the per-layer bound).
    images = rng.uniform(0, 255, (2, 61, 47, 3)).astype("float32")

    def build():
        if not with_batch_norm:
            return _plain_convolutions()
        return build_model("deeplabv3-resnet10-cpu", 3, upsample_logits=False)

    reference = build()
    if with_batch_norm:
        calibrate_batch_norm(reference, images=images)
    mixed = trained_in_mixed_bfloat16(reference, build)
    assert _policies(mixed) == {"mixed_bfloat16"}
    expected = reference(images, training=False).numpy()
    # bfloat16 keeps 8 significant bits: far from float32's logits, so the checks below
    # tell the two apart.
    in_bfloat16 = mixed(images, training=False).numpy().astype("float32")
    assert np.abs(in_bfloat16 - expected).max() > 1e-3 * np.abs(expected).max()

    copy = in_precision(mixed, "float32")
    assert _policies(copy) == {"float32"} and _policies(mixed) == {"mixed_bfloat16"}
    # The same float32 ops on the same weights: equal up to the order of threaded sums.
    np.testing.assert_allclose(
        copy(images, training=False), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max()
    )
    assert in_precision(reference, "float32") is reference
    folded = fold_batch_norm(mixed)
    assert _policies(folded) == {"float32"}
    # As test_folded_copy_equals_the_model; the plain model: 2 layers, 3x3x8 terms.
    rtol = network_rtol(12, 9 * 128) if with_batch_norm else network_rtol(2, 9 * 8)
    assert_close_relative(folded(images, training=False), expected, rtol)
    assert (fold_batch_norm(reference) is reference) is not with_batch_norm

    predictor = Predictor(mixed)
    np.testing.assert_allclose(
        predictor.predict(images[0]),
        Predictor(reference).predict(images[0]),
        atol=model_probability_atol(reference, images, rtol),
    )
    # export.py's model.keras for apps is float32 too (README: Serving).
    assert _policies(keras_model_for_apps(predictor)) == {"float32"}


def test_unavailable_bfloat16_runs_float32_and_says_so(monkeypatch, caplog):
    reason = "this CPU has no bfloat16 instructions (AVX512_BF16, AMX-BF16 or Arm BF16)"
    monkeypatch.setattr("deeplab_tf.precision.bfloat16_unavailable", lambda: reason)
    assert resolve_precision("bfloat16") == (
        "float32", f"bfloat16 inference is not available: {reason}; running float32"
    )  # fmt: skip
    model = build_model("deeplabv3-resnet10-cpu", 3)
    with caplog.at_level(logging.WARNING, logger="deeplab_tf.inference"):
        predictor = Predictor(model, precision="bfloat16")
    assert predictor.precision == "float32" and predictor.settings()["precision"] == "float32"
    assert [r.getMessage() for r in caplog.records] == [predictor.precision_note]
    with pytest.raises(InferenceError, match="--precision must be one of"):
        Predictor(model, precision="float16")


def test_cpu_flags_of_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")  # fmt: skip
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(x86) == {"fpu", "avx512f", "amx_bf16", "avx512_bf16"}
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") is None


ISA_CAPS = [
    # (environment, CPU flags, fails, slow): what TensorFlow 2.21 does with a bfloat16
    # convolution under oneDNN's cap (tested for real on this machine's CPU below).
    ({}, {"avx512f", "avx512_bf16"}, False, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"avx512f", "avx512_bf16"}, True, True),
    ({"DNNL_MAX_CPU_ISA": "avx2_vnni"}, {"avx512f", "amx_bf16"}, True, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI_2"}, {"avx512f", "avx512_bf16"}, True, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI_2"}, {"avx_ne_convert", "avx512_bf16"}, False, True),
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, {"avx512f", "avx512_bf16"}, False, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, {"avx512f", "avx512_bf16"}, False, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, {"avx512f", "amx_bf16"}, False, False),
    # No AVX-512: TensorFlow keeps bfloat16 on its own (Eigen) kernels, which run.
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"avx2"}, False, True),
]


@pytest.mark.parametrize("environment, flags, fails, slow", ISA_CAPS)
def test_onednn_isa_cap_decides_bfloat16(monkeypatch, environment, flags, fails, slow):
    from tensorflow.python.util import _pywrap_util_port

    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(_pywrap_util_port, "IsMklEnabled", lambda: True)
    cannot_run = precision.bfloat16_cannot_run.__wrapped__()
    unavailable = precision.bfloat16_unavailable.__wrapped__()
    cap = "=".join(precision.onednn_isa_cap() or ())
    assert (cannot_run is not None) is fails and (unavailable is not None) is slow
    if fails:
        assert cannot_run.startswith(cap) and "bfloat16 convolutions" in cannot_run
    if slow and flags & precision.BFLOAT16_CPU_FLAGS:
        assert unavailable == f"{cap} keeps oneDNN below AVX512_CORE_BF16"
    monkeypatch.setattr(_pywrap_util_port, "IsMklEnabled", lambda: False)
    assert precision.bfloat16_cannot_run.__wrapped__() is None  # Eigen's kernels run it


_CONVOLVE_IN_BFLOAT16 = """
import json, tensorflow as tf
from deeplab_tf.precision import bfloat16_cannot_run
kernel = tf.ones([3, 3, 16, 16], tf.bfloat16)
convolve = tf.function(lambda x: tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME")))
try:
    convolve(tf.ones([1, 8, 8, 16], tf.bfloat16)).numpy()
    ran = True
except tf.errors.OpError:
    ran = False
print(json.dumps([ran, bfloat16_cannot_run()]))
"""


def test_bfloat16_cannot_run_says_what_tensorflow_does_on_this_cpu():
    """The rule above against TensorFlow itself: under each cap, a bfloat16 convolution
    fails exactly where ``bfloat16_cannot_run`` says it will (on a CPU without AVX-512,
    both say it runs)."""
    caps = ("AVX2", "AVX512_CORE")
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONVOLVE_IN_BFLOAT16],
            env={
                **os.environ,
                "ONEDNN_MAX_CPU_ISA": cap,
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "PYTHONPATH": str(ROOT),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for cap in caps
    ]
    for cap, run in zip(caps, runs, strict=True):
        ran, cannot_run = json.loads(run.communicate(timeout=120)[0].splitlines()[-1])
        assert ran is (cannot_run is None), (cap, cannot_run)
