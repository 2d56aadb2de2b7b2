"""Continual metrics against a hand-made accuracy matrix (METHODS.md definitions)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from continual import metrics

# R[i, j]: accuracy on task j after training task i
R = np.array([[0.9, 0.1, 0.0],
              [0.6, 0.8, 0.2],
              [0.5, 0.7, 0.9]])


def test_final_average_accuracy():
    assert metrics.final_average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)


def test_average_incremental_accuracy():
    # mean of 0.9, (0.6 + 0.8) / 2, (0.5 + 0.7 + 0.9) / 3
    assert metrics.average_incremental_accuracy(R) == pytest.approx((0.9 + 0.7 + 0.7) / 3)


def test_forgetting_and_bwt():
    # forgetting_0 = max(0.9, 0.6) - 0.5 = 0.4; forgetting_1 = max(0.1, 0.8) - 0.7 = 0.1
    assert metrics.forgetting_per_task(R) == pytest.approx([0.4, 0.1])
    assert metrics.forgetting(R) == pytest.approx(0.25)
    # BWT = ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert metrics.bwt(R) == pytest.approx(-0.25)


def test_forgetting_uses_every_earlier_row_as_written():
    R2 = R.copy()
    R2[0, 1] = 0.95  # task 1 scored high before it was trained
    assert metrics.forgetting_per_task(R2) == pytest.approx([0.4, 0.25])  # max over all i < T
    assert metrics.forgetting_per_task(R2, from_diagonal=True) == pytest.approx([0.4, 0.1])


def test_single_task_and_validation():
    one = [[0.7]]
    assert metrics.summary(one) == {"final_average_accuracy": 0.7, "average_incremental_accuracy": 0.7,
                                    "forgetting": 0.0, "bwt": 0.0}
    with pytest.raises(ValueError):
        metrics.final_average_accuracy([[0.1, 0.2]])


def test_accuracy_matrix_from_rows():
    assert np.array_equal(metrics.accuracy_matrix({1: R[1], 0: R[0], 2: R[2]}), R)
    with pytest.raises(ValueError, match="missing"):
        metrics.accuracy_matrix({0: R[0], 2: R[2], 3: R[1]})


def test_mean_std_and_aggregate():
    assert metrics.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert metrics.mean_std([0.5]) == (0.5, None)  # the spread of one value is undefined
    agg = metrics.aggregate({0: {"a": 1.0}, 1: {"a": 3.0}})
    assert agg["a"] == {"mean": 2.0, "std": pytest.approx(np.sqrt(2.0)), "n": 2}


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6).flatmap(lambda T: st.lists(st.lists(st.floats(0, 1), min_size=T, max_size=T),
                                                     min_size=T, max_size=T)))
def test_metric_identities(rows):
    R = np.array(rows)
    T = len(R)
    # forgetting_j >= R[j, j] - R[T, j] (the max includes row j), hence BWT >= -forgetting
    assert metrics.final_average_accuracy(R) == pytest.approx(float(np.mean(R[-1])))
    if T > 1:
        assert metrics.bwt(R) >= -metrics.forgetting(R, from_diagonal=True) - 1e-12
