"""The machine line that every bench script prints (not a test): the CPU's model name
and the instructions that decide which kernels run (speed ratios differ between an
Intel Xeon with AMX and an AMD EPYC without it), the cores, and those this process may
use (``taskset``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from deeplab_tf.precision import cpu_flags

# /proc/cpuinfo flags that change which oneDNN kernels run, and how the README names them.
FEATURES = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX"))


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first CPU's ``model name``, else what ``platform`` knows."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """E.g. ``AMD EPYC (AVX-512, AVX512_BF16), 2 cores, 1 usable``."""
    flags = cpu_flags() or frozenset()
    features = ", ".join(name for flag, name in FEATURES if flag in flags) or "no AVX-512"
    usable = len(os.sched_getaffinity(0))
    return f"{cpu_model()} ({features}), {os.cpu_count()} cores, {usable} usable"
