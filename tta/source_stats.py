"""Class-conditional Gaussian statistics of a model's penultimate features on labelled source data (for CAFA).

The features are the input of the classifier layer (by default the last ``nn.Linear`` of the model), computed
with the pretrained model in eval mode. Sums are accumulated in float64 in one streaming pass, so memory does
not grow with the number of batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Iterable

import torch
from torch import nn

from tta.tensor_file import load_tensor_file, save_tensor_file


def classifier_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The layer whose input is the penultimate feature: ``name`` if given, else the last nn.Linear."""
    if name is not None:
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no submodule {name!r}") from None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("found no nn.Linear classifier in the model; pass feature_layer='<module whose input is "
                         "the penultimate feature>'")
    return linears[-1]


class FeatureTap(nn.Module):
    """Stands in for the classifier layer: calls it and keeps its flattened input as ``features``.

    Installed in place of the layer (:meth:`install`) and removed again (:meth:`remove`). It is a module rather
    than a forward pre-hook because ``torch.compile`` does not guard on hooks: a compiled copy of the same
    architecture without the hook would be reused and the features never recorded. The layer's parameters,
    buffers and children are registered under their own names (the same tensors), so ``state_dict`` keys and
    values are unchanged while the tap is in place.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: its tensors are registered directly below
        for name, parameter in layer.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in layer.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in layer._non_persistent_buffers_set)
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.features: torch.Tensor | None = None
        object.__setattr__(self, "_parent", None)  # plain attributes: a registered parent would be a cycle
        self._attr = ""

    @classmethod
    def install(cls, model: nn.Module, name: str) -> "FeatureTap":
        """Replace ``model.<name>`` with a tap around it."""
        if not name:
            raise ValueError("the feature layer cannot be the model itself; name a submodule")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        tap = cls(getattr(parent, attr))
        setattr(parent, attr, tap)
        object.__setattr__(tap, "_parent", parent)
        tap._attr = attr
        return tap

    def forward(self, x: torch.Tensor, *args, **kwargs):
        self.features = x.flatten(1)
        return self.layer(x, *args, **kwargs)

    def remove(self) -> None:
        """Put the original layer back (its tensors were shared, so it holds their current values)."""
        if self._parent is not None and getattr(self._parent, self._attr) is self:
            setattr(self._parent, self._attr, self.layer)
        object.__setattr__(self, "_parent", None)


@dataclass
class SourceStats:
    """Per-class means (C, D), sample counts (C,), pooled within-class ("tied") covariance (D, D) and, optionally,
    per-class covariances (C, D, D); all float64, unbiased."""

    means: torch.Tensor
    counts: torch.Tensor
    tied_covariance: torch.Tensor
    class_covariances: torch.Tensor | None = None
    feature_layer: str | None = None

    def __repr__(self) -> str:
        kinds = "tied" + (" + per-class" if self.class_covariances is not None else "")
        return (f"SourceStats(classes={self.num_classes}, dim={self.dim}, samples={int(self.counts.sum())}, "
                f"covariance={kinds}, feature_layer={self.feature_layer!r})")

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def save(self, path: str | os.PathLike) -> None:
        """Write a small torch file (tensors and a string only), atomically."""
        save_tensor_file({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SourceStats":
        """Read a file written by :meth:`save` (``weights_only=True``: no code is ever unpickled)."""
        data = load_tensor_file(path, what="source statistics", kind="SourceStats",
                                keys=("means", "counts", "tied_covariance"))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def source_stats(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 feature_layer: str | None = None, num_classes: int | None = None,
                 class_covariance: bool | None = None) -> SourceStats:
    """Class-conditional feature statistics of ``model`` over labelled ``(x, y)`` batches.

    ``class_covariance``: also compute per-class covariances (C x D x D floats); None = only when that holds at
    most 50 million numbers (ImageNet's 1000 x 2048^2 would be 16 GB: the tied covariance is used there).
    Every class must have at least two samples (one for the tied covariance alone).
    """
    name, layer = classifier_layer(model, feature_layer)
    if num_classes is None and isinstance(layer, nn.Linear):
        num_classes = layer.out_features
    modes = {n: m.training for n, m in model.named_modules()}
    model.eval()
    recorder = FeatureTap.install(model, name)
    counts = sums = outer = class_outer = None
    try:
        with torch.no_grad():
            for x, y in batches:
                model(x)
                f = recorder.features.double().cpu()
                y = torch.as_tensor(y).long().cpu()
                if num_classes is None:
                    raise ValueError("pass num_classes= when the feature layer is not an nn.Linear")
                if counts is None:
                    d = f.shape[1]
                    if class_covariance is None:
                        class_covariance = num_classes * d * d <= 50_000_000
                    counts = torch.zeros(num_classes, dtype=torch.float64)
                    sums = torch.zeros(num_classes, d, dtype=torch.float64)
                    outer = torch.zeros(d, d, dtype=torch.float64)
                    if class_covariance:
                        class_outer = torch.zeros(num_classes, d, d, dtype=torch.float64)
                if y.numel() and (y.min() < 0 or y.max() >= num_classes):
                    raise ValueError(f"labels must be in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
                counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
                sums.index_add_(0, y, f)
                outer += f.t() @ f
                if class_outer is not None:
                    class_outer.index_add_(0, y, f[:, :, None] * f[:, None, :])
    finally:
        recorder.remove()
        for n, m in model.named_modules():
            m.train(modes.get(n, m.training))
    if counts is None:
        raise ValueError("source_stats got no batches")
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"source_stats: no samples of class(es) {missing[:20]}; every class needs samples")
    means = sums / counts[:, None]
    scatter = outer - (means.t() * counts) @ means  # sum_c sum_i (f - mu_c)(f - mu_c)^T
    dof = counts.sum() - num_classes
    if dof < 1:
        raise ValueError("source_stats needs more samples than classes for the pooled covariance")
    tied = scatter / dof
    class_cov = None
    if class_outer is not None:
        if (counts < 2).any():
            raise ValueError("per-class covariances need at least two samples per class; pass class_covariance=False")
        centred = class_outer - counts[:, None, None] * means[:, :, None] * means[:, None, :]
        class_cov = centred / (counts - 1)[:, None, None]
    return SourceStats(means=means, counts=counts, tied_covariance=tied, class_covariances=class_cov,
                       feature_layer=name)
