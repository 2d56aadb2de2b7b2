"""One-pass per-channel batch statistics on CPU from a small C kernel (``tta/accel/csrc/channel_moments.c``).

Why: test-time BN computes a mean and a variance for every BatchNorm layer of every batch, and on CPU that
statistics pass is memory-bound: PyTorch's eager ops read the activation map twice (a sum and a sum of squares),
the kernel reads it once (float32 and bfloat16 maps, contiguous and channels-last layouts). On ResNet-20 at
batch 200 (one thread) that is 0.6 ms instead of 1.3 ms for a (200, 16, 32, 32) map. The kernel is built and
loaded by :mod:`tta.accel.kernels`.

Everything here is optional: where the kernels are not built (no C compiler, ``TTA_NATIVE=0``) or the ``kernels``
piece of :mod:`tta.accel` is off, :func:`channel_moments` returns None and :mod:`tta.accel.batch_norm` uses
PyTorch's ops (same values to rounding). :func:`status` says whether they are built and why not.
"""
from __future__ import annotations

import torch

from tta.accel import kernels

#: Element types the kernel reads, with the suffix of their entry points.
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
#: Contiguous maps with fewer positions per (sample, channel) row than this are left to PyTorch (a per-row loop over
#: a few elements is slow; for bfloat16, ``batch_norm_update_stats`` is faster up to rows of 64: 0.20 against 0.24 ms
#: at (200, 64, 64), while at 128 the kernel takes 0.32 ms against 0.80; ``benchmarks/statistics_kernels.py``);
#: channels-last maps with fewer channels than ``MIN_CHANNELS`` likewise.
MIN_ROW_LENGTH = {torch.float32: 16, torch.bfloat16: 128}
MIN_CHANNELS = 8
#: One thread per this many elements at most (a thread reads ~5e5 floats per 0.1 ms; waking one costs microseconds).
ELEMENTS_PER_THREAD = 1 << 18


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
    lib = kernels.active_library()
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


def status() -> dict[str, object]:
    """Whether the one-pass kernel is in use (builds it if needed): ``{"available": bool, "detail": str}``."""
    return kernels.status()
