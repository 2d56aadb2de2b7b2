"""One-pass per-channel batch statistics on CPU from a small C kernel (``tta/csrc/channel_moments.c``).

Why: test-time BN computes a mean and a variance for every BatchNorm layer of every batch, and on CPU that
statistics pass is memory-bound: PyTorch's eager ops read the activation map twice (a sum and a sum of squares),
the kernel reads it once (float32 and bfloat16 maps, contiguous and channels-last layouts). On ResNet-20 at
batch 200 (one thread) that is 0.6 ms instead of 1.3 ms for a (200, 16, 32, 32) map. The kernel is plain C (no
PyTorch headers), so building it takes well under a second; it is built with the system's C compiler on first use
into a cache directory (``TTA_CACHE_DIR``, else ``$XDG_CACHE_HOME/tta``, else ``~/.cache/tta``) and loaded with
``ctypes``.

Everything here is optional: without a C compiler, on an unsupported platform, or with ``TTA_NATIVE=0`` in the
environment, :func:`channel_moments` returns None and :mod:`tta.mixed_bn_kernel` uses PyTorch's ops (same
values to rounding). :func:`status` says which is in use and why.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "channel_moments.c"
#: Every file the build reads (the hash of the cached library covers them all).
SOURCES = (SOURCE, SOURCE.with_name("channel_moments_impl.h"))
#: Element types the kernel reads, with the suffix of their entry points.
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
#: Compiler flags; ``-fopenmp-simd`` enables the ``omp simd`` pragmas even where no OpenMP runtime is linked.
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp-simd")
#: Build variants, tried in order: OpenMP threads (sharing PyTorch's libgomp) and GCC's AVX2 clones on x86-64; a
#: compiler that rejects one gets the next (one thread without OpenMP, e.g. Apple's clang).
VARIANTS = (("-fopenmp",), ("-fopenmp", "-DTTA_NO_TARGET_CLONES"), (), ("-DTTA_NO_TARGET_CLONES",))
#: Contiguous maps with fewer positions per (sample, channel) row than this are left to PyTorch (a per-row loop over
#: a few elements is slow; for bfloat16, ``batch_norm_update_stats`` is faster up to rows of 64: 0.20 against 0.24 ms
#: at (200, 64, 64), while at 128 the kernel takes 0.32 ms against 0.80; ``benchmarks/statistics_kernels.py``);
#: channels-last maps with fewer channels than ``MIN_CHANNELS`` likewise.
MIN_ROW_LENGTH = {torch.float32: 16, torch.bfloat16: 128}
MIN_CHANNELS = 8
#: One thread per this many elements at most (a thread reads ~5e5 floats per 0.1 ms; waking one costs microseconds).
ELEMENTS_PER_THREAD = 1 << 18


def cache_dir() -> Path:
    """Where the built library is kept: ``TTA_CACHE_DIR``, else ``$XDG_CACHE_HOME/tta``, else ``~/.cache/tta``."""
    if os.environ.get("TTA_CACHE_DIR"):
        return Path(os.environ["TTA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tta"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, target: Path, extra: tuple[str, ...]) -> None:
    """Compile into a unique temporary file next to ``target`` and rename it in place (atomic: safe when several
    processes build at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library_path(compiler: str, extra: tuple[str, ...]) -> Path:
    parts = [*(path.read_bytes() for path in SOURCES), compiler.encode(), " ".join(FLAGS + extra).encode(),
             platform.machine().encode(), sys.platform.encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return cache_dir() / f"channel_moments-{key}.so"


def _declare(lib: ctypes.CDLL) -> None:
    """The entry points' argument and result types (``ctypes`` would otherwise pass 64-bit sizes as int)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in SUFFIXES.values():
        rows = getattr(lib, f"tta_channel_moments_{suffix}")
        channels_last = getattr(lib, f"tta_channel_moments_cl_{suffix}")
        rows.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_double, ptr, ptr]
        channels_last.argtypes = [ptr, i64, i64, i64, ctypes.c_double, ptr, ptr]
        rows.restype = channels_last.restype = ctypes.c_int


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library and how it was obtained, or None and the reason it is not used."""
    if os.environ.get("TTA_NATIVE", "1") == "0":
        return None, "disabled (TTA_NATIVE=0)"
    if not sys.platform.startswith(("linux", "darwin")):
        return None, f"not built on {sys.platform}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC)"
    errors = []
    for extra in VARIANTS:
        path = _library_path(compiler, extra)
        try:
            if not path.exists():
                try:
                    _build(compiler, path, extra)
                except OSError:  # cache not writable: build into a per-process temporary directory
                    path = Path(tempfile.mkdtemp(prefix="tta-native-")) / path.name
                    _build(compiler, path, extra)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except (OSError, AttributeError, subprocess.SubprocessError) as error:  # AttributeError: a symbol missing
            detail = getattr(error, "stderr", None) or str(error)
            errors.append(detail.strip().splitlines()[-1] if detail.strip() else type(error).__name__)
            continue
        return lib, str(path)
    return None, "build failed: " + "; ".join(errors)


def status() -> dict[str, object]:
    """Whether the one-pass kernel is in use (builds it if needed): ``{"available": bool, "detail": str}``."""
    lib, detail = _load()
    return {"available": lib is not None, "detail": detail}


def layout(x: torch.Tensor) -> str | None:
    """Which kernel handles ``x``: ``"rows"`` for a contiguous (N, C, ...) float32 or bfloat16 CPU map with rows of
    at least ``MIN_ROW_LENGTH`` positions, ``"channels_last"`` for a map whose channels are its innermost dimension
    (channels_last, channels_last_3d, or a (N, C) batch) with at least ``MIN_CHANNELS`` channels; None otherwise."""
    if x.device.type != "cpu" or x.dtype not in SUFFIXES or x.dim() < 2 or x.numel() == 0:
        return None
    n, c = x.shape[:2]
    if x.dim() >= 3 and x.is_contiguous() and x.numel() // (n * c) >= MIN_ROW_LENGTH[x.dtype]:
        return "rows"
    if c >= MIN_CHANNELS and x.movedim(1, -1).is_contiguous():
        return "channels_last"
    return None


def channel_moments(x: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Per-channel mean and biased variance of ``x`` (float32, for bfloat16 ``x`` too) in one pass, and whether
    every channel is well conditioned (finite sums and ``mean^2 <= limit * var``). None when the kernel does not
    apply or is not built.
    """
    kind = layout(x)
    if kind is None:
        return None
    lib, _ = _load()
    if lib is None:
        return None
    n, c = x.shape[:2]
    threads = max(1, min(torch.get_num_threads(), x.numel() // ELEMENTS_PER_THREAD))
    out = torch.empty(2, c, dtype=torch.float32)
    mean_ptr, var_ptr = out.data_ptr(), out.data_ptr() + out.element_size() * c
    suffix = SUFFIXES[x.dtype]
    if kind == "rows":
        code = getattr(lib, f"tta_channel_moments_{suffix}")(x.data_ptr(), n, c, x.numel() // (n * c), threads, limit,
                                                            mean_ptr, var_ptr)
    else:
        code = getattr(lib, f"tta_channel_moments_cl_{suffix}")(x.data_ptr(), x.numel() // c, c, threads, limit,
                                                               mean_ptr, var_ptr)
    if code < 0:  # the kernel could not allocate its accumulators
        return None
    return out[0], out[1], code == 0
