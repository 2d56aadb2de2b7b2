"""Reference-style norm and tent, written the straightforward way most paper code is, for ``tta bench``.

They follow the structure of the original tent repository (github.com/DequanWang/tent, ``norm.py`` and
``tent.py``): the model is put in train mode, BatchNorm layers use batch statistics (norm: train-mode BN, which
also updates the running statistics with momentum 0.1; tent: ``track_running_stats=False`` and the running
statistics dropped), the snapshot for ``reset()`` is a deepcopy of the whole ``state_dict`` (and of the optimizer
state), restored with ``load_state_dict``, every batch builds a fresh autograd graph, and the optimizer holds the
BatchNorm affine parameters only.

One deliberate difference, asked for by the benchmark: ``requires_grad`` stays on for every parameter (the
default ``freeze_other_params=False``), as much code derived from tent does, so the backward pass also computes
the convolution weight gradients that the optimizer never uses. The original tent ``configure_model`` turns them
off; ``freeze_other_params=True`` gives exactly that (row ``tent (reference, frozen)``).

They are faithful: after the same steps with the same optimizer and learning rate, outputs and affine parameters
equal those of ``tta.adapt(model, "norm" / "tent")`` (tests/test_bench.py). Only the cost differs.
"""
from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.options import GradientOptions


def softmax_entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax distribution from logits (as in tent.py)."""
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def collect_params(model: nn.Module) -> list[nn.Parameter]:
    """The BatchNorm affine parameters (tent.py ``collect_params``)."""
    params = []
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            for name, p in module.named_parameters(recurse=False):
                if name in ("weight", "bias"):
                    params.append(p)
    return params


def setup_optimizer(params: list[nn.Parameter], options: GradientOptions) -> torch.optim.Optimizer:
    """Adam or SGD as tent's ``setup_optimizer`` builds them, from the same options as ours."""
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr, betas=(options.beta1, 0.999), weight_decay=options.weight_decay)
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, dampening=0.0,
                               weight_decay=options.weight_decay, nesterov=options.nesterov and options.momentum > 0)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {options.optimizer!r}")


class ReferenceNorm(nn.Module):
    """Test-time BN as tent's ``norm.py``: BatchNorm layers in train mode; reset = load_state_dict(deepcopy)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.train()
        self.model_state = deepcopy(model.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def reset(self) -> None:
        self.model.load_state_dict(self.model_state, strict=True)


class ReferenceTent(nn.Module):
    """tent as in tent.py: train mode, batch statistics, entropy step on BN affine parameters per batch."""

    def __init__(self, model: nn.Module, options: GradientOptions | None = None,
                 freeze_other_params: bool = False) -> None:
        super().__init__()
        self.options = options or GradientOptions()
        self.model = self.configure_model(model, freeze_other_params)
        self.optimizer = setup_optimizer(collect_params(self.model), self.options)
        self.model_state = deepcopy(self.model.state_dict())
        self.optimizer_state = deepcopy(self.optimizer.state_dict())

    @staticmethod
    def configure_model(model: nn.Module, freeze_other_params: bool) -> nn.Module:
        model.train()
        if freeze_other_params:
            model.requires_grad_(False)
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.requires_grad_(True)
                module.track_running_stats = False
                module.running_mean = None
                module.running_var = None
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.episodic:
            self.reset()
        for _ in range(self.options.steps):
            outputs = forward_and_adapt(x, self.model, self.optimizer)
        return outputs

    def reset(self) -> None:
        self.model.load_state_dict(self.model_state, strict=True)
        self.optimizer.load_state_dict(self.optimizer_state)


@torch.enable_grad()
def forward_and_adapt(x: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Forward, entropy loss, backward, step, zero_grad (tent.py; outputs are from before the update)."""
    outputs = model(x)
    loss = softmax_entropy(outputs).mean(0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return outputs
