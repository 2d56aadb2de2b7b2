"""Checks on a test batch, run before anything changes, so an error leaves the adapter exactly as it was."""
from __future__ import annotations

import torch
from torch import nn


def expected_input_ndim(model: nn.Module) -> int | None:
    """Input dimensionality implied by the first convolution (Conv1d: 3, Conv2d: 4, Conv3d: 5), if any."""
    for module in model.modules():
        if isinstance(module, nn.Conv1d):
            return 3
        if isinstance(module, nn.Conv2d):
            return 4
        if isinstance(module, nn.Conv3d):
            return 5
    return None


def model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def check_batch(x: object, *, method: str, ndim: int | None, dtype: torch.dtype | None,
                needs_batch_statistics: bool) -> None:
    """Raise a ValueError (TypeError for a non-tensor) that says what to do when ``x`` is not a usable batch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{method}: expected a torch.Tensor batch, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{method}: expected a batch with {ndim} dimensions (N, C, ...), got shape {tuple(x.shape)}"
                         + ("; add a batch dimension with x.unsqueeze(0)" if x.dim() == ndim - 1 else ""))
    if x.dim() < 2:
        raise ValueError(f"{method}: expected a batch of shape (N, C, ...), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{method}: the batch is empty (shape {tuple(x.shape)}); skip empty batches")
    if not x.is_floating_point():
        raise ValueError(f"{method}: expected a floating-point batch, got {x.dtype}; convert images with "
                         "x.float() / 255 (models here take values in [0, 1])")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{method}: the model is {dtype} but the batch is {x.dtype}; cast with x.to({dtype}) "
                         "(or use torch.autocast for mixed precision)")
    if needs_batch_statistics and x.shape[0] == 1:
        raise ValueError(f"{method}: a batch of 1 gives no usable batch statistics (test-time BN on a single image "
                         "normalises away its content); use method='alpha_bn' with alpha > 0, which mixes in the "
                         "source statistics, or batches of 2 or more")
    # A finite sum implies finite elements (any NaN/Inf makes the sum non-finite); only a non-finite sum, which
    # may also come from finite values overflowing, needs the exact element-wise check (much slower).
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{method}: the batch contains NaN or Inf values; clean or drop those images")
