"""Explicit learning-rate schedules (multipliers of each parameter group's base learning rate) and their plugin.

NaP makes the effective learning rate constant, so any decay must be explicit (METHODS.md, NaP step 4).
A schedule maps the number of optimiser steps taken so far to a multiplier.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from avalanche.core import SupervisedPlugin

from continual.config import SCHEDULES

Schedule = Callable[[int], float]


def constant() -> Schedule:
    return lambda step: 1.0


def linear_decay(total_steps: int, final: float = 0.0) -> Schedule:
    """1 at step 0, ``final`` at ``total_steps`` and after, linear in between."""
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    return lambda step: 1.0 + (final - 1.0) * min(step, total_steps) / total_steps


def cosine_decay(total_steps: int, final: float = 0.0) -> Schedule:
    """Half a cosine from 1 at step 0 to ``final`` at ``total_steps``."""
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    return lambda step: final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def cosine_per_task(steps_per_task: int, final: float = 0.0) -> Schedule:
    """A cosine decay within every task, restarted at each task boundary (annealing without losing plasticity)."""
    inner = cosine_decay(steps_per_task, final)
    return lambda step: inner(step % steps_per_task)


def make_schedule(name: str, total_steps: int, steps_per_task: int | None = None, final: float = 0.0) -> Schedule:
    """A schedule by name (:data:`SCHEDULES`); linear and cosine run over ``total_steps``."""
    if name == "constant":
        return constant()
    if name == "linear":
        return linear_decay(total_steps, final)
    if name == "cosine":
        return cosine_decay(total_steps, final)
    if name == "cosine-per-task":
        if not steps_per_task:
            raise ValueError("cosine-per-task needs steps_per_task")
        return cosine_per_task(steps_per_task, final)
    raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")


class LRSchedulePlugin(SupervisedPlugin):
    """Before every optimiser step, sets each group's lr to its base lr times ``schedule(steps so far)``.

    The base learning rates are read at the first step; the step counter is in ``state_dict`` (resumable).
    """

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        self.schedule, self.step = schedule, 0
        self.base_lrs: list[float] | None = None

    def before_update(self, strategy, **kwargs) -> None:
        groups = strategy.optimizer.param_groups
        if self.base_lrs is None:
            self.base_lrs = [float(g["lr"]) for g in groups]
        factor = float(self.schedule(self.step))
        for group, base in zip(groups, self.base_lrs):
            group["lr"] = base * factor

    def after_update(self, strategy, **kwargs) -> None:
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.base_lrs = int(state["step"]), state["base_lrs"]
