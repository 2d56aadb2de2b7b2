"""Keep freed memory in the process on glibc Linux, so a gradient method does not page-fault its activations in anew
every batch.

Why: PyTorch's CPU tensors come from glibc ``malloc``. glibc gives the top of its heap back to the kernel whenever
more than a threshold (at most 64 MB, adjusted on the fly) is free there. A gradient method frees ~300 MB of saved
activations at the end of each backward pass (ResNet-20, batch 200), so glibc returns them, and the next batch
touches them again page by page: about 26,000 page faults (100 MB zeroed by the kernel) per batch, measured with
``getrusage``. Plain inference and test-time BN stay under the threshold and never fault. Setting the thresholds
once (``mallopt``) keeps the memory in the process, as PyTorch's CUDA caching allocator does on a GPU and as the
usual advice for CPU inference (jemalloc or tcmalloc via ``LD_PRELOAD``) does by other means.

The cost: the process's resident memory stays at its peak instead of shrinking between batches. The ``tta``
commands call :func:`retain_freed_memory` at start (``TTA_MALLOC=default`` in the environment turns it off);
library users call it themselves. Allocations above glibc's largest mmap threshold (32 MB: e.g. ResNet-50's
first-stage maps at 224 px and batch 64) are still mapped and unmapped per allocation: only an allocator such as
jemalloc changes that.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: glibc's largest accepted mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): 4 MiB * sizeof(long).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Never trim the heap's top (the largest int mallopt takes).
TRIM_THRESHOLD = 2 ** 31 - 1
#: Ask the kernel for this much more than needed when the heap grows (fewer brk calls; untouched pages cost no RAM).
TOP_PAD = 64 * 1024 * 1024

_applied: dict[str, int] | None = None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, looked up once (``find_library`` runs ``ldconfig``); None off glibc Linux."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> dict[str, int] | None:
    """Set glibc's malloc to keep freed memory (fixed mmap threshold 32 MB, no heap trimming, 64 MB top pad).

    Idempotent; process-wide. Returns the settings applied, or None where they do not apply (not glibc Linux,
    or ``TTA_MALLOC=default``). Call it before the model's first batch: memory already returned is not affected.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("TTA_MALLOC", "retain") == "default":
        return None
    libc = _libc()
    if libc is None:
        return None
    settings = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD, "top_pad": TOP_PAD}
    numbers = {"mmap_threshold": _M_MMAP_THRESHOLD, "trim_threshold": _M_TRIM_THRESHOLD, "top_pad": _M_TOP_PAD}
    applied = {name: value for name, value in settings.items() if libc.mallopt(numbers[name], value) == 1}
    _applied = applied
    return applied


def return_free_memory() -> bool:
    """Hand malloc's free heap pages back to the system now (glibc ``malloc_trim``), whatever the thresholds; the
    memory measurement uses it so a row's allocations show up in the RSS. False where glibc is not in use."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


def malloc_settings() -> dict[str, int] | None:
    """What :func:`retain_freed_memory` applied in this process (None: nothing; glibc's own adaptive defaults)."""
    return _applied
