"""Deterministic crash points for the crash-and-resume tests.

A run that is killed must resume to the same results whatever moment the kill lands on. Killing after a timer
depends on the machine's speed, so the runs name their risky moments instead, and ``TTA_KILL_AT`` makes the
process SIGKILL itself at the k-th occurrence of one of them:

- ``checkpoint``: right after a checkpoint was written, before its record is appended (the window the
  resume logic exists for);
- ``record``: right after a record was appended to results.jsonl;
- ``torn_record``: in the middle of appending a record: half the line is written and fsynced, then the kill.

``TTA_KILL_AT=record:3`` kills at the third record this process appends; several points may be given, separated
by commas (``checkpoint:2,record:5``). Counts are per process, so each rerun counts from zero. Unset (the normal
case), every call is a dictionary lookup that does nothing.
"""
from __future__ import annotations

import os
import signal
from typing import Callable

ENV = "TTA_KILL_AT"
POINTS = ("checkpoint", "record", "torn_record")

_reached: dict[str, int] = {}


def _targets() -> dict[str, int]:
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return {}
    targets = {}
    for part in spec.split(","):
        point, _, count = part.strip().partition(":")
        if point not in POINTS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}={spec!r}: give POINT:K with POINT one of {', '.join(POINTS)} and K >= 1, "
                             "separated by commas")
        targets[point] = int(count)
    return targets


def reached(point: str, before_kill: Callable[[], object] | None = None) -> None:
    """Count one occurrence of ``point``; at the occurrence ``TTA_KILL_AT`` names, call ``before_kill`` (if any)
    and SIGKILL this process."""
    if point not in POINTS:
        raise ValueError(f"unknown kill point {point!r}; known: {', '.join(POINTS)}")
    target = _targets().get(point)
    if target is None:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == target:
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)
