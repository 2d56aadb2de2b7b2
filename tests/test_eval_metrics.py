"""Metrics against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from eval.metrics import CalibrationBins, error_rate, expected_calibration_error, mce, online_error_curve


def _logits_with_confidence(confidences, predicted):
    """Two-class logits whose softmax maximum is the given confidence on the given class."""
    rows = []
    for c, p in zip(confidences, predicted):
        margin = math.log(c / (1 - c))
        rows.append([margin, 0.0] if p == 0 else [0.0, margin])
    return torch.tensor(rows, dtype=torch.float64)


def test_ece_by_hand():
    # confidences 0.95 (bin 15) x2: one right, one wrong; 0.62 (bin 10) x2: both right
    logits = _logits_with_confidence([0.95, 0.95, 0.62, 0.62], [0, 0, 1, 1])
    labels = torch.tensor([0, 1, 1, 1])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.62)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-6)


def test_ece_accumulates_like_one_batch():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(100, 5, generator=g) * 3, torch.randint(0, 5, (100,), generator=g)
    bins = CalibrationBins()
    for i in range(0, 100, 30):
        bins.update(logits[i:i + 30], labels[i:i + 30])
    assert bins.ece() == pytest.approx(expected_calibration_error(logits, labels), abs=1e-12)


def test_error_and_online_curve():
    assert error_rate(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 0, 0])) == pytest.approx(1 / 3)
    assert online_error_curve([1, 0, 3], [2, 2, 4]) == [0.5, 0.25, 0.5]


def test_mce_by_hand():
    errors = {"fog": {5: 0.2, 4: 0.1}, "snow": {5: 0.5}}
    baseline = {"fog": {5: 0.4, 4: 0.2, 3: 0.1}, "snow": {5: 0.25}}
    assert mce(errors, baseline) == pytest.approx(((0.3 / 0.6) + (0.5 / 0.25)) / 2)
    with pytest.raises(ValueError, match="no result for 'frost'"):
        mce({"frost": {5: 0.1}}, baseline)
