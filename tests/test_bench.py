"""The bench scripts (benchmarks, not tests) start from outside the repository, and the
machine line they print names the CPU."""

import os
import subprocess
import sys

from bench.machine import cpu_model, describe_machine
from tests.helpers import ROOT

SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "machine.py")


# Each script as ``python bench/NAME.py`` loads it, in one process to pay for one
# TensorFlow import: its own folder first on the path, the bench modules forgotten.
_LOAD_EACH = """
import os, runpy, sys
base = list(sys.path[1:])
for path in sys.argv[1:]:
    sys.path[:] = [os.path.dirname(path), *base]
    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        del sys.modules[name]
    runpy.run_path(path, run_name="loaded_by_test_bench")
    print(os.path.basename(path))
"""


def test_every_bench_script_loads_from_outside_the_repository(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_EACH, *map(str, SCRIPTS)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [script.name for script in SCRIPTS] and len(SCRIPTS) >= 8


def test_machine_line_names_the_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B45\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9B45"
    # The generation from the first CPU's family and model (the name may not tell it).
    cpuinfo.write_text(
        "processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"
        "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: Other\n"
    )
    assert cpu_model(cpuinfo) == "AMD EPYC, family 26 model 2"
    assert cpu_model(tmp_path / "missing")  # falls back to what platform knows
    line = describe_machine()
    assert line.startswith(cpu_model()) and " cores, " in line and line.endswith(" usable")
