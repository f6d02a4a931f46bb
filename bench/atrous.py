"""Times the atrous convolution implementations (not a test).

    python bench/atrous.py [--repeats 7] [--implementations dilated,space_to_batch,direct,taps]
    python bench/atrous.py --precision bfloat16 --implementations direct,taps

Prints one JSON line per (shape, rate, implementation, pass): the median
milliseconds of ``--repeats`` runs after one warm-up, for the forward pass and
for forward + backward (gradients of input and kernel).
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

from bench.machine import describe_machine
from deeplab_tf.layers import ATROUS_IMPLEMENTATIONS, AtrousConv2D
from deeplab_tf.precision import DTYPE_POLICIES

# (input shape, output channels, rates): the ASPP branches of DeepLab v3 on a 513 crop
# at OS8 (rates 12, 24, 36; 6 and 18 as well) and OS16, and rate-2 blocks of a ResNet.
CASES = (
    ((1, 65, 65, 2048), 256, (6, 12, 18, 24, 36)),
    ((1, 33, 33, 2048), 256, (6, 12, 18)),
    ((1, 129, 129, 512), 512, (2,)),
    ((1, 65, 65, 256), 256, (2,)),
)


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
    args = parser.parse_args(argv)
    machine = describe_machine()
    devices = [d.device_type for d in tf.config.list_physical_devices()]
    for shape, filters, rates in CASES:
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
