"""Build and load the library of small C kernels in ``csrc/`` (plain C, no PyTorch headers), once per machine.

What is in it: the one-pass per-channel statistics of :mod:`tta.accel.channel_moments` (test-time BN's statistics
pass), the bit-mask ReLU of :mod:`tta.accel.relu_mask` (the lean autograd graph of :mod:`tta.accel.lean_graph`),
and the one-pass ``a * x + b + s * g`` of the mixed-BN backward (:mod:`tta.accel.batch_norm`). All are
memory-bound passes that PyTorch's eager CPU ops do in two passes or with wider masks.

The library is built with the system's C compiler (0.1-0.5 s) into a cache directory (``TTA_CACHE_DIR``, else
``$XDG_CACHE_HOME/tta``, else ``~/.cache/tta``), keyed by a hash of its sources, compiler and flags, and loaded with
``ctypes``; :func:`tta.accel.enable` does that (:func:`status`). The kernels run only while the ``kernels`` piece of
:mod:`tta.accel` is on (:func:`active_library`). Without a C compiler, on an unsupported platform, or with
``TTA_NATIVE=0`` in the environment, :func:`library` returns None and the callers use PyTorch's ops instead. The
cached build (:func:`cached_library_path`, :func:`build_cached`) also builds the C++ tensor cache of
:mod:`tta.accel.tensor_cache`.
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

CSRC = Path(__file__).with_name("csrc")
#: The translation units compiled into the one library.
SOURCES = (CSRC / "channel_moments.c", CSRC / "relu_mask.c", CSRC / "affine_plus_scaled.c")
#: Every file the build reads (the hash of the cached library covers them all).
INPUTS = (*SOURCES, CSRC / "channel_moments_impl.h", CSRC / "common.h")
#: Compiler flags; ``-fopenmp-simd`` enables the ``omp simd`` pragmas even where no OpenMP runtime is linked.
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp-simd")
#: Build variants, tried in order: OpenMP threads (sharing PyTorch's libgomp) and the AVX2 code paths on x86-64
#: (GCC's target clones, the ReLU kernel's target("avx2") functions); a compiler that rejects one gets the next
#: (one thread without OpenMP, e.g. Apple's clang).
VARIANTS = (("-fopenmp",), ("-fopenmp", "-DTTA_NO_TARGET_CLONES"), (), ("-DTTA_NO_TARGET_CLONES",))


def cache_dir() -> Path:
    """Where the built library is kept: ``TTA_CACHE_DIR``, else ``$XDG_CACHE_HOME/tta``, else ``~/.cache/tta``."""
    if os.environ.get("TTA_CACHE_DIR"):
        return Path(os.environ["TTA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tta"


def find_compiler(variable: str = "CC", names: tuple[str, ...] = ("cc", "gcc", "clang")) -> str | None:
    """The compiler named by the environment ``variable``, else the first of ``names`` on the PATH."""
    return shutil.which(os.environ.get(variable, names[0])) or next(
        (path for path in map(shutil.which, names[1:]) if path), None)


def build_error(error: Exception) -> str:
    """The last line of a failed build's compiler output (or of the error), to say why a library is not used."""
    detail = (getattr(error, "stderr", None) or str(error)).strip()
    return detail.splitlines()[-1] if detail else type(error).__name__


def cached_library_path(compiler: str, inputs: tuple[Path, ...], flags: tuple[str, ...], stem: str,
                        key: tuple[str, ...] = ()) -> Path:
    """Where the library built from ``inputs`` is cached: :func:`cache_dir`, ``stem`` and a hash of every file in
    ``inputs``, the compiler, the flags, the platform and ``key`` (what else the build depends on)."""
    parts = [*(path.read_bytes() for path in inputs), compiler.encode(), " ".join(flags).encode(),
             platform.machine().encode(), sys.platform.encode(), *(item.encode() for item in key)]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return cache_dir() / f"{stem}-{digest}.so"


def build_cached(compiler: str, sources: tuple[Path, ...], flags: tuple[str, ...], target: Path) -> Path:
    """``target`` (a :func:`cached_library_path`), built from ``sources`` with ``compiler`` and ``flags`` unless it
    exists; built into a per-process temporary directory when the cache is not writable. Returns the library's
    path; raises OSError or ``subprocess.SubprocessError`` when the build fails."""
    if not target.exists():
        try:
            _build(compiler, sources, flags, target)
        except OSError:  # cache not writable: build into a per-process temporary directory
            target = Path(tempfile.mkdtemp(prefix="tta-native-")) / target.name
            _build(compiler, sources, flags, target)
    return target


def _build(compiler: str, sources: tuple[Path, ...], flags: tuple[str, ...], target: Path) -> None:
    """Compile into a unique temporary file next to ``target`` and rename it in place (atomic: safe when several
    processes build at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *map(str, sources), *flags, "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=180)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library_path(compiler: str, extra: tuple[str, ...]) -> Path:
    return cached_library_path(compiler, INPUTS, (*FLAGS, *extra, "-lm"), "tta-kernels")


def _signatures() -> dict[str, tuple[list[type], type | None]]:
    """Every entry point with its argument and result types (``ctypes`` would otherwise pass 64-bit sizes as int)."""
    i64, ptr, double, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    signatures: dict[str, tuple[list[type], type | None]] = {}
    for suffix in ("f32", "bf16"):
        signatures[f"tta_channel_moments_{suffix}"] = ([ptr, i64, i64, i64, i64, double, ptr, ptr], c_int)
        signatures[f"tta_channel_moments_cl_{suffix}"] = ([ptr, i64, i64, i64, double, ptr, ptr], c_int)
    signatures["tta_relu_bits_f32"] = ([ptr, ptr, ptr, i64, i64], None)
    signatures["tta_relu_grad_f32"] = ([ptr, ptr, ptr, i64, i64], None)
    signatures["tta_affine_plus_scaled_f32"] = ([ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64], None)
    signatures["tta_affine_plus_scaled_cl_f32"] = ([ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64], None)
    return signatures


def declare(lib: ctypes.CDLL, signatures: dict[str, tuple[list[type], type | None]]) -> None:
    """Declare the types of every entry point in ``signatures``; a missing one raises AttributeError (a stale or
    foreign library)."""
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library and how it was obtained, or None and the reason it is not used."""
    if os.environ.get("TTA_NATIVE", "1") == "0":
        return None, "disabled (TTA_NATIVE=0)"
    if not sys.platform.startswith(("linux", "darwin")):
        return None, f"not built on {sys.platform}"
    compiler = find_compiler()
    if compiler is None:
        return None, "no C compiler found (set CC)"
    errors = []
    for extra in VARIANTS:
        try:
            path = build_cached(compiler, SOURCES, (*FLAGS, *extra, "-lm"), _library_path(compiler, extra))
            lib = ctypes.CDLL(str(path))
            declare(lib, _signatures())
        except (OSError, AttributeError, subprocess.SubprocessError) as error:  # AttributeError: a symbol missing
            errors.append(build_error(error))
            continue
        return lib, str(path)
    return None, "build failed: " + "; ".join(errors)


def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on first use), or None where they are not available (see :func:`status`)."""
    return _load()[0]


def active_library() -> ctypes.CDLL | None:
    """The kernels while the ``kernels`` piece of :mod:`tta.accel` is on (never builds), else None."""
    from tta import accel

    return library() if accel.is_on("kernels") else None


def status() -> dict[str, object]:
    """Whether the C kernels are in use (builds them if needed): ``{"available": bool, "detail": str}``."""
    lib, detail = _load()
    return {"available": lib is not None, "detail": detail}
