"""TensorFlow's CPU memory allocator for the processes that import this package.

Where oneDNN is off (TensorFlow's default on CPUs without AVX-512 VNNI/BF16, AVX-VNNI
or AMX, such as an AMD EPYC of the Zen 3 generation), TensorFlow takes every CPU
tensor from malloc. A DeepLab network's activations at 513x513 run to tens of
megabytes each, blocks that glibc hands back to the system when they are freed
(above its mmap threshold, and by trimming its heaps), so the next step's tensors are
fresh pages again, faulted in and zeroed on first touch, and every step pays for its
memory anew: in a deeplabv3 OS16 training step on one core a Pad of a [2, 33, 33,
2048] tensor took 40 ms against 1-2 ms on memory already touched. TensorFlow's
best-fit-with-coalescing allocator (``TF_CPU_ALLOCATOR_USE_BFC``, the one it puts in
front of GPU memory) keeps what it has grown to and reuses it: a deeplabv3 training
step ran 1.11x faster on one core and 1.13x on two, with a lower peak resident size;
inference did not move beyond the machine's spread (README, Benchmarks). Where oneDNN
is on, TensorFlow serves CPU tensors from oneDNN's allocator, which pools large
blocks in a BFC allocator of its own, so that is left as it is (BFC was no faster
there: a training step on an AVX-512 AMD EPYC, README, Benchmarks).

``import deeplab_tf`` calls ``use_bfc_allocator_by_default`` after importing
TensorFlow. TensorFlow reads the variable when it makes its CPU allocator, at its
first allocation, so it applies where the package is imported before TensorFlow has
run anything; a value the user set, ``TF_CPU_ALLOCATOR_USE_BFC=0`` included, is kept.
The allocator does not give memory back to the system until the process ends, and
stops at ``TF_CPU_BFC_MEM_LIMIT_IN_MB`` (64 GiB unless set).

This module must not import TensorFlow.
"""

from __future__ import annotations

import os

from deeplab_tf.precision import onednn_enabled

BFC_ALLOCATOR_ENV = "TF_CPU_ALLOCATOR_USE_BFC"


def use_bfc_allocator_by_default() -> None:
    """Ask TensorFlow for its BFC allocator on the CPU where oneDNN is off (malloc
    otherwise), unless the user chose."""
    if onednn_enabled() is False:
        os.environ.setdefault(BFC_ALLOCATOR_ENV, "1")
