"""lame: Laplacian Adjusted Maximum-likelihood Estimation (Boudiaf, Mueller, Ben Ayed, Bertinetto, CVPR 2022,
"Parameter-free Online Test-time Adaptation"). Output-only: the model is used exactly as given (eval mode, nothing
changes); each batch's predictions are replaced by assignments z_i that stay close to the model's probabilities p_i
and agree with the assignments of the sample's neighbours in feature space.

With p_i = softmax(model(x_i)), features f_i = the classifier's input (L2-normalised) and an affinity w_ij between
them, LAME minimises over the simplex the paper's objective (its equation numbers were not checked here, the
paper text being out of reach, so the formulas are written out)

    L(z) = sum_i KL(z_i || p_i) - sum_ij w_ij z_i^T z_j,

by its concave-convex procedure (CCCP), a fixed-point iteration from z^0 = p:

    z_i^(n+1) = softmax( log p_i + sum_j w_ij z_j^(n) )                        (CCCP step)

until the bound's energy E^(n) = sum_i [ -log p_i . z_i - (W z^(n-1))_i . z_i + z_i . log z_i ] changes by at most
``tolerance`` relative to the previous one (checked from the third iteration on), or ``max_steps`` iterations.
As in the reference, log p_i is log(p_i + 1e-10) and z log z clips z at 1e-20.

Affinities (on the normalised features; d_ij the Euclidean distance):
- "rbf" (the reference's default): w_ij = exp(-d_ij^2 / (2 sigma^2)), sigma = the mean over i of the distance from
  f_i to its ``knn``-th nearest point counting itself (so the (knn - 1)-th nearest other point); dense, w_ii = 1.
- "knn": w_ij = 1 for the ``knn`` nearest other points j of i, else 0 (not symmetric unless ``force_symmetry``).
- "linear": w_ij = f_i . f_j.
``force_symmetry`` replaces W by (W + W^T) / 2.

Reference: MD ``classification/methods/lame.py`` (from fiveai/LAME) at 8b2ed63; defaults ``cfg.LAME``: AFFINITY
"rbf", KNN 5, SIGMA 1.0, FORCE_SYMMETRY False; 100 steps, relative tolerance 1e-8, lambda 1 (fixed in the code).
Its SIGMA is unused by every affinity (rbf sets sigma from the data), so it is not an option here. Differences:

- The reference returns z itself. We return logits whose softmax is z exactly: the last iteration's argument of the
  softmax, log(p_i + 1e-10) + (W z^(n-1))_i (finite, unlike log z, whose entries may underflow to 0).
- Features come from the single forward via :class:`~tta.source_stats.FeatureTap` on the classifier layer (the last
  nn.Linear unless ``feature_layer`` names another), not from a split of the model into two parts.
- Distances are computed pairwise without the (N, N, D) difference tensor (``torch.cdist`` without the matmul
  shortcut): the same values to rounding, far less memory.
- A batch of 1 has no neighbours: the Laplacian term vanishes and the model's logits are returned unchanged (the
  reference's rbf affinity divides 0 by 0 there). If every point's k-th distance is 0 (duplicates), 2 sigma^2 would
  be 0: it is clamped to the dtype's smallest normal number (identical points get affinity 1, others 0).
- The energy check reads one number per iteration back to the host (as the reference's ``.item()`` does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from tta.base import Adapted
from tta.options import MethodOptions, option
from tta.registry import register
from tta.source_stats import FeatureTap, classifier_layer

UNARY_EPS = 1e-10  # the reference's -log(p + 1e-10)
LOG_CLIP = 1e-20  # and z log z with z clipped at 1e-20


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances, computed from differences (exact zeros on the diagonal)."""
    return torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")


def affinity_matrix(features: torch.Tensor, kind: str, knn: int) -> torch.Tensor:
    """The (N, N) affinity W of the (normalised) features: "rbf", "knn" or "linear" (see the module docstring)."""
    n = features.shape[0]
    if kind == "linear":
        return features @ features.T
    dist = pairwise_distances(features)
    if kind == "knn":
        # the knn nearest points other than i: the knn + 1 nearest, less the first (i itself, at distance 0)
        neighbours = dist.topk(min(knn + 1, n), dim=-1, largest=False).indices[:, 1:]
        return torch.zeros_like(dist).scatter_(-1, neighbours, 1.0)
    if kind == "rbf":
        kth = dist.topk(min(knn, n), dim=-1, largest=False).values[:, -1]  # k-th nearest, counting i itself
        sigma = kth.mean()
        return torch.exp(-dist ** 2 / (2 * sigma ** 2).clamp_min(torch.finfo(dist.dtype).tiny))
    raise ValueError(f"affinity must be 'rbf', 'knn' or 'linear', got {kind!r}")


def laplacian_assignment(log_probs: torch.Tensor, affinity: torch.Tensor, max_steps: int = 100,
                         tolerance: float = 1e-8) -> tuple[torch.Tensor, int]:
    """The CCCP iterations z <- softmax(log p + W z) from z = p; returns the last softmax argument (its softmax is
    the final z) and the number of iterations run."""
    z = log_probs.softmax(-1)
    argument = log_probs
    previous = float("inf")
    steps = 0
    for step in range(max_steps):
        pairwise = affinity @ z  # (W z^(n))_i
        argument = log_probs + pairwise
        z = argument.softmax(-1)  # CCCP step
        steps = step + 1
        # the bound's energy, sum_i [-log p_i . z_i - (W z^(n-1))_i . z_i + z_i . log z_i]
        energy = float((-log_probs * z - pairwise * z + z * torch.log(z.clamp_min(LOG_CLIP))).sum())
        if step > 1 and abs(energy - previous) <= tolerance * abs(previous):
            break
        previous = energy
    return argument, steps


@dataclass
class LameOptions(MethodOptions):
    """lame's options; defaults: the reference's (MD ``cfg.LAME``, the same as fiveai/LAME's defaults)."""

    affinity: Literal["rbf", "knn", "linear"] = option("rbf", "affinity between the normalised features: rbf "
                                                              "(bandwidth from the knn-th distances), knn or linear")
    knn: int = option(5, "neighbours: of the knn affinity; for rbf, the rank whose distance sets the bandwidth")
    force_symmetry: bool = option(False, "use (W + W^T) / 2 as the affinity")
    max_steps: int = option(100, "most fixed-point iterations per batch")
    tolerance: float = option(1e-8, "stop when the energy changes by at most this fraction of itself")
    feature_layer: str = option("", "the module whose input is the feature (empty: the last nn.Linear)")

    def __post_init__(self) -> None:
        if self.affinity not in ("rbf", "knn", "linear"):
            raise ValueError(f"affinity must be 'rbf', 'knn' or 'linear', got {self.affinity!r}")
        if self.knn < 1:
            raise ValueError(f"knn must be at least 1, got {self.knn}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


@register("lame")
class Lame(Adapted):
    """Laplacian-regularised adjustment of each batch's predictions by its feature neighbours; no parameter
    changes."""

    Options = LameOptions
    uses_classifier: ClassVar[bool] = True

    def _setup(self) -> None:
        name, _ = classifier_layer(self.model, self.options.feature_layer or None)
        # a plain attribute, not a submodule of the adapter: the tap already sits inside self.model
        object.__setattr__(self, "_recorder", FeatureTap.install(self.model, name))
        self.last_steps = 0

    def _teardown(self) -> None:
        self._recorder.remove()

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(x)
            features = self._recorder.features
            if features is None or features.shape[0] != logits.shape[0]:
                rows = None if features is None else features.shape[0]
                raise ValueError(f"lame: the feature layer's input has {rows} rows for a batch of "
                                 f"{logits.shape[0]}; name the classifier with feature_layer=")
            self._recorder.features = None  # do not keep the batch's features alive between batches
            if logits.shape[0] == 1:
                self.last_steps = 0
                return logits
            log_probs = torch.log(logits.softmax(1) + UNARY_EPS)  # -unary
            affinity = affinity_matrix(F.normalize(features, p=2, dim=-1), self.options.affinity, self.options.knn)
            if self.options.force_symmetry:
                affinity = 0.5 * (affinity + affinity.T)
            adjusted, self.last_steps = laplacian_assignment(log_probs, affinity.to(log_probs.dtype),
                                                             self.options.max_steps, self.options.tolerance)
            return adjusted
