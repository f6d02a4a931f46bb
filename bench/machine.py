"""The machine line that every bench script prints (not a test): the CPU's model name,
family and model numbers (a virtual machine's name may be only ``AMD EPYC``, which an
AVX2 Zen 3 and an AVX-512 Zen 5 share), the instructions that decide which kernels run
(speed ratios differ between an Intel Xeon with AMX and an AMD EPYC without it), the
cores, and those this process may use (``taskset``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from deeplab_tf.precision import cpu_flags

# /proc/cpuinfo flags that change which oneDNN kernels run, and how the README names them.
FEATURES = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX"))


def _first_cpu(cpuinfo: str | Path) -> dict[str, str]:
    """The first CPU's ``key: value`` lines of ``/proc/cpuinfo`` (empty where unreadable)."""
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if not line.strip():
                if fields:  # a blank line ends a CPU's block
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first CPU's ``model name`` with its family and model numbers where given
    (``AMD EPYC, family 26 model 2``), else what ``platform`` knows."""
    fields = _first_cpu(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name}, family {fields['cpu family']} model {fields['model']}"
    return name


def describe_machine() -> str:
    """E.g. ``AMD EPYC, family 26 model 2 (AVX-512, AVX512_BF16), 2 cores, 1 usable``."""
    flags = cpu_flags() or frozenset()
    features = ", ".join(name for flag, name in FEATURES if flag in flags) or "no AVX-512"
    usable = len(os.sched_getaffinity(0))
    return f"{cpu_model()} ({features}), {os.cpu_count()} cores, {usable} usable"
