"""A linear probe on a frozen feature extractor: the joint-training upper bound beside NMC.

The probe sees the same feature as NMC (the L2-normalised ``forward_features`` of the frozen extractor), so the
two differ only in the classifier: class means against a trained linear softmax layer. After every experience it
is refitted from zero on the features of *every* training image seen so far (it stores them: an upper bound, not
an exemplar-free method), so after the last experience it is a linear probe trained jointly on all incremental
classes, and its earlier rows are the joint upper bound of each prefix of the stream.

Fit: multinomial logistic regression, minimising ``mean_i CE(W f_i + b, y_i) + l2 / 2 * ||W||_F^2`` (the bias is not
penalised) in float64 with full-batch L-BFGS (strong Wolfe line search) from W = 0, b = 0. The objective is
strictly convex in W for ``l2 > 0``, so the solution is unique and does not depend on any random state; the tests
check it against scikit-learn's ``LogisticRegression(C = 1 / (n * l2))``. Classes not seen yet are never predicted.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.nmc import OptimizerFreeStrategy

MAX_ITER, TOLERANCE_GRAD = 1000, 1e-9


def fit_softmax_regression(features: Tensor, labels: Tensor, num_classes: int, l2: float,
                           max_iter: int = MAX_ITER) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``(W (C, d), b (C,), info)`` minimising the module's objective over the classes present in ``labels``;
    rows of absent classes stay 0 (the caller masks them). ``info``: iterations, final loss, max |gradient|."""
    f = features.to(torch.float64)
    present = labels.unique()
    index = torch.full((num_classes,), -1, dtype=torch.long)
    index[present] = torch.arange(len(present))
    target = index[labels]
    W = torch.zeros(len(present), f.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(present), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=TOLERANCE_GRAD,
                                  tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(f @ W.T + b, target) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    loss = objective()
    info = {"iterations": int(optimizer.state[W]["n_iter"]), "loss": float(loss.detach()),
            "max_abs_gradient": float(max(W.grad.abs().max(), b.grad.abs().max()))}
    full_W = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
    full_b = torch.zeros(num_classes, dtype=torch.float64)
    full_W[present], full_b[present] = W.detach(), b.detach()
    return full_W, full_b, info


class LinearProbe(nn.Module):
    """Frozen extractor + a softmax layer refitted on every stored feature by :meth:`fit`.

    The stored features and labels are buffers, so a checkpoint resumes the probe exactly; the extractor stays in
    eval mode without gradients, like :class:`continual.nmc.NMCClassifier`'s.
    """

    def __init__(self, extractor: nn.Module, num_classes: int, dim: int, l2: float = 1e-4) -> None:
        super().__init__()
        self.extractor = extractor.eval()
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        self.num_classes, self.l2 = num_classes, l2
        self.register_buffer("bank_features", torch.zeros(0, dim))
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("weight", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros(num_classes, dtype=torch.bool))
        self.last_fit: dict[str, Any] = {}

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.extractor.eval()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("bank_features", "bank_labels"):  # their length grows: take the checkpoint's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        return F.normalize(self.extractor(x).flatten(1), dim=1)

    @torch.no_grad()
    def store(self, x: Tensor, y: Tensor) -> None:
        """Keep the features and labels of a training batch for the next :meth:`fit`."""
        self.bank_features = torch.cat([self.bank_features, self.features(x).to(self.bank_features)])
        self.bank_labels = torch.cat([self.bank_labels, y.to(self.bank_labels)])

    def fit(self) -> dict[str, Any]:
        """Refit the layer from zero on everything stored; returns (and keeps in ``last_fit``) the fit's info."""
        W, b, info = fit_softmax_regression(self.bank_features.cpu(), self.bank_labels.cpu(), self.num_classes,
                                            self.l2)
        self.weight.copy_(W)
        self.bias.copy_(b)
        self.fitted.zero_()
        self.fitted[self.bank_labels.unique()] = True
        self.last_fit = {**info, "n_features": len(self.bank_labels)}
        return self.last_fit

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        logits = self.features(x).to(self.weight) @ self.weight.T + self.bias
        return logits.masked_fill(~self.fitted.unsqueeze(0), float("-inf")).float()


class LinearProbeStrategy(OptimizerFreeStrategy):
    """Avalanche strategy for :class:`LinearProbe`: one pass stores the experience's features, then one fit (a
    convex solve, not an optimizer in Avalanche's sense)."""

    model_type = LinearProbe

    def fold(self, x: Tensor, y: Tensor) -> None:
        self.model.store(x, y)

    def after_pass(self) -> None:
        self.model.fit()
