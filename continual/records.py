"""Atomic files for resumable runs: JSON-lines records appended with fsync, JSON and checkpoints via tmp+replace."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from eval.records import ResultsLog


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one fsynced JSON line (:class:`eval.records.ResultsLog`: one results-log mechanism for the project)."""
    ResultsLog(path).append(record)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a JSON-lines file ([] if absent); a line torn by a crash is ignored."""
    return ResultsLog(path).read()


def latest_by_key(records: Iterable[dict[str, Any]], keys: tuple[str, ...] = ("seed", "experience")) -> list[dict]:
    """One record per key (the last one written wins), in first-seen key order."""
    chosen: dict[tuple, dict] = {}
    for record in records:
        chosen[tuple(record[k] for k in keys)] = record
    return list(chosen.values())


def _replace_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temporary file and os.replace (readers never see a half-written file)."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    _replace_atomically(Path(path), lambda handle: handle.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    _replace_atomically(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save via a temporary file and os.replace. Keep ``state`` to tensors and plain Python containers,
    so :func:`load_checkpoint` can read it with ``weights_only=True``."""
    _replace_atomically(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)
