"""Normalisation-layer discovery and the BatchNorm that mixes source and test-batch statistics.

:class:`MixedBatchNorm` replaces a BatchNorm1d/2d/3d (or SyncBatchNorm) in place. It *shares* the original
layer's parameters and buffers (the very same tensors, registered under the same names), so the model's
``state_dict`` keys and values are unchanged and the source running statistics are never modified or deleted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def find_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer (1d/2d/3d/Sync, any subclass) of the model, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a (N, C, *) batch, over every dimension but the channel one."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


class MixedBatchNorm(nn.Module):
    """BatchNorm whose statistics are ``alpha * source + (1 - alpha) * batch`` (alpha: weight of the SOURCE).

    alpha = 1 normalises with the source running statistics (the source model), alpha = 0 with the statistics of
    the current batch (test-time BN). Running statistics are never updated. The layer behaves the same in train
    and eval mode. With gradients enabled, the batch statistics are part of the graph (as in tent).
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
        source_only = not self.uses_batch_statistics
        if source_only:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.alpha == 0.0 or self.running_mean is None:
            # Pure batch statistics: the fused training-mode kernel (biased variance, no running update).
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        mean_t, var_t = batch_statistics(x)
        mean = self.alpha * self.running_mean + (1.0 - self.alpha) * mean_t
        var = self.alpha * self.running_var + (1.0 - self.alpha) * var_t
        if not torch.is_grad_enabled():
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        # batch_norm's eval kernel gives no gradient through mean/var: write it out so gradients reach mean_t/var_t.
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


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


def swap_batchnorms(model: nn.Module, alpha: float) -> list[LayerSwap]:
    """Replace every BatchNorm of the model with a :class:`MixedBatchNorm` sharing its tensors."""
    swaps = []
    for name, bn in find_batchnorms(model):
        parent, attr = _parent_and_attr(model, name)
        replacement = MixedBatchNorm(bn, alpha)
        setattr(parent, attr, replacement)
        swaps.append(LayerSwap(parent, attr, bn, replacement))
    return swaps


def undo_swaps(swaps: list[LayerSwap]) -> None:
    """Put the original layers back (their tensors were shared, so they hold the current values)."""
    for swap in reversed(swaps):
        setattr(swap.parent, swap.attr, swap.original)
