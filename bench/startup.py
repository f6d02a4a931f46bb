"""Seconds from a saved model to its first mask, in a fresh process (not a test).

    python bench/startup.py                                  # deeplabv3, 513x513, 3 runs each
    python bench/startup.py --variant deeplabv3plus --repeats 5

What a user of ``predict.py``, ``evaluate.py`` or a serving app waits for before the
first image: the ``.keras`` file loaded, the Predictor's inference copy made (batch
norm folded, ``deeplab_tf.folding``) and its function traced on the first image. The
reference is Keras's own path in the same run: ``keras.models.load_model`` and a first
call of the model. Each run is a fresh Python process (TensorFlow's caches cold, as a
user's are; importing TensorFlow is timed apart and left out of the totals), the two
cases alternating. Prints one JSON line per case: the median seconds of each phase and
their total over ``--repeats`` runs, and for the Predictor its total over Keras's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = ("keras", "predictor")
NUM_CLASSES = 21  # PASCAL VOC


def run_case(case: str, path: str, size: int) -> dict[str, float]:
    """One case's phases (seconds) in this process."""
    start = time.perf_counter()
    import keras
    import numpy as np

    from deeplab_tf.inference import Predictor

    phases = {"import": time.perf_counter() - start}
    image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype("float32")
    start = time.perf_counter()
    if case == "keras":
        model = keras.models.load_model(path)
        phases["ready"] = time.perf_counter() - start
        start = time.perf_counter()
        model(image[None], training=False).numpy()
    else:
        predictor = Predictor(path)
        phases["ready"] = time.perf_counter() - start
        start = time.perf_counter()
        predictor.predict(image)
    phases["first_image"] = time.perf_counter() - start
    return phases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="deeplabv3")
    parser.add_argument("--size", type=int, default=513, help="the image's height and width")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.model_path, args.size)))
        return

    from bench.machine import describe_machine
    from deeplab_tf import build_model

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        build_model(args.variant, NUM_CLASSES).save(path)
        runs: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
        for _ in range(args.repeats):
            for case in CASES:
                command = [sys.executable, os.path.abspath(__file__), "--case", case,
                           "--model-path", path, "--size", str(args.size)]  # fmt: skip
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    totals = {}
    for case in CASES:
        medians = {k: statistics.median(r[k] for r in runs[case]) for k in runs[case][0]}
        totals[case] = statistics.median(r["ready"] + r["first_image"] for r in runs[case])
        line = {
            "case": case,
            "variant": args.variant,
            "size": args.size,
            "repeats": args.repeats,
            **{f"{k}_seconds": round(v, 3) for k, v in medians.items()},
            "total_seconds": round(totals[case], 3),  # ready + first image
            "machine": describe_machine(),
        }
        if case == "predictor":
            line["total_over_keras"] = round(totals[case] / totals["keras"], 3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
