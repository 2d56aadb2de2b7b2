"""Atomic files for resumable runs: JSON-lines records appended with fsync, JSON and checkpoints via tmp+replace."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch

from eval.records import ResultsLog, replace_atomically
from eval.records import write_json_atomic as write_json  # noqa: F401  (re-exported for continual/)
from eval.records import write_text_atomic as write_text  # noqa: F401


def append_record(path: str | os.PathLike, record: dict[str, Any], *, kill_points_here: bool = False) -> None:
    """Append one fsynced JSON line (:class:`eval.records.ResultsLog`: one results-log mechanism for the project;
    ``kill_points_here`` as there)."""
    ResultsLog(path).append(record, kill_points_here=kill_points_here)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a JSON-lines file ([] if absent); a line torn by a crash is ignored."""
    return ResultsLog(path).read()


def latest_by_key(records: Iterable[dict[str, Any]], keys: tuple[str, ...] = ("seed", "experience")) -> list[dict]:
    """One record per key (the last one written wins), in first-seen key order."""
    chosen: dict[tuple, dict] = {}
    for record in records:
        chosen[tuple(record[k] for k in keys)] = record
    return list(chosen.values())


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save via a temporary file and os.replace. Keep ``state`` to tensors and plain Python containers,
    so :func:`load_checkpoint` can read it with ``weights_only=True``."""
    replace_atomically(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)
