"""The diagonal Fisher information of the parameters a norm-affine method trains, from unlabelled source images
(EATA's anti-forgetting weights, Niu et al., ICML 2022, Eq. 9 as the reference code cites it).

The model is set up exactly as the gradient methods adapt it (BatchNorm normalising with the batch's statistics,
eval mode, only the affine parameters of the BatchNorm, LayerNorm and GroupNorm layers trainable). For each batch
the pseudo-labels are the model's own predictions, ``g`` is the gradient of the batch-mean cross-entropy against
them, and the Fisher diagonal is the mean over batches of ``g ** 2`` (the reference's normalisation: the squared
gradient of each batch's *mean* loss, so the values depend on the batch size; the reference uses the test batch
size, 200 on CIFAR, and 2000 source images). The parameters' values at that time are kept as the anchors
theta_0 of the penalty. Everything is keyed by parameter name (``model.named_parameters()``), which adapting a
model does not change.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tta.tensor_file import load_tensor_file, save_tensor_file
from tta.validation import check_batch


@dataclass
class FisherInfo:
    """Per-parameter Fisher diagonals and anchor values (both keyed by parameter name), and the batch count."""

    fisher: dict[str, torch.Tensor]
    anchors: dict[str, torch.Tensor]
    num_batches: int

    def __repr__(self) -> str:
        numbers = sum(t.numel() for t in self.fisher.values())
        return f"FisherInfo(parameters={len(self.fisher)}, numbers={numbers}, batches={self.num_batches})"

    def save(self, path: str | os.PathLike) -> None:
        """Write a small torch file (tensors, names and an integer only), atomically."""
        save_tensor_file({"fisher": dict(self.fisher), "anchors": dict(self.anchors),
                          "num_batches": self.num_batches}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FisherInfo":
        """Read a file written by :meth:`save` (``weights_only=True``: no code is ever unpickled)."""
        data = load_tensor_file(path, what="Fisher information", kind="FisherInfo",
                                keys=("fisher", "anchors", "num_batches"))
        return cls(fisher=data["fisher"], anchors=data["anchors"], num_batches=int(data["num_batches"]))


def _images(batch: Any) -> torch.Tensor:
    """The images of a batch: ``x`` of an ``(x, y)`` pair (the labels are not used), or the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def fisher(model: nn.Module, batches: Iterable[Any]) -> FisherInfo:
    """The Fisher diagonal of ``model``'s norm affine parameters over ``batches`` of source images (``x`` or
    ``(x, y)``; labels are ignored: the targets are the model's own predictions). The model is returned as it
    was given (layers, modes, ``requires_grad`` flags, values); no ``.grad`` is written."""
    from tta.methods.eta import Eta, EtaOptions  # the adapter whose setup the Fisher must match

    if torch.is_inference_mode_enabled():
        raise RuntimeError("tta.fisher takes gradients and cannot run inside torch.inference_mode()")
    adapter = Eta(model, EtaOptions())
    trained = {id(p) for p in adapter.params}
    named = [(name, p) for name, p in model.named_parameters() if id(p) in trained]
    sums: dict[str, torch.Tensor] = {}
    count = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                x = _images(batch)
                check_batch(x, method="fisher", ndim=adapter._input_ndim, dtype=adapter._dtype,
                            needs_batch_statistics=adapter.needs_batch_statistics)
                logits = model(x)
                loss = F.cross_entropy(logits, logits.detach().argmax(1))  # pseudo-labels, mean over the batch
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                for (name, _), grad in zip(named, grads):
                    if grad is not None:
                        square = grad.detach() ** 2
                        sums[name] = square + sums[name] if name in sums else square
                count += 1
        anchors = {name: p.detach().clone() for name, p in named if name in sums}
    finally:
        adapter.release()
    if count == 0:
        raise ValueError("tta.fisher got no batches")
    return FisherInfo(fisher={name: total / count for name, total in sums.items()}, anchors=anchors,
                      num_batches=count)
