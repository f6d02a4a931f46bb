"""Inference precision (``--precision``): float32, or bfloat16 on CPUs that compute it.

bfloat16 keeps float32's exponent and 8 significant bits. Intel CPUs with AVX512_BF16
or AMX, and Arm CPUs with BF16, multiply it in hardware through TensorFlow's oneDNN
kernels; elsewhere it would be emulated, slower than float32, so it is not used there.
"""

from __future__ import annotations

import functools
from pathlib import Path

PRECISIONS = ("float32", "bfloat16")
# The Keras dtype policy of each precision: variables stay float32 (the weights are
# the checkpoint's), the layers compute in the precision.
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# CPU flags (Linux /proc/cpuinfo) of bfloat16 arithmetic.
BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def bfloat16_unavailable() -> str | None:
    """Why this machine does not run bfloat16 inference fast, or None when it does."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return "this TensorFlow build does not say whether its oneDNN kernels are on"
    if not _pywrap_util_port.IsMklEnabled():
        return "TensorFlow's oneDNN kernels are off (TF_ENABLE_ONEDNN_OPTS=0)"
    flags = cpu_flags()
    if flags is None:
        return "this system does not list its CPU's instructions (/proc/cpuinfo)"
    if not flags & BFLOAT16_CPU_FLAGS:
        return "this CPU has no bfloat16 instructions (AVX512_BF16, AMX-BF16 or Arm BF16)"
    return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The instruction-set flags of the first CPU in ``cpuinfo`` (x86 ``flags``, Arm
    ``Features``), or None where there is no such file."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_precision(precision: str) -> tuple[str, str | None]:
    """(the precision inference runs in, why it is not the one asked for or None).

    Raises:
        ValueError: ``precision`` is not one of ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16":
        reason = bfloat16_unavailable()
        if reason:
            return "float32", f"bfloat16 inference is not available: {reason}; running float32"
    return precision, None
