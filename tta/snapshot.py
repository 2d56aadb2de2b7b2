"""Snapshot and bitwise restore of exactly what a method can change: chosen tensors and optimizer state.

No deepcopy of the model: only the listed tensors (norm-layer parameters and buffers) are cloned.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch


def weights_changed() -> None:
    """Drop autocast's cached low-precision copies of weights, after trainable tensors changed in place.

    Inside a ``torch.autocast`` region, autocast casts each float32 leaf that requires grad (a trainable weight) to
    float16 or bfloat16 once and reuses that copy until the outermost region exits. An adapter that updates weights
    in place and runs the model again in the same region (its next step, memo's next image, SAR's perturbed pass, a
    caller's whole loop under one region) would otherwise compute with the weights from before the change: memo
    under bf16 autocast predicted like the source model. Outside autocast the cache is empty and this does nothing.
    """
    torch.clear_autocast_cache()


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
        weights_changed()
