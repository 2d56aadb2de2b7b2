"""The optimizer factory for gradient methods (one place for optimizer construction)."""
from __future__ import annotations

from typing import Sequence

import torch

from tta.options import GradientOptions


def make_optimizer(params: Sequence[torch.nn.Parameter], options: GradientOptions) -> torch.optim.Optimizer:
    if options.lr <= 0:
        raise ValueError(f"lr must be positive, got {options.lr}")
    if options.steps < 1:
        raise ValueError(f"steps must be at least 1, got {options.steps}")
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr, betas=(options.beta1, 0.999),
                                weight_decay=options.weight_decay)
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum,
                               nesterov=options.nesterov and options.momentum > 0,
                               weight_decay=options.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {options.optimizer!r}")
