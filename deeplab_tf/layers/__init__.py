"""Layers of the DeepLab family, a module per family:

* ``normalization``: input normalisation, batch norm, margin padding;
* ``atrous``: atrous convolution (three implementations) and ``ConvBNReLU``;
* ``aspp``: v3's ASPP with image pooling;
* ``separable``: v3+'s atrous separable convolution;
* ``decoder``: v3+'s decoder;
* ``heads``: upsampling at the model's end and the fc heads' dropout;
* ``context``: the Yu-Koltun context module;
* ``base``: registration and argument checks.

Every layer stores each ``__init__`` argument as a public attribute of the same
name, returns exactly those arguments from ``get_config`` and is registered for
``.keras`` serialisation under the ``deeplab_tf`` package (the names of ``.keras``
files do not depend on the module a layer lives in).
"""

from deeplab_tf.layers.aspp import ASPP, ImagePooling
from deeplab_tf.layers.atrous import (
    ATROUS_IMPLEMENTATIONS,
    AtrousConv2D,
    ConvBNReLU,
    direct_atrous_conv2d,
    native_dilated_backprop_available,
)
from deeplab_tf.layers.context import (
    CONTEXT_DILATIONS,
    CONTEXT_MARGIN,
    CONTEXT_WIDTHS,
    ContextIdentity,
    ContextModule,
)
from deeplab_tf.layers.decoder import DECODER_CONVOLUTIONS, Decoder
from deeplab_tf.layers.heads import (
    FreezableDropout,
    ResizeBilinear,
    UpsampleAndCrop,
    resize_bilinear_aligned,
    resize_bilinear_half_pixel,
)
from deeplab_tf.layers.normalization import (
    IMAGENET_MEAN_RGB,
    NORMALIZATION_MEANS,
    NORMALIZATION_MODES,
    PADDING_MODES,
    FoldableBatchNormalization,
    MarginPadding2D,
    PixelNormalization,
    batch_norm,
    normalization_layer,
    normalization_mean,
    reflect_indices,
)
from deeplab_tf.layers.separable import (
    AtrousSeparableConv2D,
    depthwise_atrous_conv2d,
    fixed_padding,
    native_dilated_depthwise_available,
)

__all__ = [
    "ASPP",
    "ATROUS_IMPLEMENTATIONS",
    "CONTEXT_DILATIONS",
    "CONTEXT_MARGIN",
    "CONTEXT_WIDTHS",
    "DECODER_CONVOLUTIONS",
    "IMAGENET_MEAN_RGB",
    "NORMALIZATION_MEANS",
    "NORMALIZATION_MODES",
    "PADDING_MODES",
    "AtrousConv2D",
    "AtrousSeparableConv2D",
    "ContextIdentity",
    "ContextModule",
    "ConvBNReLU",
    "Decoder",
    "FoldableBatchNormalization",
    "FreezableDropout",
    "ImagePooling",
    "MarginPadding2D",
    "PixelNormalization",
    "ResizeBilinear",
    "UpsampleAndCrop",
    "batch_norm",
    "depthwise_atrous_conv2d",
    "direct_atrous_conv2d",
    "fixed_padding",
    "native_dilated_backprop_available",
    "native_dilated_depthwise_available",
    "normalization_layer",
    "normalization_mean",
    "reflect_indices",
    "resize_bilinear_aligned",
    "resize_bilinear_half_pixel",
]
