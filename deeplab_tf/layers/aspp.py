"""Atrous spatial pyramid pooling: v2's summed branches are built in ``model``; here v3's
``ASPP`` with batch norm and its ``ImagePooling`` branch, and v3+'s separable form."""

from __future__ import annotations

from collections.abc import Sequence

from keras import layers, ops

from deeplab_tf.layers.atrous import ConvBNReLU
from deeplab_tf.layers.base import check_positive_int, register
from deeplab_tf.layers.separable import AtrousSeparableConv2D


@register
class ImagePooling(layers.Layer):
    """Image-level features of the v3 ASPP (v3 paper section 3.3, Fig. 5).

    Global average pooling over the whole feature map, 1x1 convolution, batch
    norm, ReLU, then back to the feature map's runtime size. Bilinear upsampling
    of a 1x1 map is a broadcast, which is what is done, so any input size works,
    including maps larger than the training crop (the TF1 code pooled with a
    fixed window and broke there).

    Args:
        filters: output channels.
        bn_momentum, bn_epsilon, sync_batchnorm: batch norm settings.
    """

    def __init__(
        self,
        filters: int = 256,
        bn_momentum: float = 0.9997,
        bn_epsilon: float = 1e-5,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        check_positive_int("filters", filters)
        super().__init__(**kwargs)
        self.filters = filters
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.sync_batchnorm = sync_batchnorm
        self.project = ConvBNReLU(
            filters,
            1,
            bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon,
            sync_batchnorm=sync_batchnorm,
            name="project",
        )

    def build(self, input_shape):
        self.project.build((input_shape[0], 1, 1, input_shape[-1]))

    def call(self, inputs, training=None):
        pooled = ops.mean(inputs, axis=(1, 2), keepdims=True)
        pooled = self.project(pooled, training=training)
        shape = ops.shape(inputs)
        return ops.broadcast_to(pooled, (shape[0], shape[1], shape[2], self.filters))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "sync_batchnorm": self.sync_batchnorm,
        }


@register
class ASPP(layers.Layer):
    """Atrous Spatial Pyramid Pooling of DeepLab v3 (v3 paper section 3.3).

    Branches: one 1x1 convolution, one 3x3 atrous convolution per rate, and
    (optionally) image-level pooling; all ``filters`` wide with batch norm and
    ReLU. They are concatenated and projected by a 1x1 convolution with batch
    norm and ReLU, then optional dropout. The paper's rates are (6, 12, 18) at
    output stride 16 and doubled at output stride 8.

    Args:
        filters: width of every branch and of the projection (256 in the paper).
        rates: atrous rates of the 3x3 branches; () for none (TF1's MobileNetV2 model:
            the 1x1 and image-pooling branches only).
        image_pooling: whether to add the image-level branch.
        dropout: dropout rate after the projection (0 disables it).
        implementation: atrous implementation of the 3x3 branches.
        separable: the 3x3 branches as atrous separable convolutions
            (``AtrousSeparableConv2D``, v3+ section 3.1; TF1 ``aspp_with_separable_conv``).
        bn_momentum, bn_epsilon, sync_batchnorm: batch norm settings.
    """

    def __init__(
        self,
        filters: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        image_pooling: bool = True,
        dropout: float = 0.0,
        implementation: str = "dilated",
        separable: bool = False,
        bn_momentum: float = 0.9997,
        bn_epsilon: float = 1e-5,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        check_positive_int("filters", filters)
        rates = tuple(rates)
        for rate in rates:
            check_positive_int("each of rates", rate)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        super().__init__(**kwargs)
        self.filters = filters
        self.rates = rates
        self.image_pooling = image_pooling
        self.dropout = dropout
        self.implementation = implementation
        self.separable = separable
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.sync_batchnorm = sync_batchnorm

        norm = dict(bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, sync_batchnorm=sync_batchnorm)
        self.branches = [ConvBNReLU(filters, 1, name="branch_1x1", **norm)]
        # Branch names carry the index, not the rate: the rates change with the
        # output stride and the variables must not.
        branch = AtrousSeparableConv2D if separable else ConvBNReLU
        for index, rate in enumerate(rates):
            self.branches.append(
                branch(
                    filters,
                    3,
                    rate=rate,
                    implementation=implementation,
                    name=f"branch_3x3_{index + 1}",
                    **norm,
                )
            )
        if image_pooling:
            self.branches.append(ImagePooling(filters, name="image_pooling", **norm))
        self.projection = ConvBNReLU(filters, 1, name="projection", **norm)
        self.dropout_layer = layers.Dropout(dropout, name="dropout") if dropout else None

    def build(self, input_shape):
        for branch in self.branches:
            branch.build(input_shape)
        self.projection.build((*input_shape[:3], self.filters * len(self.branches)))

    def call(self, inputs, training=None):
        x = ops.concatenate([b(inputs, training=training) for b in self.branches], axis=-1)
        x = self.projection(x, training=training)
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "rates": list(self.rates),
            "image_pooling": self.image_pooling,
            "dropout": self.dropout,
            "implementation": self.implementation,
            "separable": self.separable,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "sync_batchnorm": self.sync_batchnorm,
        }
