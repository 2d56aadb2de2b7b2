"""The allocator pieces of :mod:`tta.accel`: keep freed CPU memory in the process on glibc Linux, so a gradient method
does not page-fault its activations in anew every batch, and its resident memory stays close to the bytes its
tensors hold.

Why: PyTorch's CPU tensors come from glibc ``malloc``. glibc gives the top of its heap back to the kernel whenever
more than a threshold (at most 64 MB, adjusted on the fly) is free there. A gradient method frees ~300 MB of saved
activations at the end of each backward pass (ResNet-20, batch 200), so glibc returns them, and the next batch
touches them again page by page: about 26,000 page faults (100 MB zeroed by the kernel) per batch, measured with
``getrusage``. Plain inference and test-time BN stay under the threshold and never fault.

:func:`install` (called by :func:`tta.accel.enable`) does two things, each switchable:

- ``tensor_cache``: tensors of 1 MB and more get the caching allocator of :mod:`tta.accel.tensor_cache`: each its
  own mapping, kept when freed for the next tensor of its size class, as PyTorch's CUDA caching allocator does on a
  GPU. No page faults after the first batch, and the resident memory follows the bytes held (under glibc alone the
  heap's holes made tent's resident memory about twice its tensors' bytes; docs/performance.md).
- ``malloc``: glibc's thresholds are fixed with ``mallopt`` (allocations up to 32 MB from the heap, never trimmed),
  for everything the caching allocator does not take, or all tensors where it cannot be built. Once per process;
  there is no undo.

The cost: freed memory stays in the process (bounded: see :mod:`tta.accel.tensor_cache`). ``TTA_MALLOC`` in the
environment narrows what is installed: ``retain`` (default: both), ``glibc`` (the malloc settings alone),
``default`` (neither: glibc's own adaptive thresholds). :func:`release_free_memory` hands free memory back now.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from typing import Any

from tta.accel import tensor_cache as tensor_cache_module

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


def _mode() -> str:
    mode = os.environ.get("TTA_MALLOC", "retain")
    if mode not in ("retain", "glibc", "default"):
        raise ValueError(f"TTA_MALLOC={mode!r}: choose retain (the default), glibc or default")
    return mode


def _apply_malloc_settings() -> str:
    """Set glibc's thresholds once per process; returns a note (empty when applied)."""
    global _applied
    if _applied is not None:
        return ""
    libc = _libc()
    if libc is None:
        return "not glibc Linux"
    settings = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD, "top_pad": TOP_PAD}
    numbers = {"mmap_threshold": _M_MMAP_THRESHOLD, "trim_threshold": _M_TRIM_THRESHOLD, "top_pad": _M_TOP_PAD}
    _applied = {name: value for name, value in settings.items() if libc.mallopt(numbers[name], value) == 1} or None
    return "" if _applied else "mallopt refused the settings"


def install(tensor_cache: bool = True, malloc: bool = True) -> dict[str, Any]:
    """Keep freed memory for reuse: the tensor cache for tensors of 1 MB and more (``tensor_cache``) and glibc's
    malloc set to keep what it frees (``malloc``: fixed mmap threshold 32 MB, no heap trimming, 64 MB top pad),
    each as ``TTA_MALLOC`` allows (see the module's docstring). Process-wide; calling again is harmless.

    Returns ``{"tensor_cache": bool, "malloc": bool, "notes": {piece: why not}}``: what is in effect now.
    """
    mode = _mode()
    notes = {}
    if mode == "default":
        notes = {"tensor_cache": "TTA_MALLOC=default", "malloc": "TTA_MALLOC=default"}
    else:
        if malloc:
            notes["malloc"] = _apply_malloc_settings()
        if tensor_cache and mode == "glibc":
            notes["tensor_cache"] = "TTA_MALLOC=glibc"
        elif tensor_cache and not tensor_cache_module.install():
            notes["tensor_cache"] = str(tensor_cache_module.status()["detail"])
    return {"tensor_cache": tensor_cache_module.installed(), "malloc": _applied is not None,
            "notes": {"tensor_cache": "not asked", "malloc": "not asked", **{k: v for k, v in notes.items() if v}}}


def uninstall_tensor_cache() -> bool:
    """Give CPU allocation back to the allocator in use before the tensor cache (its tensors stay valid)."""
    return tensor_cache_module.uninstall()


def release_free_memory() -> bool:
    """Hand free memory back to the system now: the tensor cache's free blocks and malloc's free heap pages (glibc
    ``malloc_trim``), whatever the thresholds. The memory measurement uses it so a row's allocations show up in
    the RSS. False where neither applies."""
    released = tensor_cache_module.release() > 0
    libc = _libc()
    return (libc is not None and bool(libc.malloc_trim(0))) or released


def malloc_settings() -> dict[str, int | float] | None:
    """The glibc settings applied in this process (None: glibc's own adaptive defaults)."""
    return _applied


def settings() -> dict[str, int | float] | None:
    """Everything in effect now: the glibc settings, and the tensor cache's threshold and bound while it is
    installed (None: neither)."""
    applied: dict[str, int | float] = dict(_applied or {})
    if tensor_cache_module.installed():
        applied.update(tensor_cache_threshold=tensor_cache_module.DEFAULT_THRESHOLD_BYTES,
                       tensor_cache_max_ratio=tensor_cache_module.DEFAULT_MAX_CACHED_RATIO)
    return applied or None
