"""bn_ema: BatchNorm running statistics as an exponential moving average over the test batches (Schneider et al.,
NeurIPS 2020, "Improving robustness against common corruptions by covariate shift adaptation"; the EMA variant of
their BN adaptation, as in bethgelab/robustness ``EMABatchNorm`` and MD ``norm.py`` class ``BNEMA``, cfg
``norm_ema.yaml``). No gradients; only the BatchNorm running statistics change.

Each batch B and each BatchNorm layer (mu_B, sigma2_B: the batch mean and variance per channel over the N x H x W
values of the layer's input; the running variance takes the unbiased sigma2_B * n / (n - 1), as PyTorch's
training mode does):

    mu    <- (1 - m) * mu    + m * mu_B                                  (EMA update, momentum m = 0.1)
    sigma2 <- (1 - m) * sigma2 + m * sigma2_B * n / (n - 1)
    y = gamma * (x - mu) / sqrt(sigma2 + eps) + beta                     (normalised with the UPDATED statistics)

The reference (MD at 8b2ed63, ``methods/bn.py`` ``EMABatchNorm``) runs the model TWICE per batch: a train-mode
pass whose output is discarded (every BatchNorm updates its running statistics from the batch statistics of its
input, the earlier layers normalising with batch statistics), then an eval-mode pass predicting with the updated
running statistics. Deliberate differences:

- One pass (the default): each layer updates its statistics from its input in the single forward and normalises
  with them at once, so layer l's batch statistics are those of the input it really gets (earlier layers
  normalised with their updated running statistics) instead of the train-mode pass's. Forward-only methods here
  cost one forward. For the first BatchNorm layer (and a model with one) the result equals the reference's; deeper
  layers differ by the difference between the two passes' inputs. ``two_pass=True`` reproduces the reference
  exactly (two forwards: statistics from a batch-statistics pass, prediction from a running-statistics pass).
- ``momentum`` is one option for every layer (0.1); the reference uses each layer's own ``momentum`` attribute
  (PyTorch's default 0.1). A layer whose ``momentum`` is None (a cumulative average in PyTorch) uses ours too.
- The rest of the model stays in eval mode in both passes (the reference's train-mode pass also turns dropout on).
- A layer built without running statistics normalises with the batch's (as BatchNorm in eval mode does there).
- A batch of 1 image is fine (statistics over H x W, mixed 0.9 : 0.1 with the running ones); a layer that sees one
  value per channel (BatchNorm1d on a batch of 1) has no batch variance and is refused before anything changes
  (the reference falls back to a sliding window of past samples). All updates are committed only after the whole
  forward succeeded, so any error leaves the statistics as they were.

With ``tta.accel`` on (CPU), the batch statistics come from its one-pass kernel (the same values to rounding)
instead of PyTorch's Welford pass, which costs about a third of a ResNet-20 forward. ``num_batches_tracked`` counts
the updates, as PyTorch's training mode does. ``reset()`` restores the running statistics and counters bitwise; the
affine parameters are never touched. Golden outputs: ``two_pass=True`` on a two-BatchNorm net, and the default on
one-BatchNorm nets, equal the reference's bitwise (``benchmarks/golden/bn_ema.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta import accel
from tta.base import BatchNormAdapter
from tta.norm_layers import MixedBatchNorm
from tta.options import MethodOptions, option
from tta.registry import register
from tta.snapshot import Snapshot


class EmaBatchNorm(MixedBatchNorm):
    """A BatchNorm that moves its running statistics towards each batch's (momentum ``m``) and normalises with them.

    ``mode``: "updated" (one pass: compute the new statistics and normalise with them), "batch" (the reference's
    first pass: compute the new statistics, normalise with the batch statistics) or "running" (its second pass:
    normalise with the new statistics of the first). The new statistics wait in ``pending`` until :meth:`commit`.
    """

    def __init__(self, bn: nn.Module, momentum: float) -> None:
        super().__init__(bn, 1.0)
        self.momentum = float(momentum)
        self.mode = "updated"
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def uses_batch_statistics(self) -> bool:
        return True

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"EmaBatchNorm expected (N, {self.num_features}, ...) input, got {tuple(x.shape)}")
        if self.running_mean is None or self.running_var is None:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.mode == "running":  # the statistics updated by the "batch" pass, not yet committed
            mean, var = self.pending if self.pending is not None else (self.running_mean, self.running_var)
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        if x.numel() <= x.shape[1]:
            raise ValueError(f"bn_ema: a BatchNorm layer got one value per channel (input shape {tuple(x.shape)}), "
                             "so the batch has no variance to update the running statistics with; use batches of "
                             "2 or more")
        # EMA update: mu <- (1 - m) mu + m mu_B, sigma2 <- (1 - m) sigma2 + m * unbiased sigma2_B, on copies until
        # commit(). Plain path: PyTorch's training-mode update itself (the same kernel, the same bits).
        if accel.is_on("batch_norm") and x.device.type == "cpu":
            # CPU fast path: the batch statistics of tta.accel (one pass of sums), the same values to rounding
            from tta.accel.batch_norm import batch_statistics

            batch_mean, batch_var = batch_statistics(x)
            n = x.numel() // x.shape[1]
            m = self.momentum
            mean = m * batch_mean.to(self.running_mean.dtype) + (1.0 - m) * self.running_mean
            var = m * (batch_var * (n / (n - 1))).to(self.running_var.dtype) + (1.0 - m) * self.running_var
        else:
            mean, var = self.running_mean.clone(), self.running_var.clone()
            torch.batch_norm_update_stats(x, mean, var, self.momentum)
        self.pending = (mean, var)
        if self.mode == "batch":
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def commit(self) -> None:
        """Write the pending statistics into the running buffers (and count the update)."""
        if self.pending is not None:
            self.running_mean.copy_(self.pending[0])
            self.running_var.copy_(self.pending[1])
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        self.pending = None


@dataclass
class BnEmaOptions(MethodOptions):
    """bn_ema's options; defaults: the reference's CIFAR-10-C setting (PyTorch's BatchNorm momentum 0.1)."""

    momentum: float = option(0.1, "weight of the batch statistics in the running-statistics update (reference: "
                                  "each layer's own momentum, PyTorch's default 0.1)")
    two_pass: bool = option(False, "the reference's exact procedure at twice the cost: a pass with batch "
                                   "statistics updates the running statistics, a second pass predicts with them")

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")


@register("bn_ema")
class BnEma(BatchNormAdapter):
    """Running BatchNorm statistics updated with momentum from every test batch; predicts with the updated ones."""

    Options = BnEmaOptions
    updates: ClassVar[str] = "norm statistics"
    batch_statistics: ClassVar[str] = "EMA of batches"
    may_skip_update: ClassVar[bool] = True  # a batch whose statistics overflow (inf/NaN) is not folded in

    def _batchnorm_replacement(self, bn: nn.Module) -> MixedBatchNorm:
        return EmaBatchNorm(bn, self.options.momentum)

    def _make_snapshot(self) -> Snapshot:
        return Snapshot([t for layer in self.norm_layers
                         for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)])

    @property
    def needs_batch_statistics(self) -> bool:
        # The updated statistics keep (1 - m) of the running ones: a batch of one image works, unless some layer
        # has no running statistics and so normalises with the batch alone.
        return any(layer.running_mean is None for layer in self.norm_layers)

    def _commit(self, layers: list[EmaBatchNorm]) -> None:
        """Fold every layer's pending statistics in, unless some are not finite (e.g. inputs so large that the
        variance overflows): then none are, and ``skipped_steps`` counts the batch."""
        pending = [t for layer in layers if layer.pending is not None for t in layer.pending]
        if pending and not bool(torch.stack([torch.isfinite(t).all() for t in pending]).all()):
            self.skipped_steps += 1
            return
        for layer in layers:
            layer.commit()

    def _set_mode(self, mode: str) -> None:
        for layer in self.norm_layers:
            layer.mode = mode

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.norm_layers
        try:
            with torch.no_grad():
                if not self.options.two_pass:
                    logits = self.model(x)
                    self._commit(layers)
                    return logits
                try:
                    self._set_mode("batch")
                    self.model(x)
                    self._set_mode("running")
                    logits = self.model(x)
                finally:
                    self._set_mode("updated")
                self._commit(layers)
                return logits
        finally:
            for layer in layers:
                layer.pending = None
