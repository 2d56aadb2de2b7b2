"""results.jsonl: one JSON record per finished (method, segment), appended durably, read tolerantly.

A record is appended as one line, flushed and fsynced. If a run is killed mid-write, the last line may be
incomplete: readers ignore a trailing line that does not parse, and the next append first cuts the file back
to its last complete line. So no record is ever half-read, lost once written, or duplicated.

Also the project's one way to replace a whole file atomically (:func:`replace_atomically`, used for config.json,
bench.json, reports and checkpoints).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

from eval import kill_points


class ResultsLog:
    """Append-only JSON-lines file of result records."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        lines = self.path.read_bytes().split(b"\n")
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) - 1:  # an interrupted final write: ignore it
                    break
                raise ValueError(f"{self.path}: line {number + 1} is not valid JSON; the file is corrupted") from None
        return records

    def _cut_incomplete_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict[str, Any], *, kill_points_here: bool = False) -> None:
        """Append one record durably. ``kill_points_here``: this append is a result record, whose write the
        crash tests may interrupt (:mod:`eval.kill_points`: ``torn_record`` halfway, ``record`` after it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_incomplete_tail()
        line = _line(record)
        with open(self.path, "ab") as f:
            if kill_points_here:
                kill_points.reached("torn_record", before_kill=lambda: _write_synced(f, line[: len(line) // 2]))
            _write_synced(f, line)
        if kill_points_here:
            kill_points.reached("record")

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.append(record)

    def replace(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the whole file with ``records`` atomically (readers see the old file or the new one)."""
        data = b"".join(_line(record) for record in records)
        replace_atomically(self.path, lambda handle: handle.write(data))


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()


def _write_synced(handle: BinaryIO, data: bytes) -> None:
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file through a unique temporary file in the same folder, fsync it, then ``os.replace`` it: readers
    see the old file or the new one, never a partial one, and concurrent writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_with_temporaries(path: str | os.PathLike) -> None:
    """Delete ``path`` and any temporary file that a killed :func:`replace_atomically` left beside it."""
    path = Path(path)
    for leftover in [path, *path.parent.glob(f".{path.name}.*.tmp")]:
        leftover.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON (indented, sorted keys; unknown types as strings) atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    replace_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    replace_atomically(path, lambda handle: handle.write(text.encode("utf-8")))
