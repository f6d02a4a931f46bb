"""The DeepLabv3+ decoder (Chen et al. ECCV 2018, section 3.1 and Fig. 2): the encoder's
features upsampled to the backbone's stride-4 features and refined with them."""

from __future__ import annotations

from keras import layers, ops

from deeplab_tf.layers.atrous import ConvBNReLU
from deeplab_tf.layers.base import check_positive_int, register
from deeplab_tf.layers.heads import resize_bilinear_aligned
from deeplab_tf.layers.separable import AtrousSeparableConv2D

# The decoder's two 3x3 convolutions (section 3.1: "a few 3x3 convolutions", two in
# Table 2's best row and in the TF1 code's refine_by_decoder).
DECODER_CONVOLUTIONS = 2


@register
class Decoder(layers.Layer):
    """Inputs ``[encoder_features, low_level_features]``: the low-level features reduced
    by a 1x1 convolution (+ BN + ReLU) to ``low_level_filters`` channels (48: the
    paper's Table 1 choice, so that they do not outweigh the encoder's 256); the
    encoder features resized bilinearly (corners aligned, as the TF1 code) to their
    runtime size and concatenated with them; two 3x3 convolutions of ``filters``
    (+ BN + ReLU). The classifier and the upsampling to the image follow in the model.

    On inputs of size ``4k + 1`` (513 -> 129) the stride-4 and stride-16 maps both sit
    on image pixels (a multiple of their stride), so the aligned resize is exact
    interpolation between the encoder's pixels; any other size works too.

    Args:
        filters: width of the 3x3 convolutions (256).
        low_level_filters: width of the low-level projection (48).
        separable: the 3x3 convolutions as atrous separable convolutions (the paper's
            Xception model; TF1 ``decoder_use_separable_conv``).
        implementation: atrous implementation (rate 1 here: only the choice of kernels).
        bn_momentum, bn_epsilon, sync_batchnorm: batch norm settings.
    """

    def __init__(
        self,
        filters: int = 256,
        low_level_filters: int = 48,
        separable: bool = False,
        implementation: str = "dilated",
        bn_momentum: float = 0.9997,
        bn_epsilon: float = 1e-5,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        check_positive_int("filters", filters)
        check_positive_int("low_level_filters", low_level_filters)
        super().__init__(**kwargs)
        self.filters = filters
        self.low_level_filters = low_level_filters
        self.separable = separable
        self.implementation = implementation
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.sync_batchnorm = sync_batchnorm
        norm = dict(bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, sync_batchnorm=sync_batchnorm)
        self.low_level_projection = ConvBNReLU(
            low_level_filters, 1, name="low_level_projection", **norm
        )
        convolution = AtrousSeparableConv2D if separable else ConvBNReLU
        self.convolutions = [
            convolution(filters, 3, implementation=implementation, name=f"conv{i + 1}", **norm)
            for i in range(DECODER_CONVOLUTIONS)
        ]

    def build(self, input_shape):
        encoder_shape, low_level_shape = input_shape
        self.low_level_projection.build(low_level_shape)
        channels = encoder_shape[-1] + self.low_level_filters
        for convolution in self.convolutions:
            convolution.build((*low_level_shape[:3], channels))
            channels = self.filters

    def call(self, inputs, training=None):
        encoder, low_level = inputs
        low_level = self.low_level_projection(low_level, training=training)
        size = ops.shape(low_level)[1:3]
        upsampled = ops.cast(resize_bilinear_aligned(ops.cast(encoder, "float32"), size),
                             low_level.dtype)  # fmt: skip
        x = ops.concatenate([upsampled, low_level], axis=-1)
        for convolution in self.convolutions:
            x = convolution(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[1][:3], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "low_level_filters": self.low_level_filters,
            "separable": self.separable,
            "implementation": self.implementation,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "sync_batchnorm": self.sync_batchnorm,
        }
