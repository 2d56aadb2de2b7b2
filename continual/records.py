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


EXPERIENCE, SUMMARY, BACKBONE = "experience", "summary", "backbone"


def kind_of(record: dict[str, Any]) -> str:
    """A record's kind: ``"experience"`` (one row of the accuracy matrix), ``"summary"`` (a seed's metrics, after
    its last experience) or ``"backbone"`` (a seed's pre-trained backbone, before its first experience: what it was
    trained on). Records written before kinds existed have no ``kind``: they are experience records."""
    return record.get("kind", EXPERIENCE)


def experience_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The experience records among ``records`` (summary records left out), in file order."""
    return [record for record in records if kind_of(record) == EXPERIENCE]


def summary_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-seed summary records among ``records``, in file order."""
    return [record for record in records if kind_of(record) == SUMMARY]


def backbone_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-seed backbone records among ``records`` (runs with --pretrain-classes), in file order."""
    return [record for record in records if kind_of(record) == BACKBONE]


def latest_by_key(records: Iterable[dict[str, Any]], keys: tuple[str, ...] = ("seed", "experience")) -> list[dict]:
    """One record per key (the last one written wins), in first-seen key order. Give it experience records
    (:func:`experience_records`): a summary record has no ``experience``."""
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
