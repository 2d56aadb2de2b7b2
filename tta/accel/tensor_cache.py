"""A caching allocator for large CPU tensors (``csrc/tensor_cache.cpp``), installed as PyTorch's CPU allocator.

Why: a gradient method's step allocates and frees the same large activations every batch. Under glibc's malloc
those land in holes of one heap, split and merged as sizes come and go, so the resident memory of a step (RSS)
grows well past the bytes it holds at any moment: tent on ResNet-20 at batch 200 peaks at 182 MB of tensors but
about 390 MB of RSS (docs/performance.md). Here each tensor of at least ``threshold_bytes`` is its own mapping of
its size class (whole pages, at most 12.5 % over the request; the pages past the request are never touched), and a
freed one is kept for the next tensor of its class, as PyTorch's CUDA caching allocator keeps GPU blocks. A step
with fixed shapes then reuses its blocks from the second batch on (no page faults) and its RSS is about the bytes
it holds.

Bounded: when a tensor finds no free block of its class, free blocks are unmapped (least recently freed first)
until mapped memory would stay within ``max_cached_ratio`` times the most live bytes ever held.
:func:`release` unmaps every free block (``torch.cuda.empty_cache()``'s counterpart).

It needs a C++ compiler and PyTorch's headers (built by :func:`install`, about 2 s, cached as
:mod:`tta.accel.kernels` caches its kernels) and runs on Linux only; :func:`status` says why where it is not
available, and nothing changes then. ``tta.accel.enable()`` installs it (piece ``tensor_cache``;
``tta.accel.enable(tensor_cache=False)`` or ``--accel-without tensor_cache`` leaves every tensor to glibc's malloc).
"""
from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

from tta.accel import kernels as native

SOURCE = native.CSRC / "tensor_cache.cpp"
#: Allocations from this size on are cached (smaller ones are cheap for malloc and numerous).
DEFAULT_THRESHOLD_BYTES = 1 << 20
#: Mapped memory (live + cached) is kept within this multiple of the most live bytes ever held.
DEFAULT_MAX_CACHED_RATIO = 2.0
#: Whether :func:`install` has loaded the library in this process (the other calls never build it themselves).
_loaded = False
#: Every entry point of the library with its argument and result types.
SIGNATURES: dict[str, tuple[list[type], type | None]] = {
    "tta_tensor_cache_install": ([ctypes.c_int64, ctypes.c_double], ctypes.c_int),
    "tta_tensor_cache_uninstall": ([], ctypes.c_int),
    "tta_tensor_cache_installed": ([], ctypes.c_int),
    "tta_tensor_cache_counters": ([ctypes.c_void_p], None),
    "tta_tensor_cache_release": ([], ctypes.c_int64),
}
_COUNTERS = ("live_bytes", "cached_bytes", "peak_live_bytes", "blocks_mapped", "blocks_unmapped", "reuses")


def _flags() -> tuple[str, ...]:
    """Compile against the running PyTorch's headers and ``libc10`` with its C++ ABI."""
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ("-O2", "-std=c++17", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}",
            f"-L{root / 'lib'}", "-lc10", f"-Wl,-rpath,{root / 'lib'}")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library and its path, or None and the reason it is not used."""
    if os.environ.get("TTA_NATIVE", "1") == "0":
        return None, "disabled (TTA_NATIVE=0)"
    if not sys.platform.startswith("linux"):
        return None, f"Linux only (this is {sys.platform})"
    compiler = native.find_compiler("CXX", ("c++", "g++", "clang++"))
    if compiler is None:
        return None, "no C++ compiler found (set CXX)"
    flags = _flags()
    try:
        target = native.cached_library_path(compiler, (SOURCE,), flags, "tta-tensor-cache", (torch.__version__,))
        path = native.build_cached(compiler, (SOURCE,), flags, target)
        lib = ctypes.CDLL(str(path))
        native.declare(lib, SIGNATURES)
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        return None, "build failed: " + native.build_error(error)
    return lib, str(path)


def status() -> dict[str, object]:
    """Whether the allocator can be used (builds it if needed) and whether it is installed:
    ``{"available": bool, "installed": bool, "detail": str}``."""
    lib, detail = _load()
    return {"available": lib is not None, "installed": bool(lib is not None and lib.tta_tensor_cache_installed()),
            "detail": detail}


def install(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
            max_cached_ratio: float = DEFAULT_MAX_CACHED_RATIO) -> bool:
    """Make the caching allocator PyTorch's CPU allocator (process-wide; calling again updates the settings).

    Tensors allocated before keep their own allocator. Returns False, changing nothing, where it is not available.
    """
    if threshold_bytes < 1:
        raise ValueError(f"threshold_bytes must be at least 1, got {threshold_bytes}")
    if not max_cached_ratio >= 1.0:
        raise ValueError(f"max_cached_ratio must be at least 1.0 (mapped memory never below the live bytes), "
                         f"got {max_cached_ratio}")
    global _loaded
    lib = _load()[0]
    _loaded = lib is not None
    return lib is not None and bool(lib.tta_tensor_cache_install(threshold_bytes, max_cached_ratio))


def _installed_library() -> ctypes.CDLL | None:
    """The library if :func:`install` loaded it, else None (without building anything)."""
    return _load()[0] if _loaded else None


def uninstall() -> bool:
    """Give CPU allocation back to the allocator in use before :func:`install` (tensors already allocated stay
    valid). True when the caching allocator is no longer in use."""
    lib = _installed_library()
    return lib is None or bool(lib.tta_tensor_cache_uninstall())


def installed() -> bool:
    """Whether the caching allocator is PyTorch's CPU allocator now."""
    lib = _installed_library()
    return lib is not None and bool(lib.tta_tensor_cache_installed())


def counters() -> dict[str, int]:
    """Bytes live in cached-size blocks, bytes free in the cache, the most live bytes ever, blocks mapped and
    unmapped, and reuses of a free block (all zero where it was never installed)."""
    lib = _installed_library()
    values = (ctypes.c_int64 * len(_COUNTERS))()
    if lib is not None:
        lib.tta_tensor_cache_counters(values)
    return dict(zip(_COUNTERS, values))


def release() -> int:
    """Unmap every free block (the pages go back to the system); returns the bytes released."""
    lib = _installed_library()
    return 0 if lib is None else int(lib.tta_tensor_cache_release())
