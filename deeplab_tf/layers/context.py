"""The Yu-Koltun context module (ICLR 2016, section 3): dilated 3x3 convolutions with
the identity initialisation."""

from __future__ import annotations

import keras
import numpy as np
from keras import initializers, layers, ops

from deeplab_tf.layers.atrous import AtrousConv2D
from deeplab_tf.layers.base import check_choice, check_positive_int, register
from deeplab_tf.layers.normalization import PADDING_MODES, MarginPadding2D

CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
# Output channels of each layer as multiples of the input channels C (paper Table 1).
CONTEXT_WIDTHS = {
    "basic": (1, 1, 1, 1, 1, 1, 1, 1),
    "large": (2, 2, 4, 8, 16, 32, 32, 1),
}
# Receptive field 67 = 1 + 2 * sum(dilations): the input is padded by 33.
CONTEXT_MARGIN = sum(CONTEXT_DILATIONS)


@register
class ContextIdentity(initializers.Initializer):
    """Identity initialisation of a context-module convolution (Yu-Koltun, eqs. 4 and 5).

    For a kernel [k, k, c_in, c_out] in a module on C channels:
    k(t, a, b) = C / c_out where t is the centre tap and floor(a C / c_in) =
    floor(b C / c_out), else eps ~ N(0, sigma^2) with sigma = ``noise * C / c_out``.
    With c_in = c_out = C and no noise this is eq. 4 (each layer passes its input
    through); with widths multiple of C, eq. 5, which passes each input channel
    through the group of wider channels that descends from it, scaled so that the
    module's output at initialisation is its truncated input.

    Args:
        channels: C, the module's input (and output) channels.
        noise: sigma relative to C / c_out (the paper asks sigma << C / c_out).
        seed: seed of the noise.
    """

    def __init__(self, channels: int, noise: float = 0.0, seed: int | None = None):
        check_positive_int("channels", channels)
        self.channels = channels
        self.noise = float(noise)
        self.seed = seed

    def __call__(self, shape, dtype=None):
        k_h, k_w, c_in, c_out = shape
        c = self.channels
        if c_in % c or c_out % c:
            raise ValueError(f"channels {c} must divide c_in {c_in} and c_out {c_out}")
        value = c / c_out
        same_group = (np.arange(c_in)[:, None] * c // c_in) == (np.arange(c_out)[None] * c // c_out)
        kernel = np.zeros(shape, np.float32)
        kernel[k_h // 2, k_w // 2] = value * same_group
        dtype = dtype or "float32"
        if not self.noise:
            return ops.convert_to_tensor(kernel, dtype=dtype)
        noise = keras.random.normal(shape, stddev=self.noise * value, dtype=dtype, seed=self.seed)
        return ops.convert_to_tensor(kernel, dtype=dtype) + noise * (kernel == 0)

    def get_config(self):
        return {"channels": self.channels, "noise": self.noise, "seed": self.seed}


@register
class ContextModule(layers.Layer):
    """The context module of Yu & Koltun, "Multi-Scale Context Aggregation by Dilated
    Convolutions" (ICLR 2016), section 3 and Table 1.

    Seven 3x3 convolutions with dilations 1, 1, 2, 4, 8, 16, 1, each followed by
    ReLU, then a 1x1 convolution; no padding inside, the input is padded by 33
    (the receptive field is 67x67), so the output has the input's size and its C
    channels. Basic: C channels throughout (about 64 C^2 parameters); Large: 2C,
    2C, 4C, 8C, 16C, 32C, 32C, C. Identity initialisation (``ContextIdentity``,
    eqs. 4 and 5), zero biases: at initialisation the module returns max(x, 0)
    (Basic exactly; Large up to the noise that breaks ties between channels).

    Args:
        size: ``"basic"`` or ``"large"``.
        padding_mode: ``"zero"`` or ``"reflect"`` for the 33-pixel input margin (the
            paper found both similar).
        init_noise: Large: noise of eq. 5, relative to C / c_{i+1}.
        implementation: atrous implementation of the dilated convolutions.
    """

    def __init__(
        self,
        size: str = "basic",
        padding_mode: str = "zero",
        init_noise: float = 1e-3,
        implementation: str = "dilated",
        **kwargs,
    ):
        check_choice("size", size, tuple(CONTEXT_WIDTHS))
        check_choice("padding_mode", padding_mode, PADDING_MODES)
        super().__init__(**kwargs)
        self.size = size
        self.padding_mode = padding_mode
        self.init_noise = float(init_noise)
        self.implementation = implementation
        self.pad = MarginPadding2D(CONTEXT_MARGIN, mode=padding_mode, name="pad")
        self.convs = []

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: the channel dimension of the input must be known")
        noise = self.init_noise if self.size == "large" else 0.0
        widths = [channels * w for w in CONTEXT_WIDTHS[self.size]]
        kernel_sizes = (3,) * len(CONTEXT_DILATIONS) + (1,)
        rates = (*CONTEXT_DILATIONS, 1)
        shape = self.pad.compute_output_shape(input_shape)
        for index, (width, kernel_size, rate) in enumerate(
            zip(widths, kernel_sizes, rates, strict=True)
        ):
            conv = AtrousConv2D(
                width,
                kernel_size,
                rate=rate,
                implementation=self.implementation,
                padding="valid",
                kernel_initializer=ContextIdentity(channels, noise),
                name=f"conv{index + 1}" if index < len(CONTEXT_DILATIONS) else "final",
            )
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            self.convs.append(conv)

    def call(self, inputs):
        x = self.pad(inputs)
        for conv in self.convs[:-1]:
            x = ops.relu(conv(x))
        return self.convs[-1](x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "size": self.size,
            "padding_mode": self.padding_mode,
            "init_noise": self.init_noise,
            "implementation": self.implementation,
        }
