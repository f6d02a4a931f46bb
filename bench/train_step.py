"""Seconds per training step as train.py compiles it (not a test).

    python bench/train_step.py                                   # deeplabv3 OS16, b2, 513
    python bench/train_step.py --variants deeplabv3,deeplabv3plus --output-stride 8
    python bench/train_step.py --batch-norm fused,keras          # the fused batch norm's gain

The model, loss, optimizer (SGD with momentum, weight decay, poly schedule) and mean
IoU metric come from ``deeplab_tf.training.compile_model`` with the variant's paper
recipe, as ``python train.py --variant V`` builds them; each step runs
``model.train_on_batch`` on a random [batch, crop, crop, 3] batch with random labels
(the data pipeline is timed by ``bench/pipeline.py``). ``--batch-norm keras`` runs
Keras's own batch norm (moments and normalisation op by op) in place of the fused
kernel, for comparison; ``speedup_vs_keras_batch_norm`` is then the fused form's
rate over it in the same run. Prints one JSON line per (variant, batch norm): the
median of ``--repeats`` steps after ``--warmup`` steps (the first traces the step).

Run it under ``taskset -c 0`` with ``TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1``
for the one-core figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np
import tensorflow as tf

from bench.machine import describe_machine
from deeplab_tf.layers import FoldableBatchNormalization
from deeplab_tf.recipes import paper_recipe
from deeplab_tf.training.config import TrainConfig
from deeplab_tf.training.model_setup import compile_model

BATCH_NORMS = ("fused", "keras")
NUM_CLASSES = 21  # PASCAL VOC


def step_seconds(
    variant: str, output_stride: int, batch: int, crop: int, warmup: int, repeats: int
) -> list[float]:
    recipe = dataclasses.replace(paper_recipe(variant), output_stride=output_stride)
    with tempfile.TemporaryDirectory() as model_dir:
        config = TrainConfig(variant=variant, recipe=recipe, model_dir=model_dir)
        keras.backend.clear_session()
        model = compile_model(config, NUM_CLASSES)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, crop, crop, 3)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, (batch, crop, crop, 1)).astype("int32")
    for _ in range(warmup):
        model.train_on_batch(images, labels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train_on_batch(images, labels)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="deeplabv3")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=513)
    parser.add_argument("--batch-norm", default="fused", help=f"of {', '.join(BATCH_NORMS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    forms = args.batch_norm.split(",")
    for form in forms:
        if form not in BATCH_NORMS:
            parser.error(f"--batch-norm: {form!r} is not one of {', '.join(BATCH_NORMS)}")
    machine = describe_machine()
    for variant in args.variants.split(","):
        records = {}
        for form in forms:
            # Keras's path: the layer's check for the fused kernel says no.
            keras_path = mock.patch.object(FoldableBatchNormalization, "_fusable", lambda *_: False)
            with keras_path if form == "keras" else contextlib.nullcontext():
                times = step_seconds(
                    variant, args.output_stride, args.batch, args.crop, args.warmup, args.repeats
                )
            median = statistics.median(times)
            records[form] = {
                "variant": variant,
                "output_stride": args.output_stride,
                "batch": args.batch,
                "crop": args.crop,
                "batch_norm": form,
                "median_seconds_per_step": round(median, 3),
                "images_per_second": round(args.batch / median, 3),
                "runs": [round(t, 3) for t in times],
                "threads": {
                    "intra_op": os.environ.get("TF_NUM_INTRAOP_THREADS", "default"),
                    "inter_op": os.environ.get("TF_NUM_INTEROP_THREADS", "default"),
                },
                "machine": machine,
                "tensorflow": tf.__version__,
            }
        if "keras" in records:
            for record in records.values():
                record["speedup_vs_keras_batch_norm"] = round(
                    records["keras"]["median_seconds_per_step"] / record["median_seconds_per_step"],
                    3,
                )
        for record in records.values():
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
