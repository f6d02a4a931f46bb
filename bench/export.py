"""Size, accuracy and speed of each export format of a trained model (not a test).

    python bench/export.py --model-dir runs/quickstart          # after make quickstart
    python bench/export.py --model-dir runs/quickstart --max-images 10 --repeats 3   # quick

Exports the model's SavedModel and its TFLite conversions (float32, float16, int8
calibrated on 100 train images) at the training crop size into a temporary directory,
scores the Keras network and each TFLite file on the whole --split (mean IoU at full
label resolution, ``deeplab_tf.evaluation``), and prints one JSON line per format: file
size, mean IoU and its drop against the Keras network in points, the share of pixels
whose label equals the Keras network's, and the median milliseconds per image (one
thread for TFLite, the default threads for Keras and the SavedModel). ``keras-bfloat16``
is the network as ``--precision bfloat16`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

from bench.machine import describe_machine
from deeplab_tf import export
from deeplab_tf.data import pipeline
from deeplab_tf.evaluation import Evaluator
from deeplab_tf.inference import Predictor, read_checkpoint_info


def median_ms(run, images: list[np.ndarray], repeats: int) -> float:
    run(images[0])  # warm-up (tracing)
    times = []
    for _ in range(repeats):
        for image in images:
            start = time.perf_counter()
            run(image)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="runs/quickstart")
    parser.add_argument("--data-dir", help="default: the model's training data")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-images", type=int, help="score only the first images")
    parser.add_argument("--repeats", type=int, default=10, help="timing passes over 10 images")
    args = parser.parse_args(argv)

    checkpoint = read_checkpoint_info(args.model_dir, "--model-dir")
    data_dir = args.data_dir or checkpoint.data_dir
    predictor = Predictor(checkpoint.path)
    size = (checkpoint.crop_size, checkpoint.crop_size)
    data = pipeline.eval_dataset(data_dir, args.split)
    pairs = [(x[0].numpy(), y[0].numpy()) for x, y in data.take(args.max_images or -1)]
    with tempfile.TemporaryDirectory() as tmp:
        result = export.export(
            predictor, tmp, formats=export.FORMATS, input_size=size,
            quantize=export.QUANTIZATIONS, data_dir=data_dir, log=lambda *_: None,
        )  # fmt: skip
        formats = result.manifest["formats"]
        serve = tf.saved_model.load(str(result.path)).signatures["serving_default"]

        def run_savedmodel(image: np.ndarray) -> np.ndarray:
            return serve(images=tf.constant(image[None].astype(np.uint8)))["labels"].numpy()[0]

        # name: (labels of an image, bytes on disk)
        runners = {
            "keras": (predictor.predict_labels, formats["keras"]["bytes"]),
            # predict.py --precision bfloat16 (float32 where the CPU lacks it: see "ran")
            "keras-bfloat16": (
                predictor.in_precision("bfloat16").predict_labels,
                formats["keras"]["bytes"],
            ),
            "savedmodel": (run_savedmodel, formats["savedmodel"]["bytes"]),
        }
        for mode, entry in formats["tflite"]["files"].items():
            tflite = export.TFLitePredictor(result.path / entry["file"], num_threads=1)
            runners[f"tflite-{'float32' if mode == 'none' else mode}"] = (
                tflite.predict_labels,
                entry["bytes"],
            )
        reference = [predictor.predict_labels(image) for image, _ in pairs]
        keras_iou = None
        for name, (run, size_bytes) in runners.items():
            evaluator = Evaluator(predictor.num_classes)
            same = 0
            for (image, label), expected in zip(pairs, reference, strict=True):
                labels = run(image)
                evaluator.update(label, labels)
                same += int((labels == expected).sum())
            mean_iou = evaluator.results()["mean_iou"]
            keras_iou = mean_iou if keras_iou is None else keras_iou
            line = {
                "format": name,
                "bytes": size_bytes,
                "split": args.split,
                "images": len(pairs),
                "mean_iou": round(mean_iou, 4),
                "mean_iou_drop_points": round(100 * (keras_iou - mean_iou), 2),
                "label_agreement": round(same / sum(r.size for r in reference), 5),
                "ms_per_image": round(median_ms(run, [p[0] for p in pairs[:10]], args.repeats), 2),
                "input_size": list(size),
                "machine": describe_machine(),
                "cpus": os.cpu_count(),
            }
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
