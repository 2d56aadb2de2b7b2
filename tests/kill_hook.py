"""Run a command so that it kills itself at a named point (``eval.kill_points``), for crash-and-resume tests.

The kill lands at the same place on a slow or a fast machine: right after the k-th checkpoint, right after the
k-th record, or halfway through writing the k-th record, as counted by the process itself.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Sequence

from eval.kill_points import ENV

REPO = Path(__file__).resolve().parents[1]


def environment(kill_at: str | None = None, **extra: str) -> dict[str, str]:
    """The test environment: this checkout importable, ``TTA_KILL_AT`` set to ``kill_at`` (or removed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop(ENV, None)
    if kill_at is not None:
        env[ENV] = kill_at
    return env


def run_to_completion(command: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` without a kill point; fail the test unless it exits 0."""
    done = subprocess.run(list(command), cwd=REPO, env=environment(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-4000:]}"
    return done


def run_killed_at(command: Sequence[str], kill_at: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` with ``TTA_KILL_AT=kill_at``; fail the test unless it died of that SIGKILL (a run that
    finished first never reached the point: the test's schedule is wrong)."""
    done = subprocess.run(list(command), cwd=REPO, env=environment(kill_at), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == -signal.SIGKILL, (
        f"expected the run to kill itself at {kill_at}, got exit {done.returncode}\n{done.stderr[-4000:]}")
    return done
