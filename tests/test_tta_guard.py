"""The collapse guard against hand-made prediction streams."""
from __future__ import annotations

import math

import pytest
import torch

import tta
from tests.tta_nets import conv_net
from tta.guard import CollapseGuard, normalised_entropy


class _Scripted(tta.Adapted):
    """An adapter whose predictions are scripted (one class per call), to drive the guard exactly."""

    def __init__(self, classes_per_call):
        super().__init__(conv_net(), tta.MethodOptions(check_inputs=False))
        self.script = list(classes_per_call)
        self.resets = 0

    def _predict_and_adapt(self, x):
        logits = torch.zeros(x.shape[0], 4)
        logits[:, self.script.pop(0)] = 1.0
        return logits

    def reset(self):
        super().reset()
        self.resets += 1


def test_normalised_entropy_by_hand():
    assert normalised_entropy(torch.tensor([10, 0, 0, 0])) == 0.0
    assert normalised_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([1, 1, 0, 0])) == pytest.approx(math.log(2) / math.log(4))


def test_collapse_onto_one_class_resets_once_the_window_is_full():
    inner = _Scripted([2] * 10)
    guard = CollapseGuard(inner, window=40, min_entropy=0.3)
    for call in range(10):
        guard(torch.zeros(10, 3, 8, 8))
        # windows of 40 one-class samples trigger a reset after calls 4 and 8 (the history restarts after each)
        assert guard.resets == (call + 1) // 4
    assert inner.resets == 2


def test_diverse_predictions_never_reset_even_when_single_batches_are_one_class():
    inner = _Scripted([0, 1, 2, 3] * 5)  # each batch one class (label-correlated), the window mixes them
    guard = CollapseGuard(inner, window=40, min_entropy=0.3)
    for _ in range(20):
        guard(torch.zeros(10, 3, 8, 8))
    assert guard.resets == 0 and inner.resets == 0


def test_guard_wraps_a_real_adapter_and_reset_restores_it():
    guard = CollapseGuard(tta.adapt(conv_net(), "tent", lr=0.1), window=16, min_entropy=0.99)
    guard(torch.rand(8, 3, 8, 8))
    guard(torch.rand(8, 3, 8, 8))
    assert guard.resets >= 1  # 16 samples over 4 classes are never perfectly uniform: entropy < 0.99
    state = guard.state_dict()
    other = CollapseGuard(tta.adapt(conv_net(), "tent", lr=0.1), window=16, min_entropy=0.99)
    other.load_state_dict(state)
    assert other.resets == guard.resets
    with pytest.raises(ValueError):
        CollapseGuard(tta.adapt(conv_net(), "norm"), min_entropy=2.0)
