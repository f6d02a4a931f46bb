"""The DeepLabv3+ decoder (v3+ section 3.1): against numpy, its stride-4 grid against the
encoder's on every backbone, the v3+ models at odd sizes and every output stride, and
in the Predictor (output stride change, scales and flips)."""

import numpy as np
import pytest

from deeplab_tf import build_model, get_variant
from deeplab_tf.backbones import build_backbone
from deeplab_tf.backbones.features import feature_extractor, low_level_feature_name
from deeplab_tf.inference import Predictor, model_at_output_stride
from deeplab_tf.layers import Decoder
from deeplab_tf.variants import Variant
from tests.helpers import (
    assert_close_relative,
    calibrate_batch_norm,
    numpy_atrous_conv2d,
    run_layer_checks,
)
from tests.tolerances import model_probability_atol, network_rtol

rng = np.random.default_rng(0)


def numpy_resize_aligned(x: np.ndarray, size) -> np.ndarray:
    """Bilinear with corners aligned: output pixel i samples input coordinate
    i (h - 1) / (H - 1)."""

    def axis_weights(n_in, n_out):
        coordinate = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        low = np.minimum(np.floor(coordinate).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, coordinate - low

    (r0, r1, fr), (c0, c1, fc) = (
        axis_weights(x.shape[1], size[0]),
        axis_weights(x.shape[2], size[1]),
    )
    x = x.astype(np.float64)
    rows = x[:, r0] * (1 - fr)[None, :, None, None] + x[:, r1] * fr[None, :, None, None]
    return rows[:, :, c0] * (1 - fc)[None, None, :, None] + rows[:, :, c1] * fc[None, None, :, None]


def _bn_relu(x, bn):
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn.get_weights())
    return np.maximum((x - mean) / np.sqrt(var + bn.epsilon) * gamma + beta, 0)


@pytest.mark.parametrize(
    "encoder_size, low_level_size",
    # 4k + 1 (the stride-16 and stride-4 grids of a 16k + 1 image), and sizes that are not.
    [((7, 5), (25, 17)), ((6, 6), (24, 24)), ((3, 4), (11, 13))],
)
def test_decoder_matches_numpy(encoder_size, low_level_size):
    decoder = Decoder(filters=6, low_level_filters=3)
    encoder = rng.normal(size=(2, *encoder_size, 8)).astype("float32")
    low_level = rng.normal(size=(2, *low_level_size, 5)).astype("float32")
    decoder.build([encoder.shape, low_level.shape])
    for weights in decoder.weights:  # random batch norm statistics too
        values = rng.uniform(0.5, 1.5, weights.shape)
        weights.assign(values if "variance" in weights.path else values - 1.0)
    y = decoder([encoder, low_level], training=False)
    assert y.shape == (2, *low_level_size, 6)

    projection = decoder.low_level_projection
    low = _bn_relu(low_level @ np.asarray(projection.conv.kernel)[0, 0], projection.bn)
    x = np.concatenate([numpy_resize_aligned(encoder, low_level_size), low], axis=-1)
    for convolution in decoder.convolutions:
        x = _bn_relu(numpy_atrous_conv2d(x, np.asarray(convolution.conv.kernel), 1, "same"),
                     convolution.bn)  # fmt: skip
    # Float32 layers in series: the resize (4 terms), the projection (5), two 3x3
    # convolutions (9 x 11 and 9 x 6 terms), each with its batch norm.
    assert_close_relative(y, x, network_rtol(8, 9 * 11))


@pytest.mark.parametrize(
    "arch, kwargs",
    [("resnet10_cpu", {}), ("resnet50", {}), ("mobilenetv2", {"alpha": 0.35})],
)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_stride_4_grid_meets_the_encoder_grid(arch, kwargs, output_stride):
    """On a 16k + 1 image (97 x 65; 513 as the paper's crop) the encoder's pixel j and
    the low-level pixel i sit on image pixels output_stride j and 4 i, and the aligned
    resize maps i to encoder coordinate i (n_enc - 1) / (n_low - 1): the two grids meet
    exactly when output_stride (n_enc - 1) == 4 (n_low - 1). A map holding each
    encoder pixel's image coordinate, resized, then equals the low-level pixels' own."""
    backbone = build_backbone(arch, output_stride=output_stride, **kwargs)
    name = low_level_feature_name(backbone)
    extractor = feature_extractor(backbone, [name])
    x = np.zeros((1, 97, 65, 3), "float32")
    n_low = np.asarray(extractor(x)[name]).shape[1:3]
    n_enc = np.asarray(backbone(x)).shape[1:3]
    assert tuple(n_low) == (25, 17)
    for low, enc in zip(n_low, n_enc, strict=True):
        assert output_stride * (enc - 1) == 4 * (low - 1)
    rows = (np.arange(n_enc[0]) * output_stride)[None, :, None, None]
    coordinates = np.broadcast_to(rows, (1, n_enc[0], n_enc[1], 1)).astype("float32")
    upsampled = numpy_resize_aligned(coordinates, n_low)[0, :, 0, 0]
    np.testing.assert_allclose(upsampled, 4 * np.arange(n_low[0]), atol=1e-9)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_v3plus_model_at_odd_sizes_and_every_stride(output_stride):
    """keras-hub's segmenter fails at 513 x 513 with its decoder; ours takes odd sizes
    (513 is the paper's crop) at every encoder stride, logits at stride 4."""
    variant = get_variant("deeplabv3plus-resnet10-cpu")
    if output_stride == 32:  # resnet10_cpu stops at 16: the ResNet-50 model at 32
        variant = get_variant("deeplabv3plus-resnet50")
    model = build_model(variant, 3, output_stride=output_stride, upsample_logits=False)
    for size in ((513, 513), (97, 62)):
        logits = model(np.zeros((1, *size, 3), "float32"), training=False)
        assert logits.shape[1:3] == tuple(-(-s // 4) for s in size)
    full = build_model(variant, 3, output_stride=output_stride)
    assert full(np.zeros((1, 513, 513, 3), "float32")).shape == (1, 513, 513, 3)
    assert full.get_layer("decoder").convolutions[0].filters == variant.head_filters


def test_decoder_round_trip(tmp_path):
    decoder = Decoder(filters=4, low_level_filters=2, separable=True, implementation="direct")
    inputs = [rng.normal(size=(1, 3, 4, 5)).astype("float32"),
              rng.normal(size=(1, 9, 13, 3)).astype("float32")]  # fmt: skip
    run_layer_checks(decoder, inputs, tmp_path)
    assert [type(c).__name__ for c in decoder.convolutions] == ["AtrousSeparableConv2D"] * 2


def test_low_level_features_are_the_deepest_stride_4_output():
    assert low_level_feature_name(build_backbone("resnet50")) == "conv2_block3_out"
    assert low_level_feature_name(build_backbone("resnet10_cpu", 8)) == "conv3_block1_out"
    assert low_level_feature_name(build_backbone("mobilenetv2", alpha=0.35)) == "block_2_add"
    with pytest.raises(ValueError, match="decoder and separable go with the 'aspp' head"):
        Variant(name="x", backbone="vgg16", head="vgg_fc", head_rates=(12,), paper="-",
                decoder=True)  # fmt: skip


def test_v3plus_mobilenetv2_is_the_tf1_zoos():
    """TF1's MobileNetV2 model (model_zoo.md): no ASPP atrous branches, no decoder."""
    variant = get_variant("deeplabv3plus-mobilenetv2")
    assert (variant.decoder, variant.aspp_rates, variant.image_pooling) == (False, (), True)
    model = build_model(variant, 21, upsample_logits=False)
    aspp = model.get_layer("aspp")
    assert [b.name for b in aspp.branches] == ["branch_1x1", "image_pooling"]
    assert model(np.zeros((1, 513, 513, 3), "float32")).shape == (1, 33, 33, 21)


def test_v3plus_changes_output_stride_and_flips_in_the_predictor():
    """Trained at OS16, evaluated at OS8 with the same weights (v3+ section 4 follows
    v3's protocol): the encoder's rates change, the decoder's grid stays at stride 4;
    multi-scale inputs with flips are mirror-equivariant."""
    model = build_model("deeplabv3plus-resnet10-cpu", 3, output_stride=16)
    calibrate_batch_norm(model, images=rng.uniform(0, 255, (2, 45, 61, 3)).astype("float32"))
    image = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    rebuilt = model_at_output_stride(model, 8, upsample_logits=False)
    assert rebuilt.get_layer("aspp").rates == tuple(2 * r for r in model.get_layer("aspp").rates)
    assert rebuilt(image[None].astype("float32")).shape == (1, 12, 16, 3)  # stride 4
    for a, b in zip(rebuilt.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    os16, os8 = Predictor(model).predict(image), Predictor(model, output_stride=8).predict(image)
    assert os16.shape == os8.shape == (45, 61, 3)
    assert np.abs(os16 - os8).max() > 1e-3  # denser encoder features, other values

    predictor = Predictor(model, scales=(0.5, 1.0, 1.75), flip=True)
    p = predictor.predict(image)
    # Equal up to the network's float32 bound: a resized mirror is not bit-for-bit the
    # mirror of the resized image, and convolutions sum mirrored windows in another
    # order. resnet10_cpu's 12 layers and the decoder's two, sums of 9 x 128 terms.
    atol = model_probability_atol(model, image[None], network_rtol(14, 9 * 128))
    np.testing.assert_allclose(predictor.predict(image[:, ::-1])[:, ::-1], p, atol=atol)
