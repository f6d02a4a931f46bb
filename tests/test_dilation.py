"""Yu-Koltun: context modules (identity init, receptive field), the front end, two stages."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import train
from deeplab_tf import build_model, get_variant
from deeplab_tf.inference import Predictor
from deeplab_tf.layers import (
    ContextIdentity,
    ContextModule,
    FreezableDropout,
    MarginPadding2D,
    UpsampleAndCrop,
    reflect_indices,
)
from deeplab_tf.recipes import get_recipe
from deeplab_tf.training import TrainConfig, TrainingError, check_config, compile_model
from tests.helpers import assert_close_relative, assert_same_weights, run_layer_checks
from tests.tolerances import network_rtol, sum_rtol

rng = np.random.default_rng(0)
# The front end's fc6/fc7 are 4096 wide (120M weights); the procedure tests run them 32
# wide, which changes nothing else (the real widths: tests/test_paper_variants.py).
NARROW = {"head_filters": 32}


class TestContextModule:
    def test_basic_at_initialisation_is_max_x_0(self):
        """Eq. 4 (identity) and ReLU after each layer: the module returns max(x, 0)."""
        x = rng.normal(size=(2, 23, 17, 21)).astype("float32")
        module = ContextModule("basic")
        np.testing.assert_array_equal(np.asarray(module(x)), np.maximum(x, 0))
        # Table 1: about 64 C^2 parameters (7 x 9 C^2 + C^2 kernels, plus 8 C biases).
        assert module.count_params() == 64 * 21 * 21 + 8 * 21

    def test_large_at_initialisation_is_close_to_max_x_0(self):
        x = rng.normal(size=(1, 23, 17, 21)).astype("float32")
        module = ContextModule("large")
        y = np.asarray(module(x))
        expected = np.maximum(x, 0)
        assert np.linalg.norm(y - expected) < 0.02 * np.linalg.norm(expected)
        assert [conv.filters for conv in module.convs] == [42, 42, 84, 168, 336, 672, 672, 21]

    def test_large_identity_kernels_follow_equation_5(self):
        """c_i = 2C -> c_{i+1} = 4C: output b takes C / 4C from the inputs a of its group."""
        c = 3
        kernel = np.asarray(ContextIdentity(c)((3, 3, 2 * c, 4 * c)))
        centre = kernel[1, 1]
        for a in range(2 * c):
            for b in range(4 * c):
                expected = 0.25 if a * c // (2 * c) == b * c // (4 * c) else 0.0
                assert centre[a, b] == expected
        assert not kernel[0].any() and not kernel[2].any()
        noisy = np.asarray(ContextIdentity(c, noise=0.01, seed=1)((3, 3, 2 * c, 4 * c)))
        off = noisy[0]
        assert 0 < np.std(off) < 0.01 * 0.25 * 1.5

    @pytest.mark.parametrize("size", ["basic", "large"])
    def test_receptive_field_is_67x67(self, size):
        """Gradients of one output pixel w.r.t. the input (positive weights and inputs,
        so no ReLU hides a path): Table 1's 67x67."""
        module = ContextModule(size)
        x = tf.constant(rng.uniform(0.5, 1.0, size=(1, 81, 81, 1)).astype("float32"))
        module.build(x.shape)
        for conv in module.convs:
            conv.kernel.assign(rng.uniform(0.1, 1.0, size=conv.kernel.shape).astype("float32"))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = module(x)[0, 40, 40, 0]
        grad = np.asarray(tape.gradient(y, x))[0, :, :, 0]
        rows, cols = np.nonzero(grad)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (7, 73, 7, 73)  # 40 -+ 33
        assert grad[7:74, 7:74].all()

    def test_layers_round_trip(self, tmp_path):
        run_layer_checks(
            ContextModule("large", padding_mode="reflect"),
            rng.normal(size=(1, 9, 7, 2)),
            tmp_path,
        )
        run_layer_checks(MarginPadding2D(5, multiple=4), rng.normal(size=(1, 6, 3, 2)), tmp_path)
        run_layer_checks(
            UpsampleAndCrop(8),
            [rng.normal(size=(1, 3, 2, 2)), rng.normal(size=(1, 20, 9, 1))],
            tmp_path,
        )
        run_layer_checks(FreezableDropout(0.5), rng.normal(size=(1, 4, 4, 2)), tmp_path)


def test_frozen_dropout_is_off():
    x = np.ones((1, 8, 8, 4), "float32")
    dropout = FreezableDropout(0.5, seed=1)
    assert (np.asarray(dropout(x, training=True)) == 0).any()
    dropout.trainable = False
    np.testing.assert_array_equal(np.asarray(dropout(x, training=True)), x)


class TestPadding:
    @pytest.mark.parametrize("size, pad", [(5, 3), (4, 11), (1, 4), (7, 186)])
    def test_reflection_matches_numpy_for_any_margin(self, size, pad):
        """numpy's 'reflect' (edge pixel not repeated) continues periodically past the size."""
        x = np.arange(size)
        expected = np.pad(x, (pad, pad + 2), mode="reflect") if size > 1 else np.zeros(2 * pad + 3)
        np.testing.assert_array_equal(x[reflect_indices(size, pad, pad + 2).numpy()], expected)

    def test_margin_padding_rounds_up_to_the_multiple(self):
        x = rng.normal(size=(1, 13, 16, 2)).astype("float32")
        y = np.asarray(MarginPadding2D(186, multiple=8)(x))
        assert y.shape == (1, 16 + 372, 16 + 372, 2)
        np.testing.assert_array_equal(y[:, 186:199, 186:202], x)
        zero = np.asarray(MarginPadding2D(3, mode="zero")(x))
        assert zero.shape == (1, 19, 22, 2) and not zero[:, :3].any()


def _upsample_half_pixel(y: np.ndarray, factor: int) -> np.ndarray:
    """numpy bilinear upsampling where input pixel j is the centre of output cells
    factor j .. factor j + factor - 1 (coordinates clamped at the borders)."""

    def along(axis, x):
        size = x.shape[axis]
        src = np.clip((np.arange(size * factor) + 0.5) / factor - 0.5, 0, size - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, size - 1)
        w = (src - low).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        return np.take(x, low, axis) * (1 - w) + np.take(x, high, axis) * w

    return along(2, along(1, y))


def _symmetrise(model):
    """Makes every kernel symmetric under a left-right flip."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and len(kernel.shape) == 4:
            value = np.asarray(kernel)
            kernel.assign((value + value[:, ::-1]) / 2)


class TestFrontEnd:
    @pytest.fixture(scope="class")
    def frontend(self):
        keras.utils.set_random_seed(0)
        variant = dataclasses.replace(get_variant("dilation-frontend"), **NARROW)
        model = build_model(variant, 3, upsample_logits=False)
        _symmetrise(model)
        return model

    @pytest.mark.parametrize("size", [(40, 24), (33, 17)])
    def test_no_padding_inside_and_ceil_h_over_8_outputs(self, frontend, size):
        backbone = frontend.get_layer("vgg16_frontend")
        assert all(
            getattr(layer, "padding", "valid") == "valid"
            for layer in backbone.layers + frontend.layers
        )
        out = [-(-s // 8) for s in size]
        # The 186-pixel margin is what the valid convolutions consume: conv5 leaves
        # ceil(H / 8) + 24, which fc6 (7x7, dilation 4) takes to ceil(H / 8).
        assert backbone.compute_output_shape((1, *size, 3)) == (1, out[0] + 24, out[1] + 24, 512)
        x = rng.uniform(0, 255, size=(1, *size, 3)).astype("float32")
        assert frontend(x).shape == (1, *out, 3)

    def test_output_is_aligned_with_the_image(self, frontend):
        """With left-right symmetric kernels, flipping the image flips the output: the
        output cells (8j .. 8j + 7) sit on the image with no offset."""
        x = rng.uniform(0, 255, size=(2, 24, 32, 3)).astype("float32")
        x[1] = x[0, :, ::-1]
        y = np.asarray(frontend(x))
        # Mirrored windows are summed in another order: the front end's float32 bound
        # (13 convolutions, fc6..fc8; fc6 sums 7x7x512 terms).
        assert_close_relative(y[1:], y[:1, :, ::-1], network_rtol(16, 49 * 512), varies=False)

    def test_the_output_stride_switch_keeps_the_alignment(self):
        """``--output-stride 8`` (its only stride) rebuilds the front end with its
        upsample-and-crop: the probabilities of the model as trained. Another stride is
        a one-line error naming the variant."""
        keras.utils.set_random_seed(0)
        variant = dataclasses.replace(get_variant("dilation-frontend"), **NARROW)
        model = build_model(variant, 3)  # with its upsample-and-crop, as training saves it
        # Untrained logits vary by about 1e-3: scaled to a few units, so that the
        # probabilities of neighbouring pixels differ and a shift shows.
        classifier = model.get_layer("logits")
        classifier.kernel.assign(classifier.kernel * 3000.0)
        image = rng.integers(0, 256, (37, 45, 3)).astype(np.uint8)
        native = Predictor(model).predict(image)
        rebuilt = Predictor(model, output_stride=8, variant=variant).predict(image)
        # The same layers and weights through the same kernels: equal up to the
        # softmax's last rounding (1e-6 is 8 eps at 1); a 3.5 px shift is far larger.
        np.testing.assert_allclose(rebuilt, native, atol=1e-6)
        with pytest.raises(ValueError, match="dilation-frontend runs at output stride 8 only"):
            Predictor(model, output_stride=16, variant=variant)

    def test_upsampling_puts_each_logit_at_its_cell_centre(self, tmp_path):
        logits = rng.normal(size=(1, 3, 5, 2)).astype("float32")
        image = np.zeros((1, 20, 37, 3), "float32")
        y = np.asarray(UpsampleAndCrop(8)([logits, image]))
        assert y.shape == (1, 20, 37, 2)
        expected = _upsample_half_pixel(logits, 8)[:, :20, :37]
        # 4-term float32 interpolation against float64.
        np.testing.assert_allclose(y, expected, atol=sum_rtol(4) * np.abs(logits).max())


def _tiny_batch(size=8, count=2):
    x = rng.uniform(0, 255, size=(count, size, size, 3)).astype("float32")
    y = rng.integers(0, 3, size=(count, size, size)).astype("int32")
    return x, y


class TestTwoStages:
    def test_context_trains_on_the_frozen_front_end(self, tmp_path):
        """Section 5: the front end is trained first; the context module is then trained
        on its outputs with the front end fixed (``--init-checkpoint FRONTEND``)."""
        keras.utils.set_random_seed(0)
        x, y = _tiny_batch()
        # The first stage as saved by train.py (its training: tests/test_paper_variants.py).
        front = dataclasses.replace(get_variant("dilation-frontend"), **NARROW)
        recipe = get_recipe("yu-koltun-frontend")
        stage1 = compile_model(TrainConfig(front, recipe, "unused"), num_classes=3)
        path = tmp_path / "front.keras"
        stage1.save(path)

        context = dataclasses.replace(get_variant("dilation-context-large"), **NARROW)
        recipe = dataclasses.replace(get_recipe("yu-koltun-context"), batch_size=2, steps=2)
        config = TrainConfig(context, recipe, "unused", init_checkpoint=str(path))
        check_config(config, replicas=1)
        stage2 = compile_model(config, num_classes=3)
        assert [v.path.split("/")[0] for v in stage2.trainable_variables] == ["context"] * 16
        context_before = [np.asarray(v) for v in stage2.get_layer("context").weights]
        # The frozen fc6/fc7 dropout is off (FreezableDropout): fixed front-end outputs.
        assert not stage2.get_layer("drop6").trainable and not stage2.get_layer("drop7").trainable
        stage2.fit(x, y, batch_size=2, epochs=1, verbose=0)
        for layer in stage1.layers:
            assert_same_weights(layer, stage2.get_layer(layer.name))
        changed = [
            not np.array_equal(a, np.asarray(b))
            for a, b in zip(context_before, stage2.get_layer("context").weights, strict=True)
        ]
        assert any(changed)

    def test_second_stage_needs_the_first(self, capsys, tmp_path):
        code = train.main(["--variant", "dilation-context-large", "--model-dir", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert "pass --init-checkpoint" in err and "context" in err

    def test_first_stage_must_be_a_front_end(self, tmp_path):
        """A DeepLab run is no front end: its fc6 is another convolution."""
        keras.utils.set_random_seed(0)
        largefov = dataclasses.replace(get_variant("deeplabv1-largefov"), **NARROW)
        path = tmp_path / "largefov.keras"
        build_model(largefov, 3).save(path)
        context = dataclasses.replace(get_variant("dilation-context-basic"), **NARROW)
        config = TrainConfig(context, get_recipe("yu-koltun-context"), "", init_checkpoint=path)
        with pytest.raises(TrainingError, match=r"largefov\.keras: layer 'fc6': source weights"):
            compile_model(config, num_classes=3)
