"""Keep freed memory in the process on glibc Linux, so a gradient method does not page-fault its activations in anew
every batch, and keep its resident memory close to the bytes its tensors hold.

Why: PyTorch's CPU tensors come from glibc ``malloc``. glibc gives the top of its heap back to the kernel whenever
more than a threshold (at most 64 MB, adjusted on the fly) is free there. A gradient method frees ~300 MB of saved
activations at the end of each backward pass (ResNet-20, batch 200), so glibc returns them, and the next batch
touches them again page by page: about 26,000 page faults (100 MB zeroed by the kernel) per batch, measured with
``getrusage``. Plain inference and test-time BN stay under the threshold and never fault.

:func:`retain_freed_memory` does two things, once per process:

- Tensors of 1 MB and more get the caching allocator of :mod:`tta.tensor_cache`: each its own mapping, kept when
  freed for the next tensor of its size class, as PyTorch's CUDA caching allocator does on a GPU. No page faults
  after the first batch, and the resident memory follows the bytes held (under glibc alone the heap's holes made
  tent's resident memory about twice its tensors' bytes; docs/performance.md).
- glibc's thresholds are fixed with ``mallopt`` (allocations up to 32 MB from the heap, never trimmed), for
  everything the caching allocator does not take, or all tensors where it cannot be built.

The cost: freed memory stays in the process (bounded: see :mod:`tta.tensor_cache`). The ``tta`` commands call it
at start; library users call it themselves. ``TTA_MALLOC`` in the environment chooses: ``retain`` (default: both),
``glibc`` (the malloc settings alone), ``default`` (neither: glibc's own adaptive thresholds).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

from tta import tensor_cache

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

_applied: dict[str, int | float] | None = None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, looked up once (``find_library`` runs ``ldconfig``); None off glibc Linux."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> dict[str, int | float] | None:
    """Keep freed memory for reuse: the tensor cache for tensors of 1 MB and more, and glibc's malloc set to keep
    what it frees (fixed mmap threshold 32 MB, no heap trimming, 64 MB top pad). See the module's docstring.

    Idempotent; process-wide. Returns the settings applied, or None where none apply (``TTA_MALLOC=default``, or
    neither glibc nor the tensor cache available). Call it before the model's first batch.
    """
    global _applied
    if _applied is not None:
        return _applied
    mode = os.environ.get("TTA_MALLOC", "retain")
    if mode not in ("retain", "glibc", "default"):
        raise ValueError(f"TTA_MALLOC={mode!r}: choose retain (the default), glibc or default")
    if mode == "default":
        return None
    applied: dict[str, int | float] = {}
    libc = _libc()
    if libc is not None:
        settings = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD, "top_pad": TOP_PAD}
        numbers = {"mmap_threshold": _M_MMAP_THRESHOLD, "trim_threshold": _M_TRIM_THRESHOLD, "top_pad": _M_TOP_PAD}
        applied.update({name: value for name, value in settings.items() if libc.mallopt(numbers[name], value) == 1})
    if mode == "retain" and tensor_cache.install():
        applied.update(tensor_cache_threshold=tensor_cache.DEFAULT_THRESHOLD_BYTES,
                       tensor_cache_max_ratio=tensor_cache.DEFAULT_MAX_CACHED_RATIO)
    _applied = applied or None
    return _applied


def return_free_memory() -> bool:
    """Hand free memory back to the system now: the tensor cache's free blocks and malloc's free heap pages (glibc
    ``malloc_trim``), whatever the thresholds. The memory measurement uses it so a row's allocations show up in
    the RSS. False where neither applies."""
    released = tensor_cache.release() > 0
    libc = _libc()
    return (libc is not None and bool(libc.malloc_trim(0))) or released


def malloc_settings() -> dict[str, int | float] | None:
    """What :func:`retain_freed_memory` applied in this process (None: nothing; glibc's own adaptive defaults)."""
    return _applied
