"""Atrous (dilated) convolution, ``AtrousConv2D``, in four implementations that share
weights, and ``ConvBNReLU``."""

from __future__ import annotations

import functools

import tensorflow as tf
from keras import initializers, layers, ops, regularizers

from deeplab_tf.layers.base import check_choice, check_positive_int, register
from deeplab_tf.layers.normalization import batch_norm
from deeplab_tf.precision import onednn_enabled, onednn_runs

ATROUS_IMPLEMENTATIONS = ("dilated", "space_to_batch", "direct", "taps")


@functools.cache
def native_dilated_backprop_available(dtype: str = "float32") -> bool:
    """Whether this TensorFlow build differentiates ``conv2d(dilations>1)`` in ``dtype``
    natively.

    oneDNN and GPUs do; TensorFlow's own CPU kernels raise "Current CPU implementations
    do not yet support dilation rates larger than 1" in the backward pass. Those run
    where oneDNN is off (``TF_ENABLE_ONEDNN_OPTS=0``, and by default on CPUs without
    AVX-512 VNNI/BF16, AVX-VNNI or AMX) and, with it on, bfloat16 on CPUs without
    AVX-512 (``precision.onednn_runs``). Asked of the build and the CPU rather than by
    running the op: a failing op logs an error line through TensorFlow's C++ logging,
    which a user reads as a crash.
    """
    if tf.config.list_physical_devices("GPU"):
        return True
    if onednn_enabled() is None:  # a TensorFlow that does not say: run the ops themselves
        return _dilated_backprop_runs(dtype)
    return onednn_runs(dtype)


def _dilated_backprop_runs(dtype: str = "float32") -> bool:
    # Run the two backward ops themselves: init_scope (eager, even when called
    # while tracing a graph) pauses gradient tapes.
    with tf.init_scope():
        dilated = dict(strides=[1, 1, 1, 1], padding="SAME", dilations=[1, 2, 2, 1])
        try:
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=[1, 5, 5, 1],
                filter=tf.zeros([3, 3, 1, 1], dtype),
                out_backprop=tf.zeros([1, 5, 5, 1], dtype),
                **dilated,
            )
            tf.raw_ops.Conv2DBackpropFilter(
                input=tf.zeros([1, 5, 5, 1], dtype),
                filter_sizes=[3, 3, 1, 1],
                out_backprop=tf.zeros([1, 5, 5, 1], dtype),
                **dilated,
            )
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            return False
    return True


def direct_atrous_conv2d(x, kernel, rate: int, padding: str, native_backprop: bool | None = None):
    """``tf.nn.conv2d(..., dilations=rate)`` that can always be differentiated.

    Where the backward kernels lack dilation support (TensorFlow's own CPU kernels), the
    gradient is taken tap by tap (``_tap_gradients``) where ``_taps_gradient`` says so,
    else from space-to-batch (``tf.nn.atrous_conv2d``), a mathematically equal form of
    the same convolution; there the forward pass goes tap by tap too where
    ``_taps_forward`` says so.
    """
    padding = padding.upper()
    if native_backprop is None:
        native_backprop = native_dilated_backprop_available(tf.as_dtype(x.dtype).name)
    if rate == 1 or native_backprop:
        return tf.nn.conv2d(x, kernel, strides=1, padding=padding, dilations=rate)

    @tf.custom_gradient
    def conv(x, kernel):
        if _taps_forward(x.shape, kernel.shape, rate, padding):
            y = taps_atrous_conv2d(x, kernel, rate, padding)
        else:
            y = tf.nn.conv2d(x, kernel, strides=1, padding=padding, dilations=rate)

        def grad(dy):
            if _taps_gradient(x.shape, kernel.shape, rate):
                return _tap_gradients(x, kernel, dy, rate, padding)
            with tf.GradientTape() as tape:
                tape.watch([x, kernel])
                equal = tf.nn.atrous_conv2d(x, kernel, rate, padding)
            return tape.gradient(equal, [x, kernel], output_gradients=dy)

        return y, grad

    return conv(x, kernel)


# Multiply-adds per image above which the fallback gradient goes tap by tap: its extra
# ops, about ten per tap, cost about a millisecond, what 1e8 multiply-adds take.
TAPS_GRADIENT_MIN_MACS = 1e8
# Space-to-batch splits the map into rate x rate sub-maps, each padded by k - 1: from
# sub-maps this wide the padding is a few percent and its native kernels are the
# faster (2x129x129x512 -> 512, rate 2: 3.3 s against 4.3 s tap by tap; 2x65x65x256
# -> 256, rate 2: 233 against 183 ms; README, Benchmarks).
SPACE_TO_BATCH_GRADIENT_MIN_SUBMAP = 64


def _taps_gradient(x_shape, kernel_shape, rate: int) -> bool:
    """Whether the fallback gradient goes tap by tap: sizes known, large enough for
    arithmetic, not op count, to set its time, and a rate large against the map, where
    space-to-batch convolves mostly padding (TensorFlow's own kernels, 2x33x33x2048 ->
    256, forward + backward: rate 18 8.6 s against 0.21 s tap by tap)."""
    _, height, width, _ = x_shape
    if height is None or width is None:
        return False
    if min(height, width) >= SPACE_TO_BATCH_GRADIENT_MIN_SUBMAP * rate:
        return False
    return _macs_per_image(x_shape, kernel_shape) >= TAPS_GRADIENT_MIN_MACS


def _macs_per_image(x_shape, kernel_shape) -> int:
    """Multiply-adds per image of a stride-1 convolution, counted at every input pixel
    (exact for 'same' padding, an upper bound for 'valid')."""
    _, height, width, _ = x_shape
    kh, kw, channels, filters = kernel_shape
    return kh * kw * height * width * channels * filters


# Share of a 'same' dilated kernel's reads that fall in the zero padding from which
# TensorFlow's own kernels compute it faster tap by tap (``sum_of_taps``). Forward,
# 2x33x33 and 2x65x65 maps (README, Benchmarks): 4-8% padding reads ran 0.86-1.0x tap
# by tap, 15.5-16% 1.04-1.10x, the ASPP's 23-60% 1.06-2.4x.
TAPS_FORWARD_MIN_PADDING_READS = 0.12


def _taps_forward(x_shape, kernel_shape, rate: int, padding: str) -> bool:
    """Whether the fallback's forward pass goes tap by tap: 'same' padding, sizes known,
    large enough for arithmetic to set its time (``TAPS_GRADIENT_MIN_MACS``) and at
    least ``TAPS_FORWARD_MIN_PADDING_READS`` of the dilated kernel's reads in the
    padding, which the taps skip."""
    _, height, width, _ = x_shape
    if padding != "SAME" or height is None or width is None:
        return False
    if _macs_per_image(x_shape, kernel_shape) < TAPS_GRADIENT_MIN_MACS:
        return False
    kh, kw = kernel_shape[:2]
    inside = 1.0
    for size, k in ((height, kh), (width, kw)):
        windows = _tap_windows(size, size, k, rate, (k - 1) * rate // 2)
        inside *= sum(max(0, stop - start) for _, start, stop, _ in windows) / (k * size)
    return 1 - inside >= TAPS_FORWARD_MIN_PADDING_READS


def _tap_windows(in_size: int, out_size: int, k: int, rate: int, before: int):
    """Per kernel index i along one axis: (i, start, stop, shift), output positions
    [start, stop) reading input positions [start + shift, stop + shift), all inside
    the input (static sizes)."""
    for i in range(k):
        shift = i * rate - before
        yield i, max(0, -shift), min(out_size, in_size - shift), shift


def _tap_gradients(x, kernel, dy, rate: int, padding: str) -> list[tf.Tensor]:
    """Gradients of ``conv2d(x, kernel, dilations=rate, padding)`` for ``dy``, one
    kernel tap at a time over the pixels it reads inside the image: the kernel
    gradient of tap k is one matrix product, x[window_k]^T dy[window], and the input
    gradient the sum over taps of dy[window] kernel[k]^T put back at the tap's place,
    summed in float32 whatever the compute dtype (as ``sum_of_taps``). No tap reads
    padding, which space-to-batch and dilated kernels convolve."""
    kh, kw, channels, filters = kernel.shape
    _, height, width, _ = x.shape
    out_h, out_w = dy.shape[1], dy.shape[2]
    same = padding == "SAME"
    before_h, before_w = ((kh - 1) * rate // 2, (kw - 1) * rate // 2) if same else (0, 0)
    kernel_taps = []
    dx = tf.zeros_like(x, tf.float32)
    for i, top, bottom, dy_shift in _tap_windows(height, out_h, kh, rate, before_h):
        for j, left, right, dx_shift in _tap_windows(width, out_w, kw, rate, before_w):
            if bottom <= top or right <= left:  # the tap reads only padding
                kernel_taps.append(tf.zeros([channels, filters], kernel.dtype))
                continue
            rows, cols = (
                slice(top + dy_shift, bottom + dy_shift),
                slice(left + dx_shift, right + dx_shift),
            )
            window = dy[:, top:bottom, left:right, :]
            window_rows = tf.reshape(window, [-1, filters])
            inputs = tf.reshape(x[:, rows, cols, :], [-1, channels])
            kernel_taps.append(tf.matmul(inputs, window_rows, transpose_a=True))
            back = tf.matmul(window_rows, kernel[i, j], transpose_b=True)
            back = tf.reshape(back, tf.concat([tf.shape(window)[:3], [channels]], 0))
            dx += tf.pad(
                tf.cast(back, tf.float32),
                [[0, 0], [rows.start, height - rows.stop], [cols.start, width - cols.stop], [0, 0]],
            )
    dkernel = tf.reshape(tf.stack(kernel_taps), kernel.shape)
    return [tf.cast(dx, x.dtype), dkernel]


def sum_of_taps(x, kernel, rate: int, padding: str, tap, channels: int) -> tf.Tensor:
    """y[p] = sum_k tap(x[p + rate k - before], kernel[k]) at stride 1, one kernel tap
    at a time over the part of the image that the tap reads inside it.

    Each tap is a product over channels (``tap(crop, kernel[i:i+1, j:j+1])`` of a crop
    [n, h', w', C]: a 1x1 convolution, or a per-channel product for depthwise kernels)
    of the input rows and columns it reads, written back at its place in the
    ``channels``-wide output. Where the atrous rate is large against the map, as in the
    ASPP, most of a dilated kernel's reads are padding, which dilated kernels still pay
    for (see README, Benchmarks). Taps are summed in float32 whatever the compute dtype,
    so that bfloat16 rounds once per tap and not per partial sum.
    """
    k_h, k_w = kernel.shape[0], kernel.shape[1]
    n, h, w, depth = tf.unstack(tf.shape(x))
    same = padding.lower() == "same"
    shrink_h, shrink_w = (0, 0) if same else ((k_h - 1) * rate, (k_w - 1) * rate)
    out_h, out_w = h - shrink_h, w - shrink_w
    before_h, before_w = ((k_h - 1) * rate // 2, (k_w - 1) * rate // 2) if same else (0, 0)
    # Every tap's window at once, in vector ops: no tf.cond per tap (its two function
    # branches made tracing a model seconds slower) and a few ops in all rather than a
    # dozen per tap. Output rows [top, bottom) read input rows [top + dy, bottom + dy)
    # in [0, h), none (top == bottom) where the tap reads only padding.
    dy = tf.constant([i * rate - before_h for i in range(k_h) for _ in range(k_w)])
    dx = tf.constant([j * rate - before_w for _ in range(k_h) for j in range(k_w)])
    top = tf.clip_by_value(-dy, 0, out_h)
    bottom = tf.clip_by_value(h - dy, top, out_h)
    left = tf.clip_by_value(-dx, 0, out_w)
    right = tf.clip_by_value(w - dx, left, out_w)
    zeros, ones = tf.zeros_like(dy), tf.ones_like(dy)
    # A tap that reads only padding still convolves one row or column, clamped into the
    # map, and keeps none of it: TensorFlow's convolutions return the wrong shape
    # (oneDNN) or an uninitialised kernel gradient (Eigen) for an empty crop.
    begins = tf.stack(
        [zeros, tf.clip_by_value(top + dy, 0, h - 1), tf.clip_by_value(left + dx, 0, w - 1), zeros],
        1,
    )
    crop_sizes = tf.stack(
        [n * ones, tf.maximum(bottom - top, 1), tf.maximum(right - left, 1), depth * ones], 1
    )
    kept_sizes = tf.stack([n * ones, bottom - top, right - left, channels * ones], 1)
    paddings = tf.stack(
        [
            tf.stack(pair, 1)
            for pair in (
                [zeros, zeros],
                [top, out_h - bottom],
                [left, out_w - right],
                [zeros, zeros],
            )
        ],
        1,
    )
    # The taps' kernels [1, 1, C, F] in one Unpack: its gradient is one Pack, not a
    # kernel-sized StridedSliceGrad per tap.
    tap_kernels = tf.unstack(tf.reshape(kernel, [k_h * k_w, 1, 1, *kernel.shape[2:]]))
    origin = tf.zeros([4], tf.int32)
    products = [
        tf.pad(
            tf.cast(tf.slice(tap(tf.slice(x, begin, size), one), origin, kept), tf.float32), pads
        )
        for begin, size, kept, pads, one in zip(
            tf.unstack(begins),
            tf.unstack(crop_sizes),
            tf.unstack(kept_sizes),
            tf.unstack(paddings),
            tap_kernels,
            strict=True,
        )
    ]
    total = tf.cast(tf.add_n(products), x.dtype)
    if x.shape.rank == 4:  # the sizes are tensors: restore what is known statically
        known = [
            None if size is None else size - shrink
            for size, shrink in zip(x.shape[1:3], (shrink_h, shrink_w), strict=True)
        ]
        total.set_shape([x.shape[0], *known, channels])
    return total


def taps_atrous_conv2d(x, kernel, rate: int, padding: str) -> tf.Tensor:
    """``tf.nn.conv2d(x, kernel, dilations=rate)`` as a sum of 1x1 convolutions
    (``sum_of_taps``)."""

    def tap(crop, tap_kernel):
        return tf.nn.conv2d(crop, tap_kernel, strides=1, padding="VALID")

    return sum_of_taps(x, kernel, rate, padding, tap, kernel.shape[-1])


@register
class AtrousConv2D(layers.Layer):
    """Atrous (dilated) 2-D convolution, y[i] = sum_k x[i + rate * k] w[k].

    Four numerically equal implementations (DESIGN.md, Atrous convolution):
    ``"dilated"`` (Keras ``ops.conv`` with ``dilation_rate``), ``"space_to_batch"``
    (``tf.nn.atrous_conv2d``, the method of the v2 paper section 3.1),
    ``"direct"`` (``tf.nn.conv2d(..., dilations=rate)``, run natively by oneDNN
    and cuDNN) and ``"taps"`` (one 1x1 convolution per kernel tap over the pixels
    it reads inside the image, ``sum_of_taps``: the fastest where the rate is large
    against the feature map, as in the ASPP). The variables (``kernel``, ``bias``) are
    the same as Keras ``Conv2D``'s, so weights move between the two by layer name,
    and do not depend on ``rate``: a model rebuilt at another output stride loads the
    same weights.

    Args:
        filters: number of output channels.
        kernel_size: the square kernel's size; with 'same' padding an even size (the v1
            4x4 fc6) is centred when (kernel_size - 1) * rate is even.
        rate: dilation rate; the effective kernel size is k + (k - 1)(rate - 1).
        implementation: one of ``ATROUS_IMPLEMENTATIONS``.
        padding: ``"same"`` or ``"valid"``.
        use_bias: whether to add a bias.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer: as in ``keras.layers.Conv2D``.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 3,
        rate: int = 1,
        implementation: str = "dilated",
        padding: str = "same",
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        check_positive_int("filters", filters)
        check_positive_int("kernel_size", kernel_size)
        check_positive_int("rate", rate)
        check_choice("implementation", implementation, ATROUS_IMPLEMENTATIONS)
        check_choice("padding", padding, ("same", "valid"))
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.rate = rate
        self.implementation = implementation
        self.padding = padding
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.input_spec = layers.InputSpec(ndim=4)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: the channel dimension of the input must be known")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.kernel_size, self.kernel_size, channels, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )

    def call(self, inputs):
        kernel = ops.cast(self.kernel, self.compute_dtype)
        if self.implementation == "dilated":
            y = ops.conv(inputs, kernel, strides=1, padding=self.padding, dilation_rate=self.rate)
        elif self.implementation == "space_to_batch":
            y = tf.nn.atrous_conv2d(inputs, kernel, self.rate, self.padding.upper())
        elif self.implementation == "taps" and self.rate > 1:
            y = taps_atrous_conv2d(inputs, kernel, self.rate, self.padding)
        else:
            y = direct_atrous_conv2d(inputs, kernel, self.rate, self.padding)
        if self.use_bias:
            y = y + ops.cast(self.bias, self.compute_dtype)
        return y

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        if self.padding == "valid":
            shrink = (self.kernel_size - 1) * self.rate
            h = None if h is None else h - shrink
            w = None if w is None else w - shrink
        return (n, h, w, self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "rate": self.rate,
            "implementation": self.implementation,
            "padding": self.padding,
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
        }


@register
class ConvBNReLU(layers.Layer):
    """Convolution (no bias), batch norm, ReLU: the unit of every v3 head branch.

    Args:
        filters, kernel_size, rate, implementation: as in ``AtrousConv2D``.
        bn_momentum, bn_epsilon, sync_batchnorm: batch norm settings.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int = 1,
        rate: int = 1,
        implementation: str = "dilated",
        bn_momentum: float = 0.9997,
        bn_epsilon: float = 1e-5,
        sync_batchnorm: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.rate = rate
        self.implementation = implementation
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.sync_batchnorm = sync_batchnorm
        self.conv = AtrousConv2D(
            filters,
            kernel_size,
            rate=rate,
            implementation=implementation,
            use_bias=False,
            kernel_initializer="he_normal",
            name="conv",
        )
        self.bn = batch_norm("bn", bn_momentum, bn_epsilon, sync_batchnorm)

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.bn.build(self.conv.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        return ops.relu(self.bn(self.conv(inputs), training=training))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "rate": self.rate,
            "implementation": self.implementation,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "sync_batchnorm": self.sync_batchnorm,
        }
