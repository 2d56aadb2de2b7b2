"""t3a: Test-Time Template Adjuster (Iwasawa & Matsuo, NeurIPS 2021, "Test-Time Classifier Adjustment Module for
Model-Agnostic Domain Generalization"). The linear head is replaced by class prototypes built from support sets
that grow with confident test features; the network itself never changes.

Support sets (the paper's method section; its equation numbers were not checked here, the paper text being out
of reach, so the formulas are written out): every weight row w_j of the head (W, b) starts as a support, labelled
argmax_c (W w_j + b)_c (normally j) with entropy H(softmax(W w_j + b)), as both references do. For each test batch,
with z = the feature (the classifier's input) and the model's logits W z + b:

    S_k <- S_k + { z : argmax (W z + b) = k }                                   (pseudo-labelled supports)
    keep in each S_k only the M supports of lowest entropy H(softmax(W z + b))  (support filtering, M = filter_k)
    c_k = sum_{s in S_k} s / ||s||,   logits_k(z) = z . c_k / ||c_k||             (prototype classifier)

The batch's own features are added before it is classified. A class without supports has c_k = 0 (logit 0).

Reference: LINs-lab/ttab ``ttab/model_adaptation/t3a.py`` (default ``top_M`` 100, ``ttab/configs/algorithms.py``)
and the official matsuolab/T3A ``domainbed/adapt_algorithms.py`` (``filter_K`` chosen in {1, 5, 20, 50, 100, -1}
on validation data). Defaults: filter_k = 100 (TTAB's). Differences:

- Features come from the single forward via :class:`~tta.source_stats.FeatureTap` on the head (the last nn.Linear
  unless ``feature_layer`` names it), which also gives the model's logits W z + b: one forward per batch.
- The per-class filtering is one vectorised sort (stable: by entropy, then by label) instead of a loop over the
  classes; the supports keep the reference's order (by class, then by increasing entropy). Prototypes are summed
  with ``index_add`` instead of ``supports^T @ one_hot(labels)``: the same values to rounding. Labels are stored as
  class indices, not one-hot rows.
- filter_k = -1 keeps every support (in the official code, -1 slices ``[:-1]`` and drops each class's
  highest-entropy support; TTAB has no -1).
- The features are not normalised before the dot product, as in both references (only the prototypes are).

State: the supports, their labels and entropies, restored bitwise by ``reset()`` and saved in the adapter's
``state_dict`` (extra state) so a resumed run continues identically. Memory: at most
``filter_k * num_classes + batch`` feature vectors (ImageNet, ResNet-50: 100 x 1000 x 2048 floats, 0.8 GB).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.base import Adapted
from tta.options import MethodOptions, option
from tta.registry import register
from tta.source_stats import FeatureTap, classifier_layer


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(logits) (natural log)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def lowest_entropy_per_class(labels: torch.Tensor, entropies: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Indices of the ``k`` lowest-entropy supports of each class (every support when k = -1), ordered by class
    and then by increasing entropy (ties: by position)."""
    by_entropy = torch.argsort(entropies, stable=True)
    order = by_entropy[torch.argsort(labels[by_entropy], stable=True)]
    if k < 0:
        return order
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels, minlength=num_classes)
    first = torch.cumsum(counts, 0) - counts  # where each class starts in `order`
    rank = torch.arange(order.numel(), device=order.device) - first[sorted_labels]
    return order[rank < k]


def prototype_logits(features: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """z . c_k / ||c_k|| with c_k the sum of the normalised supports of class k."""
    normalised = F.normalize(supports, dim=1)
    centroids = normalised.new_zeros(num_classes, supports.shape[1]).index_add_(0, labels, normalised)
    return features @ F.normalize(centroids, dim=1).T


@dataclass
class T3AOptions(MethodOptions):
    """t3a's options; default: TTAB's top_M = 100."""

    filter_k: int = option(100, "supports kept per class, those of lowest entropy (-1: all; TTAB: 100; official "
                                "T3A: chosen in 1, 5, 20, 50, 100, all)")
    feature_layer: str = option("", "the linear classifier whose input is the feature (empty: the last nn.Linear)")

    def __post_init__(self) -> None:
        if self.filter_k == 0 or self.filter_k < -1:
            raise ValueError(f"filter_k must be a positive number of supports or -1 (all), got {self.filter_k}")


@register("t3a")
class T3A(Adapted):
    """Classify by prototypes of per-class support sets: the head's weights plus confident test features."""

    Options = T3AOptions
    uses_classifier: ClassVar[bool] = True

    def _setup(self) -> None:
        name, head = classifier_layer(self.model, self.options.feature_layer or None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"t3a replaces a linear classifier (its weight rows start the supports), but "
                             f"{name!r} is a {type(head).__name__}; name the nn.Linear head with feature_layer=")
        self.num_classes = head.out_features
        with torch.no_grad():
            weights = head.weight.detach().clone()
            warmup = head(weights)  # the head applied to its own rows: W w_j + b
        self._warmup = (weights, warmup.argmax(1), softmax_entropy(warmup))
        self._restore_warmup()
        # a plain attribute, not a submodule of the adapter: the tap already sits inside self.model
        object.__setattr__(self, "_recorder", FeatureTap.install(self.model, name))

    def _restore_warmup(self) -> None:
        self.supports, self.labels, self.entropies = (t.clone() for t in self._warmup)

    def _teardown(self) -> None:
        self._recorder.remove()

    def reset(self) -> None:
        super().reset()
        self._restore_warmup()

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(x)
            features = self._recorder.features
            self._recorder.features = None
            if features is None or features.shape[0] != logits.shape[0]:
                raise ValueError("t3a: the classifier's input does not have one row per sample; name the linear "
                                 "head with feature_layer=")
            device = features.device
            # pseudo-labelled supports: every test feature joins the set of its predicted class
            supports = torch.cat([self.supports.to(device), features.to(self.supports.dtype)])
            labels = torch.cat([self.labels.to(device), logits.argmax(1)])
            entropies = torch.cat([self.entropies.to(device), softmax_entropy(logits).to(self.entropies.dtype)])
            # support filtering: the filter_k lowest-entropy supports of each class
            keep = lowest_entropy_per_class(labels, entropies, self.options.filter_k, self.num_classes)
            self.supports, self.labels, self.entropies = supports[keep], labels[keep], entropies[keep]
            return prototype_logits(features, self.supports, self.labels, self.num_classes).to(logits.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "supports": self.supports.clone(), "labels": self.labels.clone(),
                "entropies": self.entropies.clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if "supports" in state:
            self.supports, self.labels, self.entropies = (state[key].clone().to(self._warmup[0].device)
                                                          for key in ("supports", "labels", "entropies"))
