"""Training-pipeline throughput on the shapes TFRecords (not a test).

    python bench/pipeline.py [--crops 513,321] [--batch-size 8] [--batches 100] [--data-dir DIR]

Generates the shapes dataset on first use (``--data-dir``, default a folder in the
system temp dir), then for each crop size runs the v3 training pipeline (decode,
random scale 0.5..2.0, pad, crop, flip, batch) and prints one JSON line: images per
second over ``--batches`` batches after ``--warmup`` batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf

from bench.machine import describe_machine
from deeplab_tf.data import pipeline, shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", default="513,321")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--data-dir", default=os.path.join(tempfile.gettempdir(), "deeplab_tf_shapes")
    )
    args = parser.parse_args(argv)
    data_dir = shapes.ensure_shapes_tfrecords(args.data_dir)
    machine = describe_machine()
    for crop in (int(c) for c in args.crops.split(",")):
        ds = pipeline.train_dataset(data_dir, "train", batch_size=args.batch_size, crop_size=crop)
        batches = iter(ds)
        for _ in range(args.warmup):
            next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            image, label = next(batches)
            image.numpy(), label.numpy()  # the consumer receives host arrays
        seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "case": "train_pipeline",
                    "dataset": "shapes",
                    "crop": crop,
                    "batch_size": args.batch_size,
                    "scales": list(pipeline.V3_SCALES),
                    "images_per_s": round(args.batches * args.batch_size / seconds, 1),
                    "batches": args.batches,
                    "machine": machine,
                    "tensorflow": tf.__version__,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
