"""The driver of a sweep: decides which cells to run, writes what the workers return, resumes, reports.

Files in the sweep's folder, written by the driver alone:

- ``results.jsonl``: the records of every finished cell (each with ``cell``, its key, and ``sweep``, its place
  in the grid). While the sweep runs, a finished cell's records are appended as one block; when it ends the file
  is rewritten atomically in cell order (:func:`eval.sweep.sort_key`; within a cell, the stream's order), so the
  same sweep gives the same file whatever the number of workers and the order in which cells finished.
- ``cells.jsonl``: one line per settled cell, the latest line of a cell wins: ``{"kind": "done", "cell", "records",
  "fields"}`` once its records are written, or ``{"kind": "failed", "cell", "error", "traceback", "fields"}``
  for a cell that raised (or whose worker died on every try). ``fields`` are the settings its records depend on.
- ``results.md``, ``results_<table>.csv``, ``errors_<table>.png``: the report (:mod:`eval.sweep_report`).

Continual cells (:mod:`eval.sweep_continual`) are settled, resumed and ordered the same way.

A rerun skips done and failed cells and runs the others; ``retry_failed`` runs only the failed ones. Records of a
cell without a ``done`` line (the driver was stopped while writing them) are dropped and the cell runs again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

from tqdm.auto import tqdm

from eval.records import ResultsLog, write_json_atomic
from eval.sweep import Cell, Sweep, sort_key
from eval.sweep_cell import result_fields


class Executor(Protocol):
    """Runs cells somewhere and yields ``(cell, outcome)`` as they finish (see :class:`eval.sweep_ray.RayExecutor`);
    an outcome is ``{"status": "done", "records": [...]}`` or ``{"status": "failed", "error", "traceback"}``."""

    def run(self, cells: Sequence[Cell], on_start=None) -> Iterator[tuple[Cell, dict[str, Any]]]: ...


@dataclass
class SweepSummary:
    """What a call of :func:`run_sweep` did, by cell key."""

    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # failed in this call
    skipped: list[str] = field(default_factory=list)
    still_failed: list[str] = field(default_factory=list)  # failed cells of the grid, after this call


def latest_status(out: str | Path) -> dict[str, dict[str, Any]]:
    """The latest cells.jsonl entry of every cell, by key."""
    status: dict[str, dict[str, Any]] = {}
    for entry in ResultsLog(Path(out) / "cells.jsonl").read():
        status[entry["cell"]] = entry
    return status


def _check_same_settings(cells: Iterable[Cell], status: dict[str, dict[str, Any]], out: Path) -> None:
    for cell in cells:
        entry = status.get(cell.key)
        if entry is None or entry["kind"] != "done":  # a failed cell may be fixed by changing its settings
            continue
        now = result_fields(cell)
        changed = sorted(k for k in set(now) | set(entry["fields"]) if now.get(k) != entry["fields"].get(k))
        if changed:
            raise ValueError(f"{out} holds results of cell {cell.key} made with other settings ({', '.join(changed)} "
                             "differ); use another --out, or delete that folder to start again")


def _drop_unfinished(log: ResultsLog, status: dict[str, dict[str, Any]]) -> None:
    records = log.read()
    kept = [r for r in records if status.get(r.get("cell"), {}).get("kind") == "done"]
    if len(kept) != len(records):
        log.replace(kept)


def order_results(log: ResultsLog) -> list[dict[str, Any]]:
    """Rewrite results.jsonl in cell order (stable: a cell's records keep their order); returns the records."""
    records = log.read()
    ordered = sorted(records, key=lambda r: sort_key(r["sweep"]))
    if ordered != records:
        log.replace(ordered)
    return ordered


def run_sweep(sweep: Sweep, out: str | Path, executor: Executor, *, retry_failed: bool = False,
              progress: bool = True) -> SweepSummary:
    """Run the cells of ``sweep`` that are not settled yet (or only the failed ones) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = sweep.cells()
    status = latest_status(out)
    _check_same_settings(cells, status, out)
    write_json_atomic(out / "sweep.json", {"path": sweep.path, "cells": len(cells), "methods": sweep.methods,
                                           "models": sweep.models, "data": sweep.data, "protocols": sweep.protocols,
                                           "batch_sizes": sweep.batch_sizes, "seeds": sweep.seeds,
                                           "settings": sweep.settings,
                                           "continual": sweep.continual.describe() if sweep.continual else None})
    log = ResultsLog(out / "results.jsonl")
    ledger = ResultsLog(out / "cells.jsonl")
    _drop_unfinished(log, status)
    wanted = ("failed",) if retry_failed else (None,)
    todo = [c for c in cells if status.get(c.key, {}).get("kind") in wanted]
    chosen = {c.key for c in todo}
    summary = SweepSummary(skipped=[c.key for c in cells if c.key not in chosen])
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress or not todo)
    counts = {"running": 0, "failed": 0}

    def show(running: int | None = None) -> None:
        if running is not None:
            counts["running"] = running
        bar.set_postfix(done=bar.n - counts["failed"], running=counts["running"], failed=counts["failed"])

    for cell, outcome in executor.run(todo, on_start=show):
        fields = result_fields(cell)
        if outcome["status"] == "done":
            for record in outcome["records"]:
                log.append(record)
            ledger.append({"kind": "done", "cell": cell.key, "records": len(outcome["records"]), "fields": fields})
        else:
            ledger.append({"kind": "failed", "cell": cell.key, "error": outcome["error"],
                           "traceback": outcome["traceback"], "fields": fields})
            summary.failed.append(cell.key)
            counts["failed"] += 1
        summary.ran.append(cell.key)
        counts["running"] -= 1
        bar.update(1)
        show()
    bar.close()
    order_results(log)
    final = latest_status(out)
    summary.still_failed = [c.key for c in cells if final.get(c.key, {}).get("kind") == "failed"]
    return summary


def describe(summary: SweepSummary, out: Path) -> str:
    """A short account of a sweep call for the terminal."""
    lines = [f"cells run now: {len(summary.ran)} ({len(summary.failed)} failed), skipped: {len(summary.skipped)}"]
    if summary.still_failed:
        lines.append(f"{len(summary.still_failed)} cell(s) failed (errors and tracebacks in {out / 'cells.jsonl'}); "
                     "rerun with --retry-failed to run only those:")
        lines += [f"  {key}" for key in summary.still_failed]
    return "\n".join(lines)


def failed_entries(out: str | Path) -> list[dict[str, Any]]:
    """The cells.jsonl entries of the cells whose latest outcome is a failure."""
    return [e for e in latest_status(out).values() if e["kind"] == "failed"]
