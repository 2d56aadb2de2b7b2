"""A ``tta sweep --plugin`` module for the sweep tests: a method that fails on demand, and a kill on the first try.

Imported in the driver and in every worker (as a user's plugin would be), it registers ``fails_unless``: the
source model, except that building it raises while the file named by its ``marker`` option does not exist (a
cell that raises, then succeeds once the test creates the file). When ``TTA_TEST_KILL_MARKER`` names a file that
does not exist yet, importing this module creates it and sets ``TTA_KILL_AT`` to ``TTA_TEST_KILL_AT``: the first
worker of the cell given those variables kills itself at that point (:mod:`eval.kill_points`), its retry runs
normally; every worker importing it with the marker set adds its process id to ``<marker>.tries``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tta
from tta.methods.source import Source, SourceOptions
from tta.options import option


@dataclass
class FailsUnlessOptions(SourceOptions):
    marker: str = option("", "file that must exist, or building the method raises")


@tta.register("fails_unless")
class FailsUnless(Source):
    """The source model; raises on construction while ``options.marker`` does not exist."""

    Options = FailsUnlessOptions

    def _setup(self) -> None:
        if not Path(self.options.marker).exists():
            raise RuntimeError(f"marker {self.options.marker} does not exist")


_marker = os.environ.get("TTA_TEST_KILL_MARKER")
if _marker:
    with open(_marker + ".tries", "a") as tries:  # one line per worker that ran the cell
        tries.write(f"{os.getpid()}\n")
    if not Path(_marker).exists():
        Path(_marker).touch()
        os.environ["TTA_KILL_AT"] = os.environ["TTA_TEST_KILL_AT"]
