"""``build_model``: a variant as a ``keras.Model`` from RGB pixels to per-pixel logits.

Contract: input [N, H, W, 3] RGB pixels in [0, 255] of any H, W (the backbone's
normalisation is inside the model); backbone -> head -> classifier ``logits`` at
ceil(H / output_stride) -> bilinear upsampling to H x W. Heads: v3 ASPP or none
(then a 1x1 classifier), v1/v2 VGG fc6-fc7-classifier branches or v2 atrous
classifiers (summed when several), plus DeepLab-MSc features or a Yu-Koltun
context module; v2 MSC wraps the whole network (``MultiScaleInputs``). Every
classifier layer is named ``logits`` or ``logits_*`` (``classifier_layer_names``).
The variables do not depend on the output stride, so weights trained at one
stride load unchanged into the model built at another (v3 paper section 4.1).
"""

from __future__ import annotations

import dataclasses
import os

import keras
from keras import layers

from deeplab_tf.backbones import build_backbone, check_output_stride, check_weights
from deeplab_tf.backbones.features import DECODER_STRIDE, low_level_feature_name
from deeplab_tf.backbones.vgg import (
    FRONTEND_STRIDE,
    VGG_BACKBONES,
    load_vgg16_weights,
    vgg_fc_layers,
)
from deeplab_tf.layers import (
    ASPP,
    AtrousConv2D,
    ContextModule,
    Decoder,
    ResizeBilinear,
    UpsampleAndCrop,
)
from deeplab_tf.multiscale import MultiScaleInputs, single_scale_model
from deeplab_tf.variants import Variant, get_variant

# The fastest numerically equal atrous implementation on oneDNN CPUs
# (README, bench/atrous.py); all three give the same output and gradients.
DEFAULT_ATROUS_IMPLEMENTATION = "direct"


def check_variant_output_stride(variant: Variant, output_stride: int) -> None:
    """ValueError naming the variant if it cannot run at ``output_stride``: the VGG-16
    networks (v1/v2, Yu-Koltun) have pool4/pool5 and fc6 built for stride 8 only."""
    check_output_stride(output_stride)
    if variant.backbone in VGG_BACKBONES and output_stride != 8:
        raise ValueError(
            f"{variant.name} runs at output stride 8 only (VGG-16 as the v1/v2 and "
            f"Yu-Koltun papers built it), got output stride {output_stride}"
        )


def build_model(
    variant: str | Variant,
    num_classes: int,
    output_stride: int | None = None,
    backbone_weights: str | os.PathLike | None = None,
    upsample_logits: bool = True,
    atrous_implementation: str = DEFAULT_ATROUS_IMPLEMENTATION,
    bn_momentum: float = 0.9997,
    sync_batchnorm: bool = False,
    aspp_dropout: float = 0.0,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
) -> keras.Model:
    """Builds a segmentation model.

    Args:
        variant: a name in ``VARIANTS`` or a ``Variant``.
        num_classes: number of classes (logit channels).
        output_stride: 8, 16 or 32; default: the variant's (training) stride.
        backbone_weights: ``None``, ``"imagenet"`` or a weights file path (see
            ``deeplab_tf.backbones.load_backbone_weights``; VGG variants also get
            fc6/fc7 from ImageNet's fc1/fc2, ``vgg.load_vgg16_weights``).
        upsample_logits: return logits at the input size (True) or at
            ceil(input / output_stride) (False).
        atrous_implementation: one of ``ATROUS_IMPLEMENTATIONS`` (``deeplab_tf.layers``).
        bn_momentum: batch norm decay (0.9997 in the v3 paper).
        sync_batchnorm: synchronise batch statistics across replicas.
        aspp_dropout: dropout after the ASPP projection.
        input_shape: (H, W, 3); None for any size (MSC variants take any size).

    Example:
        >>> model = build_model("deeplabv3-mobilenetv2", num_classes=21)
        >>> model(np.zeros((1, 513, 513, 3))).shape
        TensorShape([1, 513, 513, 21])
    """
    if isinstance(variant, str):
        variant = get_variant(variant)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    output_stride = variant.output_stride if output_stride is None else output_stride
    check_variant_output_stride(variant, output_stride)
    check_weights(variant.backbone, backbone_weights)  # a bad one fails before any building
    variant = dataclasses.replace(variant, output_stride=output_stride)

    if variant.input_scales:
        # v2 MSC: the single-scale network, shared by every scale.
        base = build_model(
            dataclasses.replace(variant, name=f"{variant.name}_single_scale", input_scales=()),
            num_classes,
            output_stride=output_stride,
            backbone_weights=backbone_weights,
            upsample_logits=False,
            atrous_implementation=atrous_implementation,
            bn_momentum=bn_momentum,
            sync_batchnorm=sync_batchnorm,
            aspp_dropout=aspp_dropout,
        )
        return MultiScaleInputs(base, variant.input_scales, upsample_logits, name=variant.name)

    vgg = variant.backbone in VGG_BACKBONES
    inputs = keras.Input(shape=input_shape, name="image")
    backbone = build_backbone(
        variant.backbone,
        output_stride=output_stride,
        multi_grid=variant.multi_grid,
        cascade_blocks=variant.cascade_blocks,
        alpha=variant.alpha,
        implementation=atrous_implementation,
        bn_momentum=bn_momentum,
        sync_batchnorm=sync_batchnorm,
        input_shape=input_shape,
        weights=None if vgg else backbone_weights,  # VGG: below, with fc6/fc7
        msc_taps=variant.multiscale_features,
    )
    if variant.decoder:  # the backbone also returns its stride-4 features
        low_level = backbone.get_layer(low_level_feature_name(backbone)).output
        backbone = keras.Model(backbone.input, [backbone.output, low_level], name=backbone.name)
        x, low_level = backbone(inputs)
    else:
        x = backbone(inputs)
    if variant.multiscale_features:
        x, *taps = x
    rates = variant.head_rates_at(output_stride)
    if variant.head == "vgg_fc":
        logits = _vgg_fc_head(x, variant, rates, num_classes, atrous_implementation)
    elif variant.head == "atrous_logits":
        logits = _atrous_logits_head(x, variant, rates, num_classes, atrous_implementation)
    else:
        if variant.head == "aspp":
            x = ASPP(
                filters=variant.head_filters,
                rates=variant.aspp_rates_at(output_stride),
                image_pooling=variant.image_pooling,
                dropout=aspp_dropout,
                implementation=atrous_implementation,
                separable=variant.separable,
                bn_momentum=bn_momentum,
                sync_batchnorm=sync_batchnorm,
                name="aspp",
            )(x)
        if variant.decoder:
            x = Decoder(
                filters=variant.head_filters,
                low_level_filters=variant.decoder_low_level_filters,
                separable=variant.separable,
                implementation=atrous_implementation,
                bn_momentum=bn_momentum,
                sync_batchnorm=sync_batchnorm,
                name="decoder",
            )([x, low_level])
        logits = layers.Conv2D(num_classes, 1, name="logits")(x)
    if variant.multiscale_features:
        logits = _add_multiscale_features(logits, taps, num_classes)
    if variant.context_module != "none":
        logits = ContextModule(
            variant.context_module, implementation=atrous_implementation, name="context"
        )(logits)
    if upsample_logits:
        if variant.backbone == "vgg16_frontend":  # logit j covers pixels 8j .. 8j + 7
            logits = UpsampleAndCrop(FRONTEND_STRIDE, name="upsample")([logits, inputs])
        else:
            logits = ResizeBilinear(name="upsample")([logits, inputs])
    model = keras.Model(inputs, logits, name=variant.name)
    if vgg and backbone_weights is not None:
        load_vgg16_weights(model, backbone, backbone_weights)
    return model


# Small Gaussian initialisation of the v1/v2 classifiers, so that they start near the
# uniform prediction; the Yu-Koltun code uses 0.001 for its front end's classifier.
CLASSIFIER_STDDEV = 0.01
FRONTEND_CLASSIFIER_STDDEV = 0.001
# DeepLab-MSc: the MLP inputs (vgg.MSC_TAPS) and the strides of their first
# convolution, which bring each to the output stride 8.
MSC_BRANCHES = (("image", 8), ("pool1", 4), ("pool2", 2), ("pool3", 1), ("pool4", 1))
MSC_FILTERS = 128


def _summed_branches(branches: list, name: str):
    return branches[0] if len(branches) == 1 else layers.Add(name=name)(branches)


def _branch_suffix(rates: tuple[int, ...], index: int) -> str:
    return "" if len(rates) == 1 else f"_{index + 1}"


def _vgg_fc_head(x, variant: Variant, rates, num_classes: int, implementation: str):
    """fc6 -> fc7 -> classifier per rate, summed (v1: one branch; v2 ASPP-S/L: four)."""
    frontend = variant.backbone == "vgg16_frontend"
    stddev = FRONTEND_CLASSIFIER_STDDEV if frontend else CLASSIFIER_STDDEV
    branches = []
    for index, rate in enumerate(rates):
        suffix = _branch_suffix(rates, index)
        h = vgg_fc_layers(
            x,
            variant.head_kernel_size,
            rate,
            variant.head_filters,
            padding="valid" if frontend else "same",
            implementation=implementation,
            suffix=suffix,
        )
        classifier = layers.Conv2D(
            num_classes,
            1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=stddev),
            name=f"logits{suffix}",
        )
        branches.append(classifier(h))
    return _summed_branches(branches, "logits")


def _atrous_logits_head(x, variant: Variant, rates, num_classes: int, implementation: str):
    """One atrous convolution straight to the classes per rate, summed (v2 on ResNet-101)."""
    branches = [
        AtrousConv2D(
            num_classes,
            variant.head_kernel_size,
            rate=rate,
            implementation=implementation,
            kernel_initializer=keras.initializers.RandomNormal(stddev=CLASSIFIER_STDDEV),
            name=f"logits{_branch_suffix(rates, index)}",
        )(x)
        for index, rate in enumerate(rates)
    ]
    return _summed_branches(branches, "logits")


def _add_multiscale_features(logits, taps, num_classes: int):
    """DeepLab-MSc (v1 section 4.3): a two-layer MLP (128 3x3, then 128 1x1) on the image
    and on pool1..pool4, 5 x 128 = 640 channels concatenated with fc7 before the
    classifier. A classifier on [fc7, msc] is the sum of one on fc7 (``logits``, as in
    the first stage) and one on msc (``logits_msc``, initialised to zero, so training
    starts from the first stage's predictions)."""
    features = []
    for (name, stride), tap in zip(MSC_BRANCHES, taps, strict=True):
        # Pad 1 then a valid strided 3x3: ceil(H / 8) outputs centred on pixels 8j.
        h = layers.ZeroPadding2D(1, name=f"msc_{name}_pad")(tap)
        h = layers.Conv2D(
            MSC_FILTERS,
            3,
            strides=stride,
            activation="relu",
            kernel_initializer="he_normal",
            name=f"msc_{name}_conv1",
        )(h)
        h = layers.Conv2D(
            MSC_FILTERS,
            1,
            activation="relu",
            kernel_initializer="he_normal",
            name=f"msc_{name}_conv2",
        )(h)
        features.append(h)
    h = layers.Concatenate(name="msc_features")(features)
    msc_logits = layers.Conv2D(num_classes, 1, kernel_initializer="zeros", name="logits_msc")(h)
    return layers.Add(name="logits_with_msc")([logits, msc_logits])


def added_layer_names(variant: str | Variant) -> tuple[str, ...]:
    """The layers ``variant`` adds to the network it is trained from in a second stage:
    DeepLab-MSc's MLPs and their classifier (from a DeepLab-LargeFOV run; v1 section
    4.3), the Yu-Koltun context module (from a front-end run; section 5); () otherwise.

    A recipe with ``train_only_new_layers`` trains only these, and an
    ``--init-checkpoint`` need not hold them.
    """
    if isinstance(variant, str):
        variant = get_variant(variant)
    names: tuple[str, ...] = ()
    if variant.multiscale_features:
        for name, _ in MSC_BRANCHES:
            names += (f"msc_{name}_conv1", f"msc_{name}_conv2")
        names += ("logits_msc",)
    if variant.context_module != "none":
        names += ("context",)
    return names


def classifier_layer_names(model: keras.Model) -> list[str]:
    """The model's classifier layers: those named ``logits`` or ``logits_*`` that hold
    weights (v1/v2 give them 10x the learning rate). For the Yu-Koltun context
    variants this is the front end's classifier, the context module's input."""
    return [
        layer.name
        for layer in single_scale_model(model).layers
        if layer.weights and (layer.name == "logits" or layer.name.startswith("logits_"))
    ]


def describe_model(
    variant: str | Variant,
    num_classes: int,
    output_stride: int | None = None,
    input_size: tuple[int, int] = (513, 513),
) -> str:
    """A readable report of a variant: its settings, paper, layers, parameters and
    the logits' size for one ``input_size`` image (built and run on zeros)."""
    if isinstance(variant, str):
        variant = get_variant(variant)
    model = build_model(variant, num_classes, output_stride=output_stride, upsample_logits=False)
    lines = [f"{model.name}: {variant.paper}"]
    for field in dataclasses.fields(variant):
        if field.name not in ("name", "paper"):
            lines.append(f"  {field.name}: {getattr(variant, field.name)}")
    model.summary(print_fn=lambda line, **_: lines.append(line))
    logits = model(keras.ops.zeros((1, *input_size, 3)), training=False)
    stride = output_stride or variant.output_stride
    where = f"stride {DECODER_STRIDE} (decoder; encoder at output stride {stride})" if (
        variant.decoder
    ) else f"output stride {stride}"  # fmt: skip
    lines.append(
        f"input {input_size[0]}x{input_size[1]} -> logits {logits.shape[1]}x{logits.shape[2]}"
        f"x{logits.shape[3]} at {where} (upsampled to the input size in the model)"
    )
    return "\n".join(lines)


# Tensors of more elements than this overflow TensorFlow's int32 index arithmetic in
# several CPU kernels (reshape, resize): a clear error before, not a crash inside.
MAX_TENSOR_ELEMENTS = 2**31 - 1


def activation_elements(
    variant: str | Variant, num_classes: int, output_stride: int, size: tuple[int, int]
) -> tuple[int, int]:
    """(sum, largest) of the elements of every layer output of one image of ``size``
    through ``variant`` (nested models included; a multi-scale model's network at
    scale 1 only, and not the inside of composite layers such as ASPP): a lower bound
    on what one forward pass keeps for the backward pass, per image."""
    if isinstance(variant, str):
        variant = get_variant(variant)
    variant = dataclasses.replace(variant, input_scales=())
    model = build_model(variant, num_classes, output_stride, input_shape=(*size, 3))
    total, largest = 0, 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        try:
            outputs = keras.tree.flatten(layer.output)
        except (AttributeError, ValueError):  # a layer inside a composite one: no node
            continue
        for output in outputs:
            elements = 1
            for dim in output.shape[1:]:
                elements *= int(dim)
            total += elements
            largest = max(largest, elements)
    return total, largest
