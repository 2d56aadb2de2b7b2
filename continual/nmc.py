"""NMC, the nearest-mean classifier on a frozen pretrained feature extractor (Janson et al. 2022).

METHODS.md, "NMC" [verified, from the authors' code]: feature f = L2-normalised penultimate feature; class mean
= plain running mean of f over every sample seen, ``mu_c <- mu_c + (f - mu_c) / n_c`` (task-free, exemplar-free);
predict ``argmin_c ||f - mu_c||_2``. Options: ``renormalize`` the means to unit length before predicting (as
Avalanche's NCMClassifier does) or not; ``metric="euclidean"`` or ``"cosine"``. For unit features, cosine and
Euclidean-with-renormalised-means rank classes identically; Euclidean on raw means does not.

Means are accumulated in float64; a batch is folded in per class as ``mu += (sum f - k mu) / (n + k)``, which is
the per-sample recursion applied k times (identical in exact arithmetic, so the result does not depend on the
order or batching of the samples beyond rounding).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avalanche.training.templates import SupervisedTemplate


class StreamingClassMeans(nn.Module):
    """Per-class running means of feature vectors and their counts (buffers, so they checkpoint)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        features = features.detach().to(self.means)
        labels = labels.to(self.counts.device)
        for c in labels.unique().tolist():
            chosen = features[labels == c]
            k = len(chosen)
            n = int(self.counts[c])
            self.means[c] += (chosen.sum(0) - k * self.means[c]) / (n + k)
            self.counts[c] += k

    def distances(self, features: Tensor, metric: str = "euclidean", renormalize: bool = False) -> Tensor:
        """(N, C) distances to every class mean; +inf for classes never seen."""
        means = self.means
        if renormalize or metric == "cosine":
            means = F.normalize(means, dim=1)
        f = features.to(means.dtype)
        if metric == "euclidean":
            dist = torch.cdist(f, means)
        elif metric == "cosine":
            dist = 1.0 - F.normalize(f, dim=1) @ means.T
        else:
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        return dist.masked_fill((self.counts == 0).unsqueeze(0), float("inf"))


class ForwardFeatures(nn.Module):
    """Wraps a model so that ``forward`` returns ``model.forward_features(x)`` (the pooled penultimate feature)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "forward_features"):
            raise ValueError(f"{type(model).__name__} has no forward_features")
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


class NMCClassifier(nn.Module):
    """Frozen extractor + streaming class means. ``forward`` returns scores = -distance (argmax = nearest mean).

    The extractor stays in eval mode and without gradients whatever ``train()`` is called with, so its
    BatchNorm statistics never move.
    """

    def __init__(self, extractor: nn.Module, num_classes: int, dim: int, metric: str = "euclidean",
                 renormalize: bool = False, normalize_features: bool = True) -> None:
        super().__init__()
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        self.extractor = extractor.eval()
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        self.class_means = StreamingClassMeans(num_classes, dim)
        self.metric, self.renormalize, self.normalize_features = metric, renormalize, normalize_features

    def train(self, mode: bool = True) -> "NMCClassifier":
        super().train(mode)
        self.extractor.eval()
        return self

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        f = self.extractor(x).flatten(1)
        return F.normalize(f, dim=1) if self.normalize_features else f

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        self.class_means.update(self.features(x), y)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        dist = self.class_means.distances(self.features(x), self.metric, self.renormalize)
        return (-dist).float()


class OptimizerFreeStrategy(SupervisedTemplate):
    """An Avalanche strategy whose model learns without an optimizer or a loss: one pass per experience hands each
    mini-batch to :meth:`fold` (e.g. class means, a feature bank), then :meth:`after_pass` runs once. Plugins see
    before/after_training_iteration; forward/backward/update hooks do not fire (there is no SGD step)."""

    model_type: type[nn.Module] = nn.Module

    def __init__(self, *, model: nn.Module, train_mb_size: int = 256, eval_mb_size: int = 256,
                 device: str | torch.device = "cpu", **kwargs: Any) -> None:
        if not isinstance(model, self.model_type):
            raise TypeError(f"{type(self).__name__} needs a {self.model_type.__name__}")
        super().__init__(model=model, optimizer=None, train_mb_size=train_mb_size, train_epochs=1,
                         eval_mb_size=eval_mb_size, device=device, **kwargs)

    def fold(self, x: Tensor, y: Tensor) -> None:
        """Take one training mini-batch into the model."""
        raise NotImplementedError

    def after_pass(self) -> None:
        """What follows the experience's pass (nothing by default)."""

    def check_model_and_optimizer(self, **kwargs: Any) -> None:
        self.model = self.model.to(self.device)

    def make_optimizer(self, **kwargs: Any) -> None:
        return None

    def criterion(self) -> Tensor:
        return torch.zeros((), device=self.device)

    def training_epoch(self, **kwargs: Any) -> None:
        for self.mbatch in self.dataloader:
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.fold(self.mb_x, self.mb_y)
            self.loss = self._make_empty_loss()
            self._after_training_iteration(**kwargs)
        self.after_pass()


class NMCStrategy(OptimizerFreeStrategy):
    """Avalanche strategy for :class:`NMCClassifier`: training folds each mini-batch into the class means (one pass
    per experience, task-free: no task boundaries needed)."""

    model_type = NMCClassifier

    def fold(self, x: Tensor, y: Tensor) -> None:
        self.model.update(x, y)


def feature_dim(extractor: nn.Module | Callable[[Tensor], Tensor], image_shape: tuple[int, ...]) -> int:
    """Width of the extractor's (flattened) output, from one forward of a zero image."""
    was_training = getattr(extractor, "training", False)
    if hasattr(extractor, "eval"):
        extractor.eval()
    with torch.no_grad():
        device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
        dim = extractor(torch.zeros((1,) + tuple(image_shape), device=device)).flatten(1).shape[1]
    if was_training and hasattr(extractor, "train"):
        extractor.train()
    return int(dim)
