import itertools
import urllib.error

import keras
import numpy as np
import pytest

from deeplab_tf import backbones, build_model
from deeplab_tf.backbones import (
    OUTPUT_STRIDES,
    WeightsUnavailableError,
    build_backbone,
    feature_extractor,
    load_backbone_weights,
    transfer_weights,
)
from deeplab_tf.backbones.output_stride import stage_strides
from deeplab_tf.backbones.resnet import RESNET_UNITS
from tests.helpers import assert_close_relative, calibrate_batch_norm
from tests.tolerances import network_rtol

rng = np.random.default_rng(0)

# The float32 bound of each backbone (tests/tolerances.py): its convolutions in series
# and its longest sum. A finer output stride or another model computes the same sums
# with other kernels, in another order.
RTOL = {
    # stem + SHORT_RESNET50_UNITS' 7 bottleneck units x 3 convolutions; block4's 3x3 over
    # 512 channels
    "resnet50": network_rtol(1 + 7 * 3, 9 * 512),
    # and block5..block7, 3 units x 3 convolutions each
    "resnet50-cascade": network_rtol(1 + 7 * 3 + 27, 9 * 512),
    # stem + 17 inverted residuals x 3; the widest 1x1 (960 x 0.5 channels)
    "mobilenetv2": network_rtol(52, 480),
    # stem + 4 basic units x 2; a 3x3 over 128 channels
    "resnet10_cpu": network_rtol(9, 9 * 128),
    # stem + 33 bottleneck units x 3; block4's 3x3 over 512 channels
    "resnet101": network_rtol(100, 9 * 512),
}


# The consistency checks' ResNet-50: one unit in block1 and block2, two in block3 (the
# first holds the stride or its rate, the second the rate after it), block4's three (the
# multi-grid's); strides and rates are set per block, so the other units repeat what
# these check (ResNet-50 itself: the layout and weights tests below).
SHORT_RESNET50_UNITS = (1, 1, 2, 3)


class TestOutputStrideConsistency:
    """deeplab2's atrous-consistency test: same weights, the dense features at
    a finer output stride subsampled by 2 equal the features at the coarser one."""

    @pytest.fixture(autouse=True)
    def short_resnet50(self, monkeypatch):
        monkeypatch.setitem(RESNET_UNITS, "resnet50", SHORT_RESNET50_UNITS)

    @pytest.mark.parametrize(
        "arch, kwargs",
        [
            ("resnet50", {"multi_grid": (1, 2, 4)}),
            ("resnet50", {"multi_grid": (1, 2, 1), "cascade_blocks": 3}),
            ("mobilenetv2", {"alpha": 0.5}),
        ],
        ids=["resnet50-mg124", "resnet50-block7", "mobilenetv2"],
    )
    def test_finer_stride_subsampled_equals_coarser(self, arch, kwargs):
        cascade = "cascade_blocks" in kwargs
        rtol = RTOL["resnet50-cascade" if cascade else arch]
        # The cascade's rates double per block from the output stride on: 8 -> 16 checks
        # that as 16 -> 32 would, with a third fewer of the suite's largest models, on
        # one smaller image (its three extra 2048-wide blocks run at the finest stride).
        strides = (8, 16) if cascade else OUTPUT_STRIDES
        models = {os_: build_backbone(arch, output_stride=os_, **kwargs) for os_ in strides}
        calibrate_batch_norm(models[8])
        for os_ in strides[1:]:
            models[os_].set_weights(models[8].get_weights())
        # odd and non-square: the sizes where alignment mistakes show
        size = (65, 49) if cascade else (97, 75)
        x = rng.uniform(0, 255, size=(1 if cascade else 2, *size, 3)).astype("float32")
        features = {os_: np.asarray(m(x, training=False)) for os_, m in models.items()}
        for fine, coarse in itertools.pairwise(strides):
            assert features[fine].shape[1:3] == (-(-size[0] // fine), -(-size[1] // fine))
            assert_close_relative(features[fine][:, ::2, ::2], features[coarse], rtol=rtol)

    def test_resnet10_cpu_os8_subsampled_equals_os16(self):
        """resnet10_cpu reaches stride 16 at most; its strided 3x3 pads symmetrically."""
        models = {os_: build_backbone("resnet10_cpu", output_stride=os_) for os_ in (8, 16)}
        calibrate_batch_norm(models[8])
        models[16].set_weights(models[8].get_weights())
        x = rng.uniform(0, 255, size=(2, 97, 75, 3)).astype("float32")
        fine, coarse = (np.asarray(models[os_](x, training=False)) for os_ in (8, 16))
        assert fine.shape[1:3] == (13, 10) and coarse.shape[1:3] == (7, 5)
        assert_close_relative(fine[:, ::2, ::2], coarse, rtol=RTOL["resnet10_cpu"])


class TestResNet10CPU:
    def test_layout(self):
        """One basic unit per stage: two 3x3 convolutions, the first holding the stride
        (or, past the output stride, the rate of the grid it reads)."""
        model = build_backbone("resnet10_cpu", output_stride=8)
        convs = [layer for layer in model.layers if layer.name.endswith("_conv")]
        # stem, 2 per unit, projections where the width or the nominal stride changes
        assert len(convs) == 1 + 4 * 2 + 3
        assert [info.channels for info in model.feature_info] == [32, 32, 64, 128, 128]
        assert [info.reduction for info in model.feature_info] == [2, 2, 4, 8, 8]
        assert model.get_layer("conv5_block1_1_conv").rate == 1  # reads the stride-8 grid
        assert model.get_layer("conv5_block1_2_conv").rate == 2
        os16 = build_backbone("resnet10_cpu", output_stride=16)
        assert os16.get_layer("conv5_block1_1_conv").strides == (2, 2)
        assert os16.count_params() == model.count_params()

    def test_no_imagenet_weights_but_a_keras_file_fills_it(self, tmp_path):
        with pytest.raises(
            WeightsUnavailableError, match=r"resnet10_cpu has no keras\.applications"
        ):
            build_backbone("resnet10_cpu", weights="imagenet")
        source = build_backbone("resnet10_cpu")
        calibrate_batch_norm(source)
        path = tmp_path / "resnet10.keras"
        source.save(path)
        ours = build_backbone("resnet10_cpu", output_stride=16, weights=str(path))
        for a, b in zip(ours.get_weights(), source.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)

    def test_output_stride_32_is_refused(self):
        with pytest.raises(ValueError, match=r"resnet10_cpu supports output_stride \[8, 16\]"):
            build_backbone("resnet10_cpu", output_stride=32)


class TestResNet:
    def test_os32_reproduces_keras_applications_resnet101(self):
        """Our ResNet-101 with Keras's weights computes Keras's features, its convolutions'
        biases moved into the batch norms (ours have none)."""
        reference = keras.applications.ResNet101(weights=None, include_top=False)
        for layer in reference.layers:  # He-initialised biases are zero: make them count
            if isinstance(layer, keras.layers.Conv2D):
                layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape))
        calibrate_batch_norm(reference)  # the moving means then include the biases
        ours = build_backbone("resnet101", output_stride=32)
        report = transfer_weights(reference, ours)
        assert report.missing == [] and report.unused == []
        assert len(report.filled) == len([layer for layer in reference.layers if layer.weights])
        x = rng.uniform(0, 255, size=(1, 97, 129, 3)).astype("float32")
        expected = reference(keras.applications.resnet.preprocess_input(x.copy()), training=False)
        assert_close_relative(ours(x, training=False), expected, rtol=RTOL["resnet101"])

    @pytest.mark.parametrize(
        "output_stride, multi_grid, expected",
        [
            # DESIGN.md: OS16 -> block4 rate 2; OS8 -> block3 rate 2, block4 rate 4;
            # multi-grid multiplies the three units of block4: OS16, MG (1,2,4) -> (2,4,8).
            (16, (1, 2, 4), {"conv3": [1] * 4, "conv4": [1] * 23, "conv5": [2, 4, 8]}),
            (8, (1, 2, 4), {"conv3": [1] * 4, "conv4": [2] * 23, "conv5": [4, 8, 16]}),
            (32, (1, 2, 4), {"conv3": [1] * 4, "conv4": [1] * 23, "conv5": [1, 2, 4]}),
            (16, (1, 1, 1), {"conv3": [1] * 4, "conv4": [1] * 23, "conv5": [2, 2, 2]}),
        ],
    )
    def test_block_rates(self, output_stride, multi_grid, expected):
        model = build_backbone("resnet101", output_stride=output_stride, multi_grid=multi_grid)
        for stage, rates in expected.items():
            got = [model.get_layer(f"{stage}_block{i + 1}_2_conv").rate for i in range(len(rates))]
            assert got == rates, stage

    def test_cascaded_blocks_double_the_rate(self):
        """block5..7 are copies of block4 whose rates keep doubling (v3 section 3.2)."""
        model = build_backbone("resnet50", output_stride=16, multi_grid=(1, 2, 1), cascade_blocks=3)
        for stage, base in (("conv5", 2), ("conv6", 4), ("conv7", 8), ("conv8", 16)):
            rates = [model.get_layer(f"{stage}_block{i}_2_conv").rate for i in (1, 2, 3)]
            assert rates == [base, 2 * base, base]
            assert model.get_layer(f"{stage}_block1_0_conv").strides == (1, 1)
        assert model.output.shape[-1] == 2048

    def test_strides_become_rates_like_timm(self):
        """Without atrous the cascade would reach output stride 256 (v3 Table 1)."""
        schedule = stage_strides((1, 2, 2, 2, 2, 2, 2), output_stride=32, stem_stride=4)
        assert [s.stride for s in schedule] == [1, 2, 2, 2, 1, 1, 1]
        assert [s.rate for s in schedule] == [1, 1, 1, 1, 2, 4, 8]
        assert 4 * 2**6 == 256

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"arch": "resnet152"}, r"backbone must be one of \['resnet50', 'resnet101'"),
            (
                {"arch": "resnet50", "output_stride": 4},
                r"output_stride must be one of \[8, 16, 32\]",
            ),
            ({"arch": "resnet50", "multi_grid": (1, 2)}, "multi_grid must be 3 positive integer"),
            ({"arch": "resnet50", "cascade_blocks": 4}, r"cascade_blocks must be in 0..3"),
            ({"arch": "mobilenetv2", "alpha": 0}, "alpha must be a positive width multiplier"),
            ({"arch": "mobilenetv2", "cascade_blocks": 1}, "cascade_blocks applies to ResNet"),
        ],
    )
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            build_backbone(**kwargs)


class TestFeatureInfo:
    @pytest.mark.parametrize(
        "arch, output_stride",
        [("resnet50", 8), ("resnet50", 16), ("mobilenetv2", 8), ("mobilenetv2", 32)],
    )
    def test_matches_real_output_shapes(self, arch, output_stride):
        backbone = build_backbone(arch, output_stride=output_stride, alpha=0.35)
        x = np.zeros((1, 65, 49, 3), "float32")
        outputs = feature_extractor(backbone)(x)
        assert list(outputs) == [info.name for info in backbone.feature_info]
        for info in backbone.feature_info:
            y = outputs[info.name]
            assert y.shape == (1, -(-65 // info.reduction), -(-49 // info.reduction), info.channels)
        assert backbone.feature_info[-1].reduction == output_stride
        assert backbone.feature_info[-1].channels == backbone.output.shape[-1]


class TestWeights:
    def test_weights_file_round_trip(self, tmp_path):
        """A keras.applications weights file fills the backbone by layer name; each
        convolution's bias, which ours leave out, moves into the batch norm after it:
        moving mean m - b (exact: one float32 subtraction, done the same way here)."""
        source = keras.applications.ResNet50(weights=None, include_top=False)
        calibrate_batch_norm(source)
        for layer in source.layers:  # He-initialised biases are zero: make them count
            if isinstance(layer, keras.layers.Conv2D):
                layer.bias.assign(rng.normal(0, 1, layer.bias.shape))
        path = tmp_path / "resnet50_notop.weights.h5"
        source.save_weights(path)
        ours = build_backbone("resnet50", output_stride=16, weights=str(path))
        for prefix in ("conv1", "conv4_block6_2", "conv5_block3_3"):
            kernel, bias = source.get_layer(f"{prefix}_conv").get_weights()
            (ours_kernel,) = ours.get_layer(f"{prefix}_conv").get_weights()
            np.testing.assert_array_equal(ours_kernel, kernel)
            gamma, beta, mean, variance = source.get_layer(f"{prefix}_bn").get_weights()
            got = ours.get_layer(f"{prefix}_bn").get_weights()
            for a, b in zip(got, [gamma, beta, mean - bias, variance], strict=True):
                np.testing.assert_array_equal(a, b)
            assert np.abs(bias).max() > 0.1  # the moved bias is not nothing

    def test_a_bias_without_a_batch_norm_to_take_it_is_an_error(self):
        source = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 1, name="c")])
        target = keras.Sequential(
            [keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 1, use_bias=False, name="c")]
        )
        with pytest.raises(ValueError, match="'c' has no bias for the source's"):
            transfer_weights(source, target)

    def test_mobilenet_v2_fills_every_layer_but_the_last_conv(self):
        source = keras.applications.MobileNetV2(weights=None, include_top=False, alpha=0.5)
        ours = build_backbone("mobilenetv2", alpha=0.5)
        report = transfer_weights(source, ours)
        assert report.missing == []
        # DeepLab uses the 320-channel features, not keras's final 1280-channel conv
        assert report.unused == ["Conv_1", "Conv_1_bn"]
        # Before any stride-2 layer the two agree exactly (Conv1 is centred on even pixels
        # for odd sizes in both).
        x = rng.uniform(0, 255, size=(1, 33, 33, 3)).astype("float32")
        ref = keras.Model(source.input, source.get_layer("expanded_conv_project_BN").output)
        mine = keras.Model(ours.input, ours.get_layer("expanded_conv_project_BN").output)
        expected = ref(keras.applications.mobilenet_v2.preprocess_input(x.copy()))
        # Three layers in series (stem, depthwise, 1x1 projection), 27-term sums at most.
        assert_close_relative(mine(x), expected, rtol=network_rtol(3, 27))

    def test_report_lists_layers_it_could_not_fill(self, caplog):
        source = keras.applications.ResNet50(weights=None, include_top=False)
        ours = build_backbone("resnet50", cascade_blocks=1)
        report = transfer_weights(source, ours)
        assert report.missing and all(name.startswith("conv6_") for name in report.missing)
        assert "layers not filled" in caplog.text

    def test_shape_mismatch_names_the_layer(self):
        source = keras.applications.MobileNetV2(weights=None, include_top=False, alpha=0.35)
        ours = build_backbone("mobilenetv2", alpha=1.0)
        with pytest.raises(ValueError, match="layer 'Conv1': source weights have shapes"):
            transfer_weights(source, ours)

    def test_imagenet_offline_gives_a_clear_error(self, monkeypatch, tmp_path):
        """keras downloads the weights; offline that must be one clear error."""
        from keras.src.utils import file_utils

        def offline(*args, **kwargs):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

        monkeypatch.setattr(file_utils, "urlretrieve", offline)
        monkeypatch.setattr(file_utils.config, "keras_home", lambda: str(tmp_path))
        backbone = build_backbone("resnet50")
        with pytest.raises(WeightsUnavailableError, match="could not get the ImageNet weights"):
            load_backbone_weights(backbone, "resnet50", "imagenet")

    def test_missing_file(self, tmp_path):
        backbone = build_backbone("mobilenetv2", alpha=0.35)
        with pytest.raises(WeightsUnavailableError, match=r"file not found: .*nope\.h5"):
            load_backbone_weights(backbone, "mobilenetv2", tmp_path / "nope.h5", alpha=0.35)

    def test_bad_weights_fail_before_anything_is_built(self, monkeypatch, tmp_path):
        """A missing file, or ImageNet weights that keras.applications lacks: the error
        comes at once, not after a ResNet-101 (or VGG-16) has been made."""

        def no_build(*args, **kwargs):
            raise AssertionError("built before checking the weights")

        for builder in ("build_resnet", "build_xception65", "build_vgg16"):
            monkeypatch.setattr(backbones, builder, no_build)
        missing = tmp_path / "nope.h5"
        for variant in ("deeplabv3", "deeplabv1-largefov"):  # VGG's load after the build
            with pytest.raises(WeightsUnavailableError, match=r"file not found: .*nope\.h5"):
                build_model(variant, 21, backbone_weights=missing)
        with pytest.raises(WeightsUnavailableError, match=r"xception65 has no keras\.app"):
            build_backbone("xception65", weights="imagenet")
        with pytest.raises(AssertionError, match="built before"):  # the patch bites
            build_model("deeplabv3", 21)
