"""The allocator piece of :mod:`tta.accel`: keep freed CPU memory in the process, so a gradient method does not
page-fault its activations in anew every batch, and its resident memory stays close to the bytes its tensors hold.

Why: PyTorch's CPU tensors come from glibc ``malloc``. glibc gives the top of its heap back to the kernel whenever
more than a threshold (at most 64 MB, adjusted on the fly) is free there. A gradient method frees ~300 MB of saved
activations at the end of each backward pass (ResNet-20, batch 200), so glibc returns them, and the next batch
touches them again page by page: about 26,000 page faults (100 MB zeroed by the kernel) per batch, measured with
``getrusage``. Plain inference and test-time BN stay under the threshold and never fault.

:func:`install` (called by :func:`tta.accel.enable`, piece ``tensor_cache``) gives tensors of 1 MB and more the
caching allocator of :mod:`tta.accel.tensor_cache`: each its own mapping, kept when freed for the next tensor of its
size class, as PyTorch's CUDA caching allocator does on a GPU. No page faults after the first batch, and the
resident memory follows the bytes held (under glibc alone the heap's holes made tent's resident memory about twice
its tensors' bytes; docs/performance.md). Smaller tensors stay with glibc, whose thresholds are left as they are:
fixing them with ``mallopt`` on top of the cache changed neither the time, the memory nor the page faults beyond
the noise (docs/performance.md, "What each piece buys").

The cost: freed memory stays in the process (bounded: see :mod:`tta.accel.tensor_cache`).
:func:`release_free_memory` hands free memory back now. ``TTA_MALLOC`` in the environment: ``retain`` (the default)
allows the tensor cache; ``default`` and ``glibc`` (deprecated, removed in tta 0.3) keep it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import warnings
from typing import Any

from tta.accel import tensor_cache as tensor_cache_module

#: The ``TTA_MALLOC`` values that keep the tensor cache off (deprecated: ``--accel-without tensor_cache``).
_CACHE_OFF_MODES = ("default", "glibc")


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
    """``TTA_MALLOC``, checked; ``default`` and ``glibc`` warn (both now mean: no tensor cache)."""
    mode = os.environ.get("TTA_MALLOC", "retain")
    if mode not in ("retain", *_CACHE_OFF_MODES):
        raise ValueError(f"TTA_MALLOC={mode!r}: choose retain (the default), glibc or default")
    if mode in _CACHE_OFF_MODES:
        warnings.warn(f"TTA_MALLOC={mode} is deprecated and will be removed in tta 0.3: it keeps the tensor cache "
                      "off (glibc's malloc settings are no longer applied); use --accel-without tensor_cache or "
                      "tta.accel.enable(tensor_cache=False)", FutureWarning, stacklevel=4)
    return mode


def install(tensor_cache: bool = True) -> dict[str, Any]:
    """Keep freed memory for reuse: the tensor cache for tensors of 1 MB and more, when ``tensor_cache`` and
    ``TTA_MALLOC`` allow it (see the module's docstring). Process-wide; calling again is harmless.

    Returns ``{"tensor_cache": bool, "notes": {"tensor_cache": why not}}``: what is in effect now.
    """
    mode = _mode()  # checked (and warned about) whether or not the cache is asked for
    note = "not asked"
    if tensor_cache:
        if mode != "retain":
            note = f"TTA_MALLOC={mode}"
        elif not tensor_cache_module.install():
            note = str(tensor_cache_module.status()["detail"])
    return {"tensor_cache": tensor_cache_module.installed(), "notes": {"tensor_cache": note}}


def uninstall_tensor_cache() -> bool:
    """Give CPU allocation back to the allocator in use before the tensor cache (its tensors stay valid)."""
    return tensor_cache_module.uninstall()


def release_free_memory() -> bool:
    """Hand free memory back to the system now: the tensor cache's free blocks and malloc's free heap pages (glibc
    ``malloc_trim``). The memory measurement uses it so a row's allocations show up in the RSS. False where neither
    applies."""
    released = tensor_cache_module.release() > 0
    libc = _libc()
    return (libc is not None and bool(libc.malloc_trim(0))) or released


def settings() -> dict[str, int | float] | None:
    """The tensor cache's threshold and bound while it is installed (None: not installed)."""
    if not tensor_cache_module.installed():
        return None
    return {"tensor_cache_threshold": tensor_cache_module.DEFAULT_THRESHOLD_BYTES,
            "tensor_cache_max_ratio": tensor_cache_module.DEFAULT_MAX_CACHED_RATIO}
