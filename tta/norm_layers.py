"""Normalisation-layer discovery and the BatchNorm that mixes source and test-batch statistics.

:class:`MixedBatchNorm` replaces a BatchNorm1d/2d/3d (or SyncBatchNorm) in place. It *shares* the original
layer's parameters and buffers (the very same tensors, registered under the same names), so the model's
``state_dict`` keys and values are unchanged and the source running statistics are never modified or deleted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta import accel


def find_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer (1d/2d/3d/Sync, any subclass) of the model, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


# The normalisation layers whose affine parameters the gradient methods train. BatchNorm is found separately
# (it is swapped for MixedBatchNorm); these normalise each sample on its own and are used as they are.
# Subclasses count (timm's LayerNorm2d is an nn.LayerNorm).
PER_SAMPLE_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm")
                                                                              else ()))


def find_per_sample_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every LayerNorm, GroupNorm or RMSNorm layer (any subclass) of the model, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PER_SAMPLE_NORMS)]


def describe_norm_layers(model: nn.Module) -> str:
    """What normalisation layers a model has, for error messages: e.g. ``"LayerNorm x 25, GroupNorm x 2"``."""
    counts: dict[str, int] = {}
    for m in model.modules():
        kind = next((t.__name__ for t in (_BatchNorm, *PER_SAMPLE_NORMS, nn.modules.instancenorm._InstanceNorm)
                     if isinstance(m, t)), None)
        if kind is not None:
            kind = "BatchNorm" if kind == "_BatchNorm" else "InstanceNorm" if kind == "_InstanceNorm" else kind
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} x {n}" for kind, n in counts.items()) or "no normalisation layers"


def mix_statistics(alpha: float, source: torch.Tensor | None, batch: torch.Tensor) -> torch.Tensor:
    """``alpha * source + (1 - alpha) * batch`` (the batch alone without source statistics or at alpha = 0)."""
    if source is None or alpha == 0.0:
        return batch
    return alpha * source + (1.0 - alpha) * batch


def mixed_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                     alpha: float, eps: float) -> torch.Tensor:
    """Normalise a (N, C, *) batch with ``alpha * source + (1 - alpha) * batch`` statistics (biased batch variance),
    in plain PyTorch: gradients flow through the batch statistics by autograd. The running statistics are read,
    never updated.

    Batch statistics alone (alpha = 0, or no source statistics): batch_norm's training mode without running
    buffers. Mixed, without gradients: PyTorch's one-pass statistics kernel (``batch_norm_update_stats``, 3x faster
    than ``var_mean`` on CPU) and batch_norm's eval kernel. Mixed, with gradients (batch_norm does not differentiate
    its running-statistics arguments): ``var_mean``, then ``x * scale + shift`` with per-channel ``scale`` and
    ``shift`` (the eval kernel's own arithmetic), one elementwise pass each way.
    """
    if running_mean is None or running_var is None or alpha == 0.0:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    wide = torch.promote_types(x.dtype, torch.float32)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(t is not None and t.requires_grad
                                                                   for t in (weight, bias))):
        batch_mean, batch_var = torch.batch_norm_update_stats(x, None, None, 0.0)  # biased variance
        mean = mix_statistics(alpha, running_mean, batch_mean.to(wide))
        var = mix_statistics(alpha, running_var, batch_var.to(wide))
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    batch_var, batch_mean = torch.var_mean(x.to(wide), dim=[0, *range(2, x.dim())], correction=0)
    mean, var = mix_statistics(alpha, running_mean, batch_mean), mix_statistics(alpha, running_var, batch_var)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)


class MixedBatchNorm(nn.Module):
    """BatchNorm whose statistics are ``alpha * source + (1 - alpha) * batch`` (alpha: weight of the SOURCE).

    alpha = 1 normalises with the source running statistics (the source model), alpha = 0 with the statistics of
    the current batch (test-time BN). Running statistics are never updated. The layer behaves the same in train
    and eval mode. With gradients enabled, gradients flow through the batch statistics (as in tent). The arithmetic
    is :func:`mixed_batch_norm` (plain PyTorch, autograd), or on CPU with ``tta.accel.enable()`` the fast path of
    :mod:`tta.accel.batch_norm` (same values to rounding).
    A layer built without running statistics (``track_running_stats=False``) always uses batch statistics.
    """

    def __init__(self, bn: _BatchNorm, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (weight of the source statistics) must be in [0, 1], got {alpha}")
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.alpha = float(alpha)
        # The same Parameter / buffer objects as the original layer: shared storage, identical state_dict keys.
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", getattr(bn, "num_batches_tracked", None))

    @property
    def uses_batch_statistics(self) -> bool:
        return self.alpha < 1.0 or self.running_mean is None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"MixedBatchNorm expected (N, {self.num_features}, ...) input, got {tuple(x.shape)}")
        if not self.uses_batch_statistics:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        arithmetic = accel.fast_batch_norm(x) or mixed_batch_norm
        return arithmetic(x, self.weight, self.bias, self.running_mean, self.running_var, self.alpha, self.eps)


@dataclass
class LayerSwap:
    """One replaced layer: ``parent.<attr>`` was ``original`` and is now ``replacement``."""

    parent: nn.Module
    attr: str
    original: nn.Module
    replacement: nn.Module


def _parent_and_attr(model: nn.Module, qualified_name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = qualified_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def swap_batchnorms(model: nn.Module, alpha: float,
                    make: Callable[[_BatchNorm], MixedBatchNorm] | None = None) -> list[LayerSwap]:
    """Replace every BatchNorm of the model with a :class:`MixedBatchNorm` sharing its tensors (or with what
    ``make(bn)`` builds: a subclass, e.g. bn_ema's layer that also updates the running statistics)."""
    swaps = []
    for name, bn in find_batchnorms(model):
        parent, attr = _parent_and_attr(model, name)
        replacement = MixedBatchNorm(bn, alpha) if make is None else make(bn)
        setattr(parent, attr, replacement)
        swaps.append(LayerSwap(parent, attr, bn, replacement))
    return swaps


def undo_swaps(swaps: list[LayerSwap]) -> None:
    """Put the original layers back (their tensors were shared, so they hold the current values)."""
    for swap in reversed(swaps):
        setattr(swap.parent, swap.attr, swap.original)
