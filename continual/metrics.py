"""Continual-learning metrics as pure functions of an accuracy matrix (METHODS.md, "Continual metrics").

``R[i, j]`` is the accuracy on task ``j`` after training task ``i`` (rows: training progress, columns: tasks),
0-indexed here, so the last row is ``R[T - 1]``. Accuracies are fractions in [0, 1]; nothing here rescales.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


def _square(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {R.shape}")
    return R


def accuracy_matrix(rows: Mapping[int, Sequence[float]] | Sequence[Sequence[float]]) -> np.ndarray:
    """Stack per-experience accuracy rows (``{experience: [acc on task 0..T-1]}`` or a list) into R."""
    if isinstance(rows, Mapping):
        missing = [i for i in range(len(rows)) if i not in rows]
        if missing:
            raise ValueError(f"accuracy rows missing for experiences {missing}")
        rows = [rows[i] for i in range(len(rows))]
    return _square(rows)


def final_average_accuracy(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """mean_j R[T, j]: average accuracy over all tasks after the last one."""
    R = _square(R)
    return float(R[-1].mean())


def average_incremental_accuracy(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """mean_i (mean_{j <= i} R[i, j]): the average accuracy on the tasks seen so far, averaged over time."""
    R = _square(R)
    return float(np.mean([R[i, : i + 1].mean() for i in range(len(R))]))


def forgetting_per_task(R: Sequence[Sequence[float]] | np.ndarray, from_diagonal: bool = False) -> np.ndarray:
    """forgetting_j = max_{i < T} R[i, j] - R[T, j] for every task j < T (the last task cannot be forgotten yet).

    As METHODS.md writes it, the max runs over every earlier row, including rows before task j was trained
    (for class-incremental streams those are ~0 and change nothing). ``from_diagonal=True`` restricts it to
    ``j <= i < T`` (Chaudhry et al. 2018), for streams where untrained tasks can score high.
    """
    R = _square(R)
    T = len(R)
    if T == 1:
        return np.zeros(0)
    out = np.empty(T - 1)
    for j in range(T - 1):
        start = j if from_diagonal else 0
        out[j] = R[start : T - 1, j].max() - R[T - 1, j]
    return out


def forgetting(R: Sequence[Sequence[float]] | np.ndarray, from_diagonal: bool = False) -> float:
    """Average forgetting over tasks j < T (0.0 for a single task)."""
    values = forgetting_per_task(R, from_diagonal)
    return float(values.mean()) if values.size else 0.0


def bwt(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Backward transfer: mean_{j < T} (R[T, j] - R[j, j]); negative when old tasks are forgotten."""
    R = _square(R)
    T = len(R)
    if T == 1:
        return 0.0
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def summary(R: Sequence[Sequence[float]] | np.ndarray) -> dict[str, float]:
    """All scalar metrics of one accuracy matrix, by name."""
    return {
        "final_average_accuracy": final_average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": bwt(R),
    }


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1) over seeds; the spread of a single seed is undefined: None."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values")
    std = float(array.std(ddof=1)) if array.size > 1 else None
    return float(array.mean()), std


def aggregate(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{seed: {metric: value}}`` -> ``{metric: {"mean", "std", "n"}}`` over the seeds that have the metric."""
    names = sorted({name for metrics in per_seed.values() for name in metrics})
    out: dict[str, dict[str, float]] = {}
    for name in names:
        values = [metrics[name] for metrics in per_seed.values() if name in metrics]
        mean, std = mean_std(values)
        out[name] = {"mean": mean, "std": std, "n": len(values)}
    return out
