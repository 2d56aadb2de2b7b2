"""cafa: class-aware feature alignment (Jung et al., ICCV 2023).

Pre-stage [verified]: class-conditional Gaussian statistics of the penultimate features on a small labelled
source subset (:func:`tta.source_stats`). Test time [verified]: pseudo-label y_hat = argmax of the prediction;
Mahalanobis distances D(x; mu_c, S) of the batch's features to every class mean; one gradient step per batch on
the BatchNorm affine parameters only (batch statistics, as in tent). Loss [reconstructed] (METHODS.md, from notes
on the paper and a third-party re-implementation), kept as :func:`cafa_loss`:

    L = mean_i log( D(x_i; mu_{y_hat_i}, S) / sum_c D(x_i; mu_c, S) )

``covariance='tied'`` uses the pooled within-class covariance (the only choice that fits at ImageNet scale);
``'class'`` one covariance per class. Each is regularised by a ridge ``ridge * trace(S) / D * I`` (scale-free)
and inverted once, at construction. CAFA is not source-free: it needs ``source_stats``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tta.base import GradientAdapter
from tta.options import GradientOptions, option
from tta.registry import register
from tta.source_stats import FeatureRecorder, SourceStats, classifier_layer


def regularised_inverse(covariance: torch.Tensor, ridge: float) -> torch.Tensor:
    """Inverse of ``S + ridge * trace(S)/D * I`` (batched over leading dimensions) via Cholesky."""
    d = covariance.shape[-1]
    scale = covariance.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    regularised = covariance + (ridge * scale)[..., None, None] * eye
    return torch.cholesky_inverse(torch.linalg.cholesky(regularised))


def mahalanobis_squared(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(B, C) squared Mahalanobis distances; ``precision`` (D, D) tied or (C, D, D) per class."""
    diff = features[:, None, :] - means[None, :, :]
    if precision.dim() == 2:
        return torch.einsum("bcd,de,bce->bc", diff, precision, diff)
    return torch.einsum("bcd,cde,bce->bc", diff, precision, diff)


def cafa_loss(features: torch.Tensor, logits: torch.Tensor, means: torch.Tensor,
              precision: torch.Tensor) -> torch.Tensor:
    """mean_i log(D(x_i; mu_{y_hat_i}) / sum_c D(x_i; mu_c)), y_hat = argmax of the logits."""
    distances = mahalanobis_squared(features, means, precision)
    pseudo = logits.argmax(1, keepdim=True)
    return torch.log(distances.gather(1, pseudo).squeeze(1) / distances.sum(1)).mean()


@dataclass
class CafaOptions(GradientOptions):
    source_stats: SourceStats | str | None = option(
        None, "class-conditional source feature statistics (tta.source_stats) or the path of a file saved with "
              "SourceStats.save; required", cli=False)
    covariance: Literal["tied", "class"] = option("tied", "covariance: one pooled ('tied') or one per class")
    ridge: float = option(1e-3, "ridge added to the covariance, relative to its mean variance (trace / D)")


@register("cafa")
class Cafa(GradientAdapter):
    """Align test features to the source class-conditional Gaussians by one step per batch on BN affine params."""

    Options = CafaOptions
    default_alpha = 0.0

    def _setup(self) -> None:
        stats = self.options.source_stats
        if stats is None:
            raise ValueError("cafa is not source-free: compute stats = tta.source_stats(model, labelled_batches) "
                             "and pass source_stats=stats (or the path of a file written by stats.save(path))")
        if not isinstance(stats, SourceStats):
            stats = SourceStats.load(stats)
        if self.options.covariance not in ("tied", "class"):
            raise ValueError(f"covariance must be 'tied' or 'class', got {self.options.covariance!r}")
        if self.options.covariance == "class" and stats.class_covariances is None:
            raise ValueError("covariance='class' needs per-class covariances: compute source_stats with "
                             "class_covariance=True")
        super()._setup()
        _, layer = classifier_layer(self.model, stats.feature_layer)
        self._recorder = FeatureRecorder(layer)
        dtype = self._dtype or torch.float32
        device = next(self.model.parameters()).device
        covariance = stats.tied_covariance if self.options.covariance == "tied" else stats.class_covariances
        self.register_buffer("class_means", stats.means.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("precision", regularised_inverse(covariance, self.options.ridge)
                             .to(device=device, dtype=dtype), persistent=False)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        features = self._recorder.features
        if features is None or features.shape[1] != self.class_means.shape[1]:
            got = None if features is None else features.shape[1]
            raise ValueError(f"cafa: the model's features have dimension {got}, the source statistics "
                             f"{self.class_means.shape[1]}; were they computed with this model?")
        return cafa_loss(features, logits, self.class_means, self.precision)

    def _teardown(self) -> None:
        self._recorder.remove()
        super()._teardown()
