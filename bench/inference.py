"""Times a forward pass of each registered variant beside plain ResNet-101 (not a test).

    python bench/inference.py                       # every variant, OS16 and OS8, jit off/on
    python bench/inference.py --variants deeplabv3 --repeats 1 --jit off   # quick look
    python bench/inference.py --variants deeplabv3 --forms keras,folded,bfloat16 --jit off

Each variant runs in the ``--forms`` asked for: ``keras``, the model as built (Keras's
batch norm); ``folded``, the copy the Predictor runs (batch norm folded into the
convolutions, ``deeplab_tf.folding.inference_copy``); ``bfloat16``, that copy computing
in bfloat16 (``--precision bfloat16``). Both run the ASPP's atrous branches as
``folding.aspp_implementation_for_inference`` says (tap by tap in bfloat16, and in
float32 on TensorFlow's own CPU kernels).
``speedup_vs_keras`` is each form's rate over the ``keras`` form's in the same run (when
both are asked for).

Prints one JSON line per (model, output stride, jit_compile): the median seconds of
``--repeats`` forward passes of a [batch, size, size, 3] input after a warm-up
(tracing, XLA compilation), images/s, the FLOPs of one image counted from the
TensorFlow graph (``tf.compat.v1.profiler``, multiply and add counted as 2), the
achieved GFLOP/s, and that rate relative to ``keras.applications.ResNet101`` (no top)
at the same size and jit setting, the reference rate: the DeepLab parts add
arithmetic (atrous convolutions, ASPP), so their GFLOP/s should stay close to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from bench.machine import describe_machine
from deeplab_tf import VARIANTS, build_model
from deeplab_tf.folding import inference_copy
from deeplab_tf.precision import bfloat16_unavailable

FORMS = ("keras", "folded", "bfloat16")

NUM_CLASSES = 21  # PASCAL VOC


def graph_flops(model: keras.Model, batch: int, size: int) -> int:
    """Floating-point operations of one forward pass of ``model``, from its frozen graph."""
    function = tf.function(lambda x: model(x, training=False))
    concrete = function.get_concrete_function(tf.TensorSpec([batch, size, size, 3], tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops


def median_seconds(model: keras.Model, x: tf.Tensor, jit: bool, repeats: int) -> float:
    forward = tf.function(lambda x: model(x, training=False), jit_compile=jit)
    forward(x).numpy()  # trace (and compile) first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(x).numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="all", help="comma-separated names, or all")
    parser.add_argument("--output-strides", default="16,8")
    parser.add_argument("--jit", choices=("off", "on", "both"), default="both")
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forms", default="keras", help=f"comma-separated of {FORMS}")
    args = parser.parse_args(argv)
    forms = args.forms.split(",")
    if not set(forms) <= set(FORMS):
        print(f"error: --forms takes {FORMS}, got {args.forms!r}", file=sys.stderr)
        return 2
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    strides = [int(s) for s in args.output_strides.split(",")]
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    machine = {
        "machine": describe_machine(),
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
        "tensorflow": tf.__version__,
    }
    x = tf.random.uniform([args.batch, args.size, args.size, 3], 0, 255)

    def report(name, stride, model, flops, reference_rate, form="keras", keras_rates=None):
        rates = {}
        for jit in jits:
            seconds = median_seconds(model, x, jit, args.repeats)
            images_per_second = args.batch / seconds
            gflop_per_s = flops / args.batch * images_per_second / 1e9
            rates[jit] = gflop_per_s
            line = {
                "model": name,
                "form": form,
                "output_stride": stride,
                "jit_compile": jit,
                "size": args.size,
                "batch": args.batch,
                "repeats": args.repeats,
                "median_s": round(seconds, 4),
                "images_per_second": round(images_per_second, 3),
                "gflops_per_image": round(flops / args.batch / 1e9, 2),
                "gflop_per_s": round(gflop_per_s, 1),
                "relative_to_resnet101": (
                    round(gflop_per_s / reference_rate[jit], 3) if reference_rate else None
                ),
                "speedup_vs_keras": (
                    round(gflop_per_s / keras_rates[jit], 3) if keras_rates else None
                ),
                **machine,
            }
            if form == "bfloat16":
                # Timed all the same (emulated: the Predictor would run float32 there).
                line["bfloat16_unavailable"] = bfloat16_unavailable()
            print(json.dumps(line), flush=True)
        return rates

    reference = keras.applications.ResNet101(
        weights=None, include_top=False, input_shape=(args.size, args.size, 3)
    )
    flops = graph_flops(reference, args.batch, args.size)
    reference_rate = report("keras.applications.ResNet101", 32, reference, flops, None)
    del reference
    for name in names:
        for stride in strides:
            keras.backend.clear_session()
            model = build_model(name, NUM_CLASSES, output_stride=stride)
            flops = graph_flops(model, args.batch, args.size)
            keras_rates = None
            for form in forms:
                network = model if form == "keras" else inference_copy(
                    model, "bfloat16" if form == "bfloat16" else "float32"
                )  # fmt: skip
                rates = report(name, stride, network, flops, reference_rate, form, keras_rates)
                if form == "keras":
                    keras_rates = rates
    return 0


if __name__ == "__main__":
    sys.exit(main())
