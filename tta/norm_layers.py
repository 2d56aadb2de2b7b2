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

from tta.lean_graph import outside_lean_graph
from tta.mixed_bn_kernel import mixed_batch_norm


def find_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer (1d/2d/3d/Sync, any subclass) of the model, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


class MixedBatchNorm(nn.Module):
    """BatchNorm whose statistics are ``alpha * source + (1 - alpha) * batch`` (alpha: weight of the SOURCE).

    alpha = 1 normalises with the source running statistics (the source model), alpha = 0 with the statistics of
    the current batch (test-time BN). Running statistics are never updated. The layer behaves the same in train
    and eval mode. With gradients enabled, gradients flow through the batch statistics (as in tent). The
    arithmetic (fast statistics, the eval kernel, the hand-written backward) is in :mod:`tta.mixed_bn_kernel`.
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
        with outside_lean_graph():
            return mixed_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.alpha,
                                    self.eps)


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
