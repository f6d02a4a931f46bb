"""Times the atrous convolution implementations (not a test).

    python bench/atrous.py [--repeats 7] [--implementations dilated,space_to_batch,direct,taps]
    python bench/atrous.py --precision bfloat16 --implementations direct,taps
    python bench/atrous.py --implementations direct --batch 2 --fallback-gradient space_to_batch

Prints one JSON line per (shape, rate, implementation, pass): the median
milliseconds of ``--repeats`` runs after one warm-up, for the forward pass and
for forward + backward (gradients of input and kernel). Where TensorFlow's kernels
have no dilated backprop (``native_dilated_backprop`` false in each line), ``direct``
takes its gradient from an equal form: ``--fallback-gradient`` picks it (``auto``: the
rule ``direct_atrous_conv2d`` applies; ``taps`` or ``space_to_batch`` for every case).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf

import deeplab_tf.layers.atrous
from bench.machine import describe_machine
from deeplab_tf.layers import (
    ATROUS_IMPLEMENTATIONS,
    AtrousConv2D,
    native_dilated_backprop_available,
)
from deeplab_tf.precision import DTYPE_POLICIES

# (input shape, output channels, rates): the ASPP branches of DeepLab v3 on a 513 crop
# at OS8 (rates 12, 24, 36; 6 and 18 as well) and OS16, and rate-2 blocks of a ResNet.
CASES = (
    ((1, 65, 65, 2048), 256, (6, 12, 18, 24, 36)),
    ((1, 33, 33, 2048), 256, (6, 12, 18)),
    ((1, 129, 129, 512), 512, (2,)),
    ((1, 65, 65, 256), 256, (2,)),
    ((1, 33, 33, 512), 512, (2, 4, 8)),
)
# Each fallback gradient form's (TAPS_GRADIENT_MIN_MACS, SPACE_TO_BATCH_GRADIENT_MIN_SUBMAP):
# "auto" keeps direct_atrous_conv2d's rule, the others take one form everywhere.
FALLBACK_GRADIENTS = {
    "auto": (
        deeplab_tf.layers.atrous.TAPS_GRADIENT_MIN_MACS,
        deeplab_tf.layers.atrous.SPACE_TO_BATCH_GRADIENT_MIN_SUBMAP,
    ),
    "taps": (0, float("inf")),
    "space_to_batch": (float("inf"), 0),
}


def _median_ms(fn, repeats: int) -> float:
    fn()  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--implementations", default=",".join(ATROUS_IMPLEMENTATIONS))
    parser.add_argument("--precision", choices=list(DTYPE_POLICIES), default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--fallback-gradient", choices=list(FALLBACK_GRADIENTS), default="auto")
    args = parser.parse_args(argv)
    (
        deeplab_tf.layers.atrous.TAPS_GRADIENT_MIN_MACS,
        deeplab_tf.layers.atrous.SPACE_TO_BATCH_GRADIENT_MIN_SUBMAP,
    ) = FALLBACK_GRADIENTS[args.fallback_gradient]
    machine = describe_machine()
    native = native_dilated_backprop_available(args.precision)
    devices = [d.device_type for d in tf.config.list_physical_devices()]
    for shape, filters, rates in CASES:
        shape = (args.batch, *shape[1:])
        x = tf.random.normal(shape)
        for rate in rates:
            for implementation in args.implementations.split(","):
                layer = AtrousConv2D(
                    filters,
                    3,
                    rate=rate,
                    implementation=implementation,
                    dtype=DTYPE_POLICIES[args.precision],
                )
                layer.build(shape)

                @tf.function
                def forward(layer=layer, x=x):
                    return layer(x)

                @tf.function
                def forward_backward(layer=layer, x=x):
                    with tf.GradientTape() as tape:
                        tape.watch(x)
                        loss = tf.reduce_sum(layer(x))
                    return tape.gradient(loss, [x, layer.kernel])

                for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
                    ms = _median_ms(
                        lambda fn=fn: [t.numpy() for t in tf.nest.flatten(fn())], args.repeats
                    )
                    print(
                        json.dumps(
                            {
                                "case": f"{'x'.join(map(str, shape))}->{filters}",
                                "rate": rate,
                                "implementation": implementation,
                                "pass": name,
                                "precision": args.precision,
                                "native_dilated_backprop": native,
                                "fallback_gradient": args.fallback_gradient,
                                "median_ms": round(ms, 2),
                                "repeats": args.repeats,
                                "devices": devices,
                                "machine": machine,
                                "tensorflow": tf.__version__,
                                "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
                            }
                        ),
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
