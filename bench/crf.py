"""Seconds per image of the dense CRF backends (not a test).

    python bench/crf.py [--quick] [--repeats 3] [--backends pydensecrf,tensorflow] [--image PHOTO]

Cases: 375x500 with 21 classes (PASCAL VOC size) and 1024x2048 with 19 classes
(Cityscapes size), 10 mean-field iterations, default ``CRFParams``; ``--quick`` runs
94x125 and 128x256 once. One JSON line per (case, backend): the median wall-clock
seconds per image over ``--repeats`` runs after a warm-up (which also traces the
TensorFlow graph), the process CPU seconds (the machine may be shared), and the
bilateral lattice's vertices per pixel, which sets the cost of both backends.

The image is a synthetic scene (smooth shading, textured shapes, sensor noise) and the
probabilities are its shape labels blurred as a stride-8 network's would be;
``--image`` uses a photo instead (resized to each case), which typically gives a
denser lattice than the synthetic scene.

``--batch N`` times ``crf.refine_many`` on N synthetic 375x500 scenes with
``--workers W`` (threads for TensorFlow, processes for pydensecrf): one JSON line per
backend with images per second; run it under ``taskset -c 0`` and without to get the
one-core and two-core rates.

``--agreement N`` instead compares the two backends' refined probabilities on N
synthetic 375x500 scenes (seeds 0..N-1) for three parameter sets: one JSON line per
(scene, parameters) with the largest and mean absolute difference and the share of
pixels with the same label (the README's statement of the TensorFlow backend's
accuracy comes from it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf
from PIL import Image

from bench.machine import describe_machine
from deeplab_tf import crf
from deeplab_tf.crf.lattice import build_lattice
from deeplab_tf.crf.mean_field import kernel_features

CASES = ((375, 500, 21), (1024, 2048, 19))
QUICK_CASES = ((94, 125, 21), (128, 256, 19))


def synthetic_case(h: int, w: int, num_classes: int, seed: int = 0):
    """A uint8 scene [h, w, 3] and network-like probabilities [h, w, C] for it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:h, 0:w] / max(h, w)
    shading = 60 + 80 * rows[..., None] * rng.random(3) + 60 * cols[..., None] * rng.random(3)
    image = (
        shading + rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    )
    labels = np.zeros((h, w), np.int64)
    for _ in range(12):  # discs and boxes of random classes, colours and texture
        cls = rng.integers(1, num_classes)
        cy, cx, size = rng.random() * h, rng.random() * w, (0.05 + 0.2 * rng.random()) * min(h, w)
        if rng.random() < 0.5:
            mask = (np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < size**2
        else:
            mask = (np.abs(np.mgrid[0:h, 0:w][0] - cy) < size) & (
                np.abs(np.mgrid[0:h, 0:w][1] - cx) < 1.5 * size
            )
        labels[mask] = cls
        image[mask] = rng.integers(0, 256, 3) + 20 * np.sin(cols[mask, None] * rng.integers(5, 40))
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    # Probabilities of a stride-8 network: one-hot labels averaged over 8x8 blocks,
    # bilinearly upsampled, sharpened into a softmax with some noise.
    onehot = np.eye(num_classes, dtype=np.float32)[labels]
    ph, pw = -(-h // 8), -(-w // 8)
    padded = np.pad(onehot, ((0, ph * 8 - h), (0, pw * 8 - w), (0, 0)), mode="edge")
    coarse = padded.reshape(ph, 8, pw, 8, num_classes).mean(axis=(1, 3))
    logits = tf.image.resize(coarse[None] * 6 + rng.normal(0, 0.5, coarse.shape), (h, w))[0]
    return image, tf.nn.softmax(logits).numpy()


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up: traces the TensorFlow graph
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _vertices_per_pixel(image: np.ndarray, params: crf.CRFParams) -> float:
    bilateral, _, image_ids, num_images = kernel_features(
        tf.constant(image[None]), params.sa, params.sb, params.sg
    )
    num_vertices = build_lattice(bilateral, image_ids, num_images)[3]
    return int(num_vertices) / (image.shape[0] * image.shape[1])


AGREEMENT_PARAMS = (
    crf.CRFParams(),
    crf.CRFParams(w1=6, sa=30, sb=5, iterations=10),
    crf.CRFParams(w1=3, sa=100, sb=3, iterations=10),
)


def _agreement(num_scenes: int) -> int:
    for seed in range(num_scenes):
        image, probabilities = synthetic_case(375, 500, 21, seed=seed)
        for params in AGREEMENT_PARAMS:
            reference = crf.refine(image, probabilities, params, backend="pydensecrf")
            ours = crf.refine(image, probabilities, params, backend="tensorflow")
            difference = np.abs(ours - reference)
            record = {
                "case": f"375x500x21 seed {seed}",
                "params": params.to_dict(),
                "max_abs_difference": float(difference.max()),
                "mean_abs_difference": float(difference.mean()),
                "same_label": float((ours.argmax(-1) == reference.argmax(-1)).mean()),
            }
            print(json.dumps(record), flush=True)
    return 0


def _batch(num_images: int, workers: int, backends: list[str], repeats: int) -> int:
    scenes = [synthetic_case(375, 500, 21, seed=seed) for seed in range(num_images)]
    images, probabilities = [s[0] for s in scenes], [s[1] for s in scenes]
    params = crf.CRFParams()
    for backend in backends:
        wall, _ = _median_seconds(  # the CPU time would miss pydensecrf's processes
            lambda b=backend: crf.refine_many(images, probabilities, params, b, workers),
            repeats,
        )
        record = {
            "case": f"{num_images} x 375x500x21",
            "backend": backend,
            "workers": workers,
            "images_per_second": round(num_images / wall, 3),
            "usable_cores": len(os.sched_getaffinity(0)),
            "repeats": repeats,
        }
        print(json.dumps(record), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="pydensecrf,tensorflow")
    parser.add_argument("--image", help="a photo to use instead of the synthetic scene")
    parser.add_argument("--agreement", type=int, metavar="N", help="compare the backends")
    parser.add_argument("--batch", type=int, metavar="N", help="time refine_many on N images")
    parser.add_argument("--workers", type=int, default=None, help="refine_many workers")
    args = parser.parse_args(argv)
    if args.batch:
        return _batch(args.batch, args.workers, args.backends.split(","), args.repeats)
    if args.agreement:
        return _agreement(args.agreement)
    params = crf.CRFParams()
    machine = describe_machine()
    devices = [d.device_type for d in tf.config.list_physical_devices()]
    for h, w, num_classes in QUICK_CASES if args.quick else CASES:
        image, probabilities = synthetic_case(h, w, num_classes)
        if args.image:
            photo = Image.open(args.image).convert("RGB").resize((w, h), Image.BILINEAR)
            image = np.asarray(photo)
        for backend in args.backends.split(","):
            if backend != "tensorflow" and not crf.pydensecrf_available():
                print(
                    json.dumps(
                        {
                            "case": f"{h}x{w}x{num_classes}",
                            "backend": backend,
                            "error": "pydensecrf2 is not installed",
                        }
                    ),
                    flush=True,
                )
                continue
            wall, cpu = _median_seconds(
                lambda b=backend, i=image, p=probabilities: crf.refine(i, p, params, backend=b),
                1 if args.quick else args.repeats,
            )
            record = {
                "case": f"{h}x{w}x{num_classes}",
                "backend": backend,
                "iterations": params.iterations,
                "seconds_per_image": round(wall, 3),
                "cpu_seconds_per_image": round(cpu, 3),
                "bilateral_vertices_per_pixel": round(_vertices_per_pixel(image, params), 2),
                "image": os.path.basename(args.image) if args.image else "synthetic",
                "repeats": 1 if args.quick else args.repeats,
                "devices": devices,
                "machine": machine,
                "tensorflow": tf.__version__,
            }
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
