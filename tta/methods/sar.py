"""sar: sharpness-aware and reliable entropy minimisation (Niu et al., "Towards Stable Test-Time Adaptation in
Dynamic Wild World", ICLR 2023). METHODS.md; reference: MD ``classification/methods/sar.py`` (after the official
mr-eggplant/SAR).

Each step on a batch x, with E(x; T) the softmax entropy (natural log) and C the number of classes:

1. reliable entropy, Eqn. (2): forward at the current parameters T; keep the samples with E(x; T) < E0,
   E0 = ``margin_e0`` * ln C (the reference's ``EATA.MARGIN_E0`` 0.4, a multiple of ln C as there);
2. sharpness-aware entropy, Eqn. (3), max over ||eps||_2 <= rho of E(x; T + eps), first-order solution
   Eqn. (4): eps = rho * g / ||g||_2 with g the gradient of the mean reliable entropy (||g|| over all trained
   tensors together, + 1e-12 as in SAM);
3. forward again at T + eps; among the samples kept in 1, keep those whose entropy at T + eps is still below E0
   (the second filtering); the gradient of their mean entropy at T + eps, Eqn. (5), is applied at T by the base
   optimizer (SGD, momentum 0.9, lr 1e-3, no Nesterov, no weight decay: the reference wraps SGD in SAM with
   ``OPTIM.LR`` and ``OPTIM.MOMENTUM`` whatever ``OPTIM.METHOD`` says, and its CIFAR config has LR 1e-3);
4. model recovery: e_m = 0.9 * e_m + 0.1 * (that second mean entropy), started at the first value; when
   e_m < ``reset_constant`` (``SAR.RESET_CONSTANT_EM`` 0.2) the adapter returns to the source model
   (parameters and optimizer state) and forgets e_m; ``recoveries`` counts these.

The logits returned are those of the first forward of the (last) step, before its update. BatchNorm normalises
with the statistics of the whole batch in both forwards (as tent); LayerNorm/GroupNorm/RMSNorm affine
parameters are trained as they are (SAR's ViT and ResNet-GN setting). Defaults: the reference's CIFAR-10-C
configuration (batch 200, one step, rho 0.05).

Deliberate differences from the reference:

* the model stays in eval mode (as in our tent; the reference also calls eval(), but puts BatchNorm1d in train
  mode) and the source running statistics are kept (unused while alpha = 0);
* when no sample passes the first filter, or none passes the second, there is no update at all
  (``filtered_steps`` counts such steps) and the parameters stay exactly where they were. The reference still
  takes its SGD step then with all-zero gradients, so momentum from earlier batches keeps moving the parameters;
* model recovery (and ``reset()``) also clears the SGD momentum. In the reference, SAM's state dict holds only
  the perturbation, not the wrapped SGD's momentum, so its "reset" leaves the momentum buffers as they were;
* the reference never trains the norm layers of modules named ``layer4``, ``blocks.9``-``blocks.11``, or
  ``norm`` (and names containing ``norm.``), the paper's choice for ImageNet ResNet-50 and ViT-B/16 (top layers
  frozen). Its CIFAR models have no such modules, so it does not apply on CIFAR-10-C; here every norm layer is
  trained by default, and ``freeze_top=True`` applies that same name rule;
* a step whose loss is not finite is skipped (``skipped_steps``), as in every gradient method here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.base import GradientAdapter
from tta.methods.tent import softmax_entropy
from tta.options import GradientOptions, option
from tta.registry import register
from tta.snapshot import weights_changed

# The reference's top layers (module-name rule of MD/official SAR): ResNet layer4, ViT-B blocks 9-11, final norm.
TOP_LAYER_PARTS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


def is_top_layer(name: str) -> bool:
    """Whether a module of this qualified name is one of the reference's frozen top layers."""
    return name == "norm" or any(part in name for part in TOP_LAYER_PARTS)


def affine_parameters_below_top(model: nn.Module, affine_layers: list[nn.Module]) -> list[nn.Parameter]:
    """The affine parameters of ``affine_layers`` (modules of ``model``) outside the reference's top layers
    (``freeze_top``, shared by sar and deyo)."""
    names = {id(m): name for name, m in model.named_modules()}
    return [p for layer in affine_layers if not is_top_layer(names[id(layer)])
            for p in (layer.weight, getattr(layer, "bias", None)) if p is not None]


@dataclass
class SarOptions(GradientOptions):
    """sar's options; defaults are the reference's CIFAR-10-C setting (SAM around SGD, lr 1e-3, momentum 0.9)."""

    optimizer: Literal["adam", "sgd"] = option("sgd", "base optimizer inside SAM (reference: SGD)")
    lr: float = option(1e-3, "learning rate of the base optimizer (reference, CIFAR-10-C: 1e-3; ImageNet: 2.5e-4)")
    momentum: float = option(0.9, "SGD momentum (reference: 0.9)")
    nesterov: bool = option(False, "Nesterov momentum (reference: off; SAM builds SGD with lr and momentum only)")
    margin_e0: float = option(0.4, "reliable-entropy margin as a multiple of ln(C): E0 = margin_e0 * ln(C), "
                                   "C the number of classes (reference: 0.4)")
    rho: float = option(0.05, "SAM neighbourhood radius rho (reference: 0.05)")
    reset_constant: float = option(0.2, "model recovery: reset to the source model when the moving average of "
                                        "the entropy loss falls below this (reference: 0.2; 0 never resets)")
    ema_momentum: float = option(0.9, "weight of the past in the moving average of the entropy loss (reference: "
                                      "0.9)")
    freeze_top: bool = option(False, "leave out the norm layers of modules named layer4, blocks.9-11 and norm "
                                     "(the reference's ImageNet choice; no such modules in its CIFAR models)")


@register("sar")
class Sar(GradientAdapter):
    """Sharpness-aware entropy minimisation on reliable samples, norm affine parameters, with model recovery."""

    Options = SarOptions
    default_alpha = 0.0
    multi_pass = True  # two forwards (and backwards) per step: at T and at T + eps
    may_skip_update = True  # no update when the filters keep no sample (and on a non-finite loss)
    select_all_options: ClassVar[dict[str, Any]] = {"margin_e0": 1e9, "reset_constant": 0.0}

    def _setup(self) -> None:
        o = self.options
        if not o.margin_e0 > 0:
            raise ValueError(f"sar: margin_e0 must be positive, got {o.margin_e0}")
        if not o.rho >= 0:
            raise ValueError(f"sar: rho must be non-negative, got {o.rho}")
        if not 0.0 <= o.ema_momentum < 1.0:
            raise ValueError(f"sar: ema_momentum must be in [0, 1), got {o.ema_momentum}")
        super()._setup()
        self.ema: float | None = None  # e_m, the moving average of the second entropy loss
        self.recoveries = 0
        self.filtered_steps = 0

    def _trainable_parameters(self) -> list[nn.Parameter]:
        if not self.options.freeze_top:
            return super()._trainable_parameters()
        return affine_parameters_below_top(self.model, self.affine_layers)

    def margin(self, num_classes: int) -> float:
        """E0 = margin_e0 * ln(C)."""
        return self.options.margin_e0 * math.log(num_classes)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The first-stage objective: the mean entropy of the reliable samples (Eqn. 2-3)."""
        entropy = softmax_entropy(logits)
        return entropy[entropy < self.margin(logits.shape[1])].mean()

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_inference_mode()
        with torch.enable_grad():
            for _ in range(self.options.steps):
                logits = self._step(x)
        self.optimizer.zero_grad(set_to_none=True)
        return logits

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        """One SAR step; returns the logits of its first forward (before the update)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._graph_mode(x):
            logits = self.model(x)
            entropy = softmax_entropy(logits)
        e0 = self.margin(logits.shape[1])
        reliable = entropy < e0  # Eqn. (2): S(x) = 1{E(x; T) < E0}
        if not bool(reliable.any()):
            self.filtered_steps += 1
            return logits.detach()
        loss = self.loss(x, logits)
        if not bool(torch.isfinite(loss)):
            self.skipped_steps += 1
            return logits.detach()
        self._backward(loss)
        with torch.no_grad():  # Eqn. (4): eps = rho * g / ||g||, applied in place
            moved = [p for p in self.params if p.grad is not None]
            if not moved:  # no trained tensor reaches the loss
                self.filtered_steps += 1
                return logits.detach()
            grads = self._unscaled_gradients(moved)  # g itself (float16 loss scaling: divided by the scale)
            if grads is None:  # float16 gradients overflowed: no step, a smaller loss scale
                self.skipped_steps += 1
                return logits.detach()
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = self.options.rho / (grad_norm + 1e-12)
            saved = [p.detach().clone() for p in moved]
            for p, g in zip(moved, grads):
                p.add_(g * scale)
        weights_changed()
        self.optimizer.zero_grad(set_to_none=True)
        with self._graph_mode(x):
            entropy_at_eps = softmax_entropy(self.model(x))[reliable]
        still_reliable = entropy_at_eps < e0  # the second filtering, at T + eps
        loss_at_eps = entropy_at_eps[still_reliable].mean() if bool(still_reliable.any()) else None
        if loss_at_eps is not None and bool(torch.isfinite(loss_at_eps)):
            self._backward(loss_at_eps)  # Eqn. (5): the sharpness-aware gradient, taken at T + eps ...
        with torch.no_grad():
            for p, old in zip(moved, saved):
                p.copy_(old)  # ... and applied at T
        weights_changed()
        if loss_at_eps is None:
            self.filtered_steps += 1
            return logits.detach()
        value = float(loss_at_eps.detach())
        if not math.isfinite(value):
            self.skipped_steps += 1
            return logits.detach()
        if not self._step_optimizer():  # float16 gradients overflowed: no step, a smaller loss scale
            self.skipped_steps += 1
            return logits.detach()
        gamma = self.options.ema_momentum  # model recovery: e_m = gamma * e_m + (1 - gamma) * E^SA
        self.ema = value if self.ema is None else gamma * self.ema + (1 - gamma) * value
        if self.ema < self.options.reset_constant:
            self._recover()
        return logits.detach()

    def _recover(self) -> None:
        """SAR's model recovery: back to the source parameters and optimizer state; e_m forgotten."""
        self._snapshot.restore()
        self.ema = None
        self.recoveries += 1

    def reset(self) -> None:
        super().reset()
        self.ema = None
        self.recoveries = 0
        self.filtered_steps = 0

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "ema": self.ema, "recoveries": self.recoveries,
                "filtered_steps": self.filtered_steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.ema = state.get("ema")
        self.recoveries = int(state.get("recoveries", 0))
        self.filtered_steps = int(state.get("filtered_steps", 0))
