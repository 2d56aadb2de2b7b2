"""core: alpha-BN plus an online loss on the batch's pairwise class correlation (You, Li, Zhao 2021).

[reconstructed] (METHODS.md): the paper's exact loss text was not available; we use the normalised
off-diagonal mass of the batch class-correlation matrix, kept as the separate function
:func:`class_correlation_loss` so the paper's exact form can replace it. With P the (B x C) softmax:

    M = P^T P / B,      L = sum_{i != j} M_ij / sum_{i,j} M_ij

Minimising L pushes predictions to be confident and non-confusing. One gradient step per batch on the BN affine
parameters only; BatchNorm statistics are alpha-mixed (``alpha``: weight of the source statistics) and computed
inside the graph, so gradients flow through the batch statistics as in tent. Optimizer like tent (CIFAR: Adam,
beta1 0.9, lr 1e-3, confirmed on the validation corruptions: docs/defaults.md); alpha shares alpha_bn's default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tta.base import GradientAdapter
from tta.methods.alpha_bn import SourceWeightOption
from tta.options import GradientOptions
from tta.registry import register


def class_correlation_loss(probs: torch.Tensor) -> torch.Tensor:
    """Normalised off-diagonal mass of M = P^T P / B for a (B, C) matrix of class probabilities."""
    correlation = probs.t() @ probs / probs.shape[0]
    total = correlation.sum()
    return (total - correlation.diagonal().sum()) / total


@dataclass
class CoreOptions(GradientOptions, SourceWeightOption):
    """core's options: the gradient options (tent's Adam, lr 1e-3, beta1 0.9: kept by the learning-rate selection
    on the validation corruptions, docs/defaults.md) and alpha_bn's ``alpha``."""


@register("core")
class Core(GradientAdapter):
    """alpha-BN statistics plus one class-correlation step per batch on the BN affine parameters."""

    Options = CoreOptions
    batch_statistics = "alpha < 1"
    layers = "BatchNorm"  # its statistics mixing is defined on BatchNorm

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return class_correlation_loss(logits.softmax(1))
