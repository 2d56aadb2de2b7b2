"""Snapshot and bitwise restore of exactly what a method can change: chosen tensors and optimizer state.

No deepcopy of the model: only the listed tensors (norm-layer parameters and buffers) are cloned.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch


class Snapshot:
    """Clones of the given tensors (and an optimizer's state), restorable in place, bitwise."""

    def __init__(self, tensors: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        self._tensors = [t for t in tensors if t is not None]
        with torch.no_grad():
            self._saved = [t.detach().clone() for t in self._tensors]
        self._optimizer = optimizer
        self._optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, saved in zip(self._tensors, self._saved):
                tensor.copy_(saved)
        if self._optimizer is not None:
            # load_state_dict replaces the whole state (an empty saved state clears Adam's moments) and the groups.
            self._optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
