"""deeplabv3 against torchvision's DeepLabV3, side by side in one run (not a test).

    python bench/versus_torchvision.py --torchvision-python PEERS/venv_torch/bin/python
    python bench/versus_torchvision.py --torchvision-python ... --one-core --rounds 2
    python bench/versus_torchvision.py --torchvision-python ... --parts training

Alternates, ``--rounds`` times: torchvision's cases (``bench_torchvision.py`` from
``--peer-scripts``, default ``../shared/bench-peers`` beside the checkout, run by the
given interpreter: this project never imports torch), then ``bench/inference.py``
(``deeplabv3``, forms keras, folded and bfloat16, OS16 and OS8) and
``bench/train_step.py`` (OS16, batch 2). ``--one-core`` runs every process under
``taskset -c 0`` with one thread (OpenMP and TensorFlow's intra- and inter-op pools);
``--parts`` runs only the inference or the training cases of both sides.

Prints one JSON line per comparison: each side's seconds (the mean of the rounds'
medians) and our speed over theirs (``speedup``): OS16 and OS8 inference of the folded
network (what ``predict.py`` runs) against eager torchvision, OS8 against
``torch.compile``, and the training step; then our own ratios from the same runs: the
arithmetic rate over ``keras.applications.ResNet101`` and bfloat16 over the float32
Keras model. Each line names the machine; the README's tables come from this.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import describe_machine  # noqa: E402

PARTS = ("inference", "training")
TORCHVISION_CASES = {
    "inference": ("r101_os16_infer", "r101_os8_infer", "r101_os8_infer_compile"),
    "training": ("r101_os16_train_b2",),
}
# (comparison, torchvision case, our form and output stride, or "train" for the step)
COMPARISONS = (
    ("os16_inference", "r101_os16_infer", ("folded", 16)),
    ("os8_inference", "r101_os8_infer", ("folded", 8)),
    ("os8_inference_vs_compile", "r101_os8_infer_compile", ("folded", 8)),
    ("os16_training_step_b2", "r101_os16_train_b2", "train"),
)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def json_lines(command: list[str], env: dict[str, str]) -> list[dict]:
    """The JSON lines that ``command`` prints; its stderr goes to ours on failure."""
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        sys.stderr.write(run.stderr[-4000:])
        raise SystemExit(f"error: {' '.join(command[:2])} exited with {run.returncode}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def one_round(
    torchvision_python: str, peer_scripts: Path, one_core: bool, parts: tuple[str, ...]
) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    prefix = []
    if one_core:
        env.update(ONE_THREAD)
        prefix = ["taskset", "-c", "0"]
    # The peer scripts wait for a quiet machine; under taskset the other core may be busy.
    quiet = ["--quiet-cores", "1.6", "--max-wait", "0"] if one_core else []
    script = str(peer_scripts / "bench_torchvision.py")
    cases = ",".join(case for part in parts for case in TORCHVISION_CASES[part])
    theirs = json_lines(
        [
            *prefix,
            torchvision_python,
            script,
            *f"--runs 3 --warmup 1 --cases {cases}".split(),
            *quiet,
        ],
        env,
    )
    ours = {}
    if "inference" in parts:
        forms = "--variants deeplabv3 --forms keras,folded,bfloat16 --jit off --repeats 3"
        command = [*prefix, sys.executable, "bench/inference.py", *forms.split()]
        ours.update(
            {(line["form"], line["output_stride"]): line for line in json_lines(command, env)}
        )
    if "training" in parts:
        steps = "--repeats 3 --warmup 2"
        train = json_lines([*prefix, sys.executable, "bench/train_step.py", *steps.split()], env)
        ours["train"] = {"median_s": train[0]["median_seconds_per_step"]}
    return {"theirs": {line["case"]: line for line in theirs}, "ours": ours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--torchvision-python",
        required=True,
        help="the Python of a virtual environment with torch and torchvision",
    )
    parser.add_argument("--peer-scripts", type=Path, default=ROOT.parent / "shared" / "bench-peers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one-core", action="store_true", help="taskset -c 0, one thread")
    parser.add_argument("--parts", default=",".join(PARTS), help="inference, training or both")
    args = parser.parse_args(argv)
    parts = tuple(part for part in PARTS if part in args.parts.split(","))
    if not parts or set(args.parts.split(",")) - set(PARTS):
        parser.error(f"--parts must name some of {', '.join(PARTS)}, got {args.parts!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not (args.peer_scripts / "bench_torchvision.py").is_file():
        parser.error(f"--peer-scripts {args.peer_scripts}: no bench_torchvision.py there")
    rounds = [
        one_round(args.torchvision_python, args.peer_scripts, args.one_core, parts)
        for _ in range(args.rounds)
    ]

    def mean_of_medians(side: str, key) -> float:
        return statistics.fmean(r[side][key]["median_s"] for r in rounds)

    machine = {
        "machine": describe_machine(),
        "cores_used": 1 if args.one_core else os.cpu_count(),
        "rounds": args.rounds,
        "torchvision": next(iter(rounds[0]["theirs"].values()))["version"],
    }
    for name, case, key in COMPARISONS:
        if key not in rounds[0]["ours"]:
            continue
        ours, theirs = mean_of_medians("ours", key), mean_of_medians("theirs", case)
        print(
            json.dumps(
                {
                    "comparison": name,
                    "ours_s": round(ours, 4),
                    "torchvision_s": round(theirs, 4),
                    "torchvision_case": case,
                    "speedup": round(theirs / ours, 3),
                    **machine,
                }
            )
        )
    for stride in (16, 8) if "inference" in parts else ():
        for form, field in (("folded", "relative_to_resnet101"), ("bfloat16", "speedup_vs_keras")):
            value = statistics.fmean(r["ours"][(form, stride)][field] for r in rounds)
            line = {
                "comparison": f"os{stride}_{form}_{field}",
                "ours_s": round(mean_of_medians("ours", (form, stride)), 4),
                "ratio": round(value, 3),
                **machine,
            }
            if form == "bfloat16":
                line["bfloat16_unavailable"] = rounds[0]["ours"][(form, stride)][
                    "bfloat16_unavailable"
                ]
            print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
