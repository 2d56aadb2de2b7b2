"""Metrics as pure functions (and one small accumulator): error, calibration, mean error, mCE, online curves."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch


def error_rate(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of wrong top-1 predictions."""
    return float((logits.argmax(1) != labels).float().mean())


@dataclass
class CalibrationBins:
    """Equal-width confidence bins (15 by default, as in Guo et al. 2017), accumulated batch by batch."""

    n_bins: int = 15
    count: torch.Tensor = field(init=False)
    confidence: torch.Tensor = field(init=False)
    correct: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.n_bins, dtype=torch.float64)
        self.confidence = torch.zeros(self.n_bins, dtype=torch.float64)
        self.correct = torch.zeros(self.n_bins, dtype=torch.float64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        probs = logits.detach().float().softmax(1).cpu()
        conf, pred = probs.max(1)
        # bin b holds confidences in (b/n, (b+1)/n]; confidence 0 cannot occur for a softmax maximum
        bins = (conf * self.n_bins).ceil().long().clamp(1, self.n_bins) - 1
        self.count.index_add_(0, bins, torch.ones_like(conf, dtype=torch.float64))
        self.confidence.index_add_(0, bins, conf.double())
        self.correct.index_add_(0, bins, (pred == labels.cpu()).double())

    def ece(self) -> float:
        """Expected calibration error: sum_b (n_b / n) * |accuracy_b - confidence_b|."""
        total = self.count.sum()
        if total == 0:
            return float("nan")
        return float((self.correct - self.confidence).abs().sum() / total)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    bins = CalibrationBins(n_bins)
    bins.update(logits, labels)
    return bins.ece()


def online_error_curve(batch_wrong: Sequence[int], batch_sizes: Sequence[int]) -> list[float]:
    """Cumulative error after each batch: the error a user of the stream has seen so far."""
    curve, wrong, seen = [], 0, 0
    for w, n in zip(batch_wrong, batch_sizes):
        wrong, seen = wrong + w, seen + n
        curve.append(wrong / seen)
    return curve


def mean_error(errors: Iterable[float]) -> float:
    values = list(errors)
    return sum(values) / len(values) if values else float("nan")


def mce(errors: Mapping[str, Mapping[int, float]], baseline: Mapping[str, Mapping[int, float]]) -> float:
    """Mean corruption error (Hendrycks & Dietterich 2019): mean over corruptions of
    sum_s E_method(c, s) / sum_s E_baseline(c, s), over the severities both have; times 100 gives the usual %."""
    ratios = []
    for corruption, by_severity in errors.items():
        if corruption not in baseline:
            raise ValueError(f"the baseline has no result for {corruption!r}")
        severities = sorted(set(by_severity) & set(baseline[corruption]))
        if not severities:
            raise ValueError(f"the baseline has no severity of {corruption!r} in common with the results")
        denominator = sum(baseline[corruption][s] for s in severities)
        ratios.append(sum(by_severity[s] for s in severities) / denominator if denominator else float("inf"))
    return mean_error(ratios)
