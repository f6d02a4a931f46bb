"""Where the dense CRF's time goes, and what compiled code would gain (not a test).

    python bench/crf_floor.py [--quick] [--repeats 3]

For each case of ``bench/crf.py`` (same synthetic scenes, default ``CRFParams``, 10
iterations) one JSON line with median seconds per image of: the TensorFlow backend's
lattice construction and its mean-field iterations; the same iterations over the same
lattice as a plain C loop (``bench/crf_mean_field.c``, compiled here with the system's
C compiler, ``-O3 -march=native``); pydensecrf's set-up (both kernels' lattices) and
its iterations (a refinement with 0 iterations against one with 10). Also the share of
pixels whose label the C loop gives as the TensorFlow backend does. Run it under
``taskset -c 0`` with ``TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1`` for the
one-core figures of issue 20's item 4.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

from bench.crf import CASES, QUICK_CASES, _median_seconds, synthetic_case
from bench.machine import describe_machine
from deeplab_tf import crf
from deeplab_tf.crf import mean_field
from deeplab_tf.crf.params import PROBABILITY_FLOOR

C_SOURCE = Path(__file__).with_name("crf_mean_field.c")


def compile_mean_field(directory: str) -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise SystemExit("bench/crf_floor.py: no C compiler (set CC or install cc)")
    library = os.path.join(directory, "crf_mean_field.so")
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    subprocess.run([compiler, *flags, "-o", library, str(C_SOURCE), "-lm"], check=True)
    mean_field_c = ctypes.CDLL(library).mean_field
    mean_field_c.restype = ctypes.c_int
    return mean_field_c


def _c_iterations(mean_field_c, lattices, probabilities, params: crf.CRFParams):
    """A closure running ``crf_mean_field.c`` on the TensorFlow backend's lattices;
    it returns the refined probabilities [H, W, C] in pixel order."""
    order, vertex_of, blur, num_vertices, splat_weights, slice_weights = lattices
    order = order.numpy()
    h, w, num_classes = probabilities.shape
    kernel_weights = (params.w2, params.w1)  # the stacked lattices' order
    unary = -np.log(np.clip(probabilities.reshape(-1, num_classes), PROBABILITY_FLOOR, 1.0))
    arrays = {
        "vertex_of": vertex_of.numpy().astype(np.int32),
        "splat": np.concatenate([s.numpy() for s in splat_weights], axis=1),
        "slice": np.concatenate(
            [k * s.numpy() for k, s in zip(kernel_weights, slice_weights, strict=True)], axis=1
        ),
        "up": np.stack([b.numpy() for b in blur]).astype(np.int64),
        "unary": unary[order].astype(np.float32),  # in the lattices' pixel order
    }
    # In the C signature's order; each pointer keeps its array alive (numpy's data_as).
    arrays = [np.ascontiguousarray(a) for a in arrays.values()]
    pointers = [a.ctypes.data_as(ctypes.c_void_p) for a in arrays]
    num_points, k = arrays[0].shape
    sizes = (num_points, k, int(num_vertices), num_classes, len(blur))

    def run() -> np.ndarray:
        q = np.empty((num_points, num_classes), np.float32)
        output = q.ctypes.data_as(ctypes.c_void_p)
        status = mean_field_c(*sizes, *pointers, params.iterations, output)
        if status != 0:
            raise RuntimeError("crf_mean_field.c: more than 256 classes or out of memory")
        refined = np.empty_like(q)
        refined[order] = q
        return refined.reshape(h, w, num_classes)

    return run


def _pydensecrf_seconds(image, probabilities, params: crf.CRFParams, repeats: int) -> float:
    def refine():
        return crf.refine(image, probabilities, params, backend="pydensecrf")

    return _median_seconds(refine, repeats)[0]


def measure(mean_field_c, h: int, w: int, num_classes: int, repeats: int) -> dict:
    image, probabilities = synthetic_case(h, w, num_classes)
    params = crf.CRFParams()
    widths = [tf.constant(float(v)) for v in (params.sa, params.sb, params.sg)]

    def build():
        return mean_field._kernel_lattices_compiled(tf.constant(image[None]), *widths)

    lattices = build()

    def iterate():
        return mean_field._iterate_compiled(
            tf.constant(probabilities[None]),
            lattices,
            tf.constant(float(params.w1)),
            tf.constant(float(params.w2)),
            tf.constant(params.iterations),
        )[0].numpy()

    c_iterate = _c_iterations(mean_field_c, lattices, probabilities, params)
    seconds = {
        "tensorflow_lattice_s": _median_seconds(build, repeats)[0],
        "tensorflow_iterations_s": _median_seconds(iterate, repeats)[0],
        "c_iterations_s": _median_seconds(c_iterate, repeats)[0],
    }
    same_label = float((c_iterate().argmax(-1) == iterate().argmax(-1)).mean())
    if crf.pydensecrf_available():
        set_up, total = (
            _pydensecrf_seconds(image, probabilities, p, repeats)
            for p in (dataclasses.replace(params, iterations=0), params)
        )
        seconds.update(pydensecrf_set_up_s=set_up, pydensecrf_iterations_s=total - set_up)
    return {
        "case": f"{h}x{w}x{num_classes}",
        "iterations": params.iterations,
        **{name: round(value, 3) for name, value in seconds.items()},
        "c_same_label_as_tensorflow": same_label,
        "repeats": repeats,
        "usable_cores": len(os.sched_getaffinity(0)),
        "machine": describe_machine(),
        "tensorflow": tf.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        mean_field_c = compile_mean_field(directory)
        for h, w, num_classes in QUICK_CASES if args.quick else CASES:
            record = measure(mean_field_c, h, w, num_classes, 1 if args.quick else args.repeats)
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
