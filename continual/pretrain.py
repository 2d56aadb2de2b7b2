"""Pre-train a backbone on held-out classes, so that NMC and its bounds are class-incremental for real.

The feature extractor must never have seen a class it is later asked to learn. ``tta continual
--pretrain-classes K`` trains the run's ``--model`` with cross-entropy on the training images of the first K classes
of the class order only (:func:`continual.benchmarks.build_benchmark` holds them out of the stream), then freezes it
(nmc, linear_probe) or fine-tunes it with a fresh head (sgd, er, er_ace) on the remaining classes.

Recipe (fixed, so the three methods of a seed share one backbone bit for bit): SGD with momentum 0.9 and weight
decay 5e-4, learning rate ``lr`` decayed by a cosine to 0 over all steps, mini-batches of ``batch_size`` reshuffled
every epoch by a generator seeded with the run's seed, the model in train mode (BatchNorm statistics update).
The report counts the labels of every batch that reaches the loss, so "trained only on these classes" is a
measured fact of the run, not an assumption (the tests assert on it).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def pretrain(model: nn.Module, dataset: Dataset, *, epochs: int, lr: float, batch_size: int, seed: int,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train ``model`` in place on ``dataset`` (items ``(image, label)``, labels 0..K-1) with the module's recipe.

    Returns ``{"epochs", "steps", "images_per_label" (label -> images fed over all epochs), "final_loss" (mean
    loss of the last epoch)}``; the model is left in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator))
    total = epochs * len(loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    seen: dict[int, int] = {}
    model.to(device).train()
    loss_sum = 0.0
    for _ in range(epochs):
        loss_sum, count = 0.0, 0
        for x, y in loader:
            for label, n in zip(*torch.unique(y, return_counts=True)):
                seen[int(label)] = seen.get(int(label), 0) + int(n)
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, count = loss_sum + float(loss.detach()) * len(y), count + len(y)
        loss_sum /= max(count, 1)
    model.eval()
    return {"epochs": epochs, "steps": total, "images_per_label": dict(sorted(seen.items())),
            "final_loss": round(loss_sum, 6)}


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``dataset``."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / total if total else float("nan")


def describe_backbone(model: nn.Module, stream: Any, report: dict[str, Any], batch_size: int = 256,
                      device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a backbone record says about a model pre-trained on ``stream.pretrain_train`` (a
    :class:`continual.benchmarks.TaskStream`): the classes it was trained on (from the labels counted in
    ``report``, as original class ids and names), the classes left to the stream, images, epochs, its accuracy on
    the test images of its own classes, and its :func:`fingerprint`."""
    counts = report["images_per_label"]  # labels of the batches that reached the loss, over all epochs
    trained_on = [stream.pretrain_classes[label] for label in counts]
    return {"trained_on_classes": trained_on, "trained_on_class_names": [stream.class_names[c] for c in trained_on],
            "incremental_classes": stream.incremental_classes,
            "incremental_class_names": [stream.class_names[c] for c in stream.incremental_classes],
            "n_images": len(stream.pretrain_train),
            "images_fed_per_class": {str(c): n for c, n in zip(trained_on, counts.values())},
            **{k: v for k, v in report.items() if k != "images_per_label"},
            "test_accuracy_on_trained_classes": round(accuracy(model, stream.pretrain_test, batch_size, device), 6),
            "n_test_images": len(stream.pretrain_test), "fingerprint": fingerprint(model)}


def fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every tensor of the state dict in key order: equal backbones, equal strings."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def head_name(model: nn.Module) -> str:
    """The attribute holding the model's final Linear layer (``head`` of the cnn / mlp, ``linear`` of the ResNet)."""
    for name in ("head", "linear"):
        if isinstance(getattr(model, name, None), nn.Linear):
            return name
    raise ValueError(f"{type(model).__name__} has no 'head' or 'linear' Linear layer to replace")


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a freshly initialised head with ``num_classes`` outputs (the pre-training head had K)."""
    name = head_name(model)
    old: nn.Linear = getattr(model, name)
    setattr(model, name, nn.Linear(old.in_features, num_classes).to(old.weight.device))
    return model

