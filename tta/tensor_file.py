"""Small torch files of tensors, names and numbers: written atomically, read without unpickling code.

One place for how the runtime's cached artefacts (source statistics, Fisher information) reach disk, so that
each gives the same errors for a missing, unreadable or foreign file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch


def save_tensor_file(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_tensor_file(path: str | os.PathLike, *, what: str, kind: str, keys: Iterable[str]) -> dict[str, Any]:
    """Read a file written by :func:`save_tensor_file` (``weights_only=True``: no code is ever unpickled).

    ``what`` names the contents in errors ("source statistics"), ``kind`` the class that writes such files
    ("SourceStats"), ``keys`` those every such file holds.
    """
    path = Path(path)
    keys = list(keys)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"could not read {what} from {path}: {type(error).__name__}: {error}") from error
    if not isinstance(data, dict) or not set(keys) <= set(data):
        raise ValueError(f"{path} is not a {kind} file (expected keys {', '.join(keys)})")
    return data
