"""Aligned Xception-65 (v3+ section 3.2, TF1 ``xception_65``): its size from the layer
table, output-stride consistency, the rates TF1 gives each block, weights by file."""

import itertools

import numpy as np
import pytest

from deeplab_tf import build_model, get_variant
from deeplab_tf.backbones import WeightsUnavailableError, build_backbone
from deeplab_tf.backbones.features import low_level_feature_name
from tests.helpers import assert_close_relative, calibrate_batch_norm
from tests.tolerances import network_rtol

rng = np.random.default_rng(0)

# TF1 xception_65_factory's table: (three separable widths, shortcut) per block, after
# a stem of 3x3 convolutions of 32 and 64.
TABLE = [
    ((128, 128, 128), "conv"),
    ((256, 256, 256), "conv"),
    ((728, 728, 728), "conv"),
    *[((728, 728, 728), "sum")] * 16,
    ((728, 1024, 1024), "conv"),
    ((1536, 1536, 2048), "none"),
]
# Float32 bound: the stem, 21 blocks x 3 separable convolutions (a depthwise and a
# pointwise each) in series; the longest sum a pointwise over 1536 channels.
RTOL = network_rtol(2 + 21 * 3 * 2, 1536)


def _table_parameters() -> int:
    """Weights of the table: a separable C -> D is 9 C depthwise + C D pointwise, a
    batch norm 4 per channel (gamma, beta, moving mean and variance), no biases."""

    def bn(c):
        return 4 * c

    total = 3 * 3 * 3 * 32 + bn(32) + 3 * 3 * 32 * 64 + bn(64)
    channels = 64
    for depths, shortcut in TABLE:
        block_in = channels
        for depth in depths:
            total += 9 * channels + bn(channels) + channels * depth + bn(depth)
            channels = depth
        if shortcut == "conv":
            total += block_in * depths[-1] + bn(depths[-1])
    return total


def test_parameter_count_is_the_layer_tables():
    model = build_backbone("xception65")
    assert model.count_params() == _table_parameters() == 38_052_512
    assert model.output.shape[-1] == 2048


@pytest.mark.parametrize(
    "output_stride, rates",
    # (stride of entry_flow_block3's last convolution, middle-flow rate, exit block 1's
    # rate and stride, exit block 2's rates with multi-grid (1, 2, 4)): TF1
    # stack_blocks_dense keeps the rate of the block that stops striding and passes the
    # stride on as a rate to the blocks after it.
    [(32, (2, 1, 1, 2, (1, 2, 4))), (16, (2, 1, 1, 1, (2, 4, 8))), (8, (1, 2, 2, 1, (4, 8, 16)))],
)
def test_strides_become_rates_as_tf1_stacks_them(output_stride, rates):
    model = build_backbone("xception65", output_stride=output_stride, multi_grid=(1, 2, 4))
    entry3 = model.get_layer("entry_flow_block3_separable_conv3")
    middle = model.get_layer("middle_flow_block7_separable_conv2")
    exit1 = model.get_layer("exit_flow_block1_separable_conv3")
    exit2 = [model.get_layer(f"exit_flow_block2_separable_conv{i}") for i in (1, 2, 3)]
    assert (entry3.strides, middle.rate, exit1.rate, exit1.strides) == rates[:4]
    assert tuple(layer.rate for layer in exit2) == rates[4]
    assert all(layer.relu for layer in exit2)  # ReLU inside only in the last block
    assert not middle.relu


def test_finer_stride_subsampled_equals_coarser():
    """deeplab2's atrous-consistency test, as for the ResNets: the same weights at output
    strides 8, 16 and 32, the finer features subsampled by 2 equal the coarser ones."""
    models = {os_: build_backbone("xception65", output_stride=os_) for os_ in (8, 16, 32)}
    calibrate_batch_norm(models[8])
    for os_ in (16, 32):
        models[os_].set_weights(models[8].get_weights())
    size = (97, 75)  # odd and non-square
    x = rng.uniform(0, 255, size=(1, *size, 3)).astype("float32")
    features = {os_: np.asarray(m(x, training=False)) for os_, m in models.items()}
    for fine, coarse in itertools.pairwise((8, 16, 32)):
        assert features[fine].shape[1:3] == (-(-size[0] // fine), -(-size[1] // fine))
        assert_close_relative(features[fine][:, ::2, ::2], features[coarse], rtol=RTOL)


def test_no_imagenet_weights_but_a_keras_file_fills_it(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"xception65 has no keras\.applications"):
        build_backbone("xception65", weights="imagenet")
    source = build_backbone("xception65", output_stride=32)
    path = tmp_path / "xception65.keras"
    source.save(path)
    ours = build_backbone("xception65", output_stride=8, weights=str(path))
    for a, b in zip(ours.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_v3plus_xception_model():
    """The v3+ Xception model: the decoder on the second separable convolution of
    entry_flow/block2 (TF1 DECODER_END_POINTS), separable ASPP and decoder, 513 in."""
    variant = get_variant("deeplabv3plus-xception65")
    assert (variant.backbone, variant.decoder, variant.separable) == ("xception65", True, True)
    backbone = build_backbone("xception65")
    assert low_level_feature_name(backbone) == "entry_flow_block2_separable_conv2"
    model = build_model(variant, 21, upsample_logits=False)
    assert model(np.zeros((1, 513, 513, 3), "float32")).shape == (1, 129, 129, 21)
    assert type(model.get_layer("aspp").branches[1]).__name__ == "AtrousSeparableConv2D"
