"""Inference precision (``--precision``): float32, or bfloat16 on CPUs that compute it.

bfloat16 keeps float32's exponent and 8 significant bits. x86 CPUs with AVX512_BF16
(Intel, and AMD from Zen 4) or AMX, and Arm CPUs with BF16, multiply it in hardware
through TensorFlow's oneDNN kernels; elsewhere it would be emulated, slower than
float32, so inference does not use it there. Mixed-precision training
(``--mixed-precision``) runs wherever TensorFlow can run bfloat16 convolutions at all
(``bfloat16_cannot_run``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

PRECISIONS = ("float32", "bfloat16")
# The Keras dtype policy of each precision: variables stay float32 (the weights are
# the checkpoint's), the layers compute in the precision.
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# CPU flags (Linux /proc/cpuinfo) of bfloat16 arithmetic.
BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# TensorFlow hands bfloat16 ops to oneDNN only on CPUs with one of these
# (IsDataTypeSupportedByOneDNNOnThisCPU); elsewhere its own kernels run them, even with
# oneDNN on, and those have no dilated backprop nor dilated depthwise convolution.
ONEDNN_BFLOAT16_CPU_FLAGS = frozenset({"avx512f", "avx_ne_convert"})
# oneDNN's x86 instruction-set levels below AVX512_CORE_BF16 (values of its cap,
# ONEDNN_MAX_CPU_ISA). TensorFlow hands bfloat16 ops to oneDNN on the CPUs above
# without reading the cap. Capped at these levels oneDNN has
# no bfloat16 convolution and the op fails ("could not create a primitive descriptor");
# AVX2_VNNI_2 has one only where the CPU has AVX_NE_CONVERT.
ONEDNN_ISAS_WITHOUT_BFLOAT16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI")
# Here oneDNN emulates bfloat16 arithmetic, slower than float32.
ONEDNN_ISAS_EMULATING_BFLOAT16 = ("AVX512_CORE", "AVX512_CORE_VNNI")


@functools.cache
def bfloat16_unavailable() -> str | None:
    """Why this machine does not run bfloat16 inference fast, or None when it does."""
    # The CPU first: without bfloat16 instructions TensorFlow also leaves oneDNN off by
    # default, and the CPU is the reason.
    flags = cpu_flags()
    if flags is None:
        return "this system does not list its CPU's instructions (/proc/cpuinfo)"
    if not flags & BFLOAT16_CPU_FLAGS:
        return "this CPU has no bfloat16 instructions (AVX512_BF16, AMX-BF16 or Arm BF16)"
    onednn = onednn_enabled()
    if onednn is None:
        return "this TensorFlow build does not say whether its oneDNN kernels are on"
    if not onednn:
        return "TensorFlow's oneDNN kernels are off (TF_ENABLE_ONEDNN_OPTS=0)"
    cap = onednn_isa_cap()
    below = (*ONEDNN_ISAS_WITHOUT_BFLOAT16, "AVX2_VNNI_2", *ONEDNN_ISAS_EMULATING_BFLOAT16)
    if cap and cap[1] in below:
        return f"{cap[0]}={cap[1]} keeps oneDNN below AVX512_CORE_BF16"
    return None


@functools.cache
def bfloat16_cannot_run() -> str | None:
    """Why TensorFlow fails on bfloat16 convolutions on this machine (see
    ``ONEDNN_ISAS_WITHOUT_BFLOAT16``), or None where they run, fast or emulated."""
    cap = onednn_isa_cap()
    if not (cap and onednn_runs("bfloat16")):
        return None
    flags = cpu_flags() or frozenset()
    if cap[1] in ONEDNN_ISAS_WITHOUT_BFLOAT16 or (
        cap[1] == "AVX2_VNNI_2" and "avx_ne_convert" not in flags
    ):
        return (
            f"{cap[0]}={cap[1]} leaves oneDNN without bfloat16 convolutions, which TensorFlow "
            "still hands it on this CPU"
        )
    return None


def onednn_runs(dtype: str) -> bool:
    """Whether TensorFlow runs this machine's CPU ops of ``dtype`` ("float32",
    "bfloat16") through its oneDNN kernels rather than its own.

    oneDNN is on by default on Linux CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or
    AMX (``TF_ENABLE_ONEDNN_OPTS`` sets it either way); bfloat16 also needs
    ``ONEDNN_BFLOAT16_CPU_FLAGS``. Other dtypes: False (TensorFlow's own kernels, or
    not known here).
    """
    if not onednn_enabled():
        return False
    if dtype == "float32":
        return True
    if dtype == "bfloat16":
        return bool((cpu_flags() or frozenset()) & ONEDNN_BFLOAT16_CPU_FLAGS)
    return False


def onednn_enabled() -> bool | None:
    """Whether TensorFlow's oneDNN kernels are on; None where the build does not say."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def onednn_isa_cap() -> tuple[str, str] | None:
    """(variable, value upper-cased) of oneDNN's instruction-set cap where the environment
    sets one (``ONEDNN_MAX_CPU_ISA``, or its older name ``DNNL_MAX_CPU_ISA``), else None."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip()
        if value:
            return name, value.upper()
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
