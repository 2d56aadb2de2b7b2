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
from torch import nn

from tta.base import GradientAdapter
from tta.options import GradientOptions, option
from tta.registry import register
from tta.source_stats import FeatureTap, SourceStats, classifier_layer


def regularised_inverse(covariance: torch.Tensor, ridge: float) -> torch.Tensor:
    """Inverse of ``S + ridge * trace(S)/D * I`` (batched over leading dimensions) via Cholesky."""
    d = covariance.shape[-1]
    scale = covariance.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    regularised = covariance + (ridge * scale)[..., None, None] * eye
    return torch.cholesky_inverse(torch.linalg.cholesky(regularised))


class TiedMahalanobis(nn.Module):
    """Squared Mahalanobis distances to every class mean under one (tied) precision, as an expanded quadratic form.

    ``(f - mu_c) P (f - mu_c) = f P f - 2 (f P) . mu_c + mu_c P mu_c``: the (B, C, D) differences of the direct
    form are never built, and ``mu P`` and ``mu P mu`` are computed once (non-persistent buffers, so they move
    with ``.to()``). At ImageNet scale (B 64, C 1000, D 2048) a forward and backward take about 0.1 s instead of
    14 s on CPU. Features and means are first centred on the mean of the class means (distances are
    shift-invariant), which keeps the terms small and the cancellation mild; rounding can still make a distance
    slightly negative, so it is clamped at zero.
    """

    def __init__(self, means: torch.Tensor, precision: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or means.dtype
        # The centre is rounded to the working dtype first, so features and means are centred on the very same
        # point: subtracting it from a nearby float32 feature is exact, and no rounding of the centre enters.
        centre = means.mean(0).to(dtype).to(means.dtype)
        centred = means - centre
        means_precision = centred @ precision
        for name, value in (("centre", centre), ("means", centred), ("precision", precision),
                            ("means_precision", means_precision), ("means_norm", (means_precision * centred).sum(1))):
            self.register_buffer(name, value.to(dtype), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        centred = features - self.centre
        features_norm = ((centred @ self.precision) * centred).sum(1, keepdim=True)
        cross = centred @ self.means_precision.T
        return (features_norm - 2.0 * cross + self.means_norm).clamp_min(0.0)


def mahalanobis_squared(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(B, C) squared Mahalanobis distances; ``precision`` (D, D) tied or (C, D, D) per class."""
    if precision.dim() == 2:
        return TiedMahalanobis(means, precision)(features)
    diff = features[:, None, :] - means[None, :, :]
    return torch.einsum("bcd,cde,bce->bc", diff, precision, diff)


def loss_from_distances(distances: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """mean_i log(D_i,y_hat_i / sum_c D_i,c), y_hat = argmax of the logits."""
    pseudo = logits.argmax(1, keepdim=True)
    return torch.log(distances.gather(1, pseudo).squeeze(1) / distances.sum(1)).mean()


def cafa_loss(features: torch.Tensor, logits: torch.Tensor, means: torch.Tensor,
              precision: torch.Tensor) -> torch.Tensor:
    """mean_i log(D(x_i; mu_{y_hat_i}) / sum_c D(x_i; mu_c)), y_hat = argmax of the logits."""
    return loss_from_distances(mahalanobis_squared(features, means, precision), logits)


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
    source_data = "class-conditional feature statistics of labelled source images (tta.source_stats)"
    uses_classifier = True
    default_alpha = 0.0

    @classmethod
    def source_options(cls, model: nn.Module, batches, options: CafaOptions | None = None) -> dict:
        """``source_stats`` from labelled source batches (:func:`tta.source_stats`; per-class covariances when
        ``options.covariance == 'class'``)."""
        from tta.source_stats import source_stats

        per_class = True if options is not None and options.covariance == "class" else None  # None: when it fits
        return {"source_stats": source_stats(model, batches, class_covariance=per_class)}

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
        name, _ = classifier_layer(self.model, stats.feature_layer)
        # a plain attribute, not a submodule of the adapter: the tap already sits inside self.model
        object.__setattr__(self, "_recorder", FeatureTap.install(self.model, name))
        dtype = self._dtype or torch.float32
        device = next(self.model.parameters()).device
        covariance = stats.tied_covariance if self.options.covariance == "tied" else stats.class_covariances
        precision = regularised_inverse(covariance, self.options.ridge)
        tied = self.options.covariance == "tied"
        self.register_buffer("class_means", stats.means.to(device=device, dtype=dtype), persistent=False)
        # Tied: the expanded form holds the precision and its constant parts (computed in float64, then cast);
        # per class: the (C, D, D) precisions for the direct form.
        self.tied_distances = TiedMahalanobis(stats.means, precision, dtype).to(device) if tied else None
        self.register_buffer("precision", None if tied else precision.to(device=device, dtype=dtype),
                             persistent=False)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) squared Mahalanobis distances of the features to the source class means, in the model's dtype
        even under autocast: the expanded form cancels large terms, and a precision matrix's entries overflow
        float16 (every step was skipped as non-finite) or lose the distances to bfloat16's 8-bit mantissa."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.to(self.class_means.dtype)  # float16/bfloat16 features under autocast
            if self.tied_distances is not None:
                return self.tied_distances(features)
            return mahalanobis_squared(features, self.class_means, self.precision)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        features = self._recorder.features
        if features is None or features.shape[1] != self.class_means.shape[1]:
            got = None if features is None else features.shape[1]
            raise ValueError(f"cafa: the model's features have dimension {got}, the source statistics "
                             f"{self.class_means.shape[1]}; were they computed with this model?")
        return loss_from_distances(self.distances(features), logits)

    def _teardown(self) -> None:
        self._recorder.remove()
        super()._teardown()
