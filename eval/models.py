"""A small registry of model entries: architecture, weights source, input normalisation, number of classes.

Every model returned by :func:`load_model` takes images in [0, 1]; its input normalisation belongs to the entry
(never guessed) and runs inside the model as a :class:`Normalize` module. Weights are always loaded with
``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import tta._compat  # noqa: F401
from eval.cifar_resnet import CifarResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{file}"


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std as buffers (so they move with the model)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """``net(normalize(x))``; ``forward_features`` passes through when the network has one."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.net, "forward_features"):
            raise AttributeError(f"{type(self.net).__name__} has no forward_features")
        return self.net.forward_features(self.normalize(x))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[[], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    input_size: int
    weights_file: str | None = None  # file name of the published checkpoint
    weights_url: str | None = None  # where it is downloaded from when no local path is given
    notes: str = field(default="", compare=False)


MODELS: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    MODELS[entry.name] = entry
    return entry


for _depth, _file in ((20, "resnet20-12fca82f.th"), (32, "resnet32-d509ac18.th"),
                      (44, "resnet44-014dd654.th"), (56, "resnet56-4bfd9763.th")):
    register_model(ModelEntry(
        name=f"cifar10_resnet{_depth}",
        build=lambda d=_depth: CifarResNet(d, 10),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10, input_size=32,
        weights_file=_file, weights_url=AKAMASTER_URL.format(file=_file),
        notes="akamaster/pytorch_resnet_cifar10 (BSD-2-Clause); trained with ImageNet mean/std normalisation",
    ))


def _torchvision_entry(name: str) -> ModelEntry:
    import torchvision

    arch = name.split(":", 1)[1]
    if arch not in torchvision.models.list_models():
        raise ValueError(f"unknown torchvision model {arch!r}")
    return ModelEntry(name=name, build=lambda: torchvision.models.get_model(arch, weights=None),
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000, input_size=224)


def model_entry(name: str) -> ModelEntry:
    """The entry for a registered name, or ``torchvision:<arch>`` for any torchvision ImageNet model."""
    if name.startswith("torchvision:"):
        return _torchvision_entry(name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}, or torchvision:<arch>")
    return MODELS[name]


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file, loaded with ``weights_only=True`` (a pickle carrying code is refused).

    Accepts a bare state dict or one nested under 'state_dict' / 'model' / 'model_state_dict'; strips the
    DataParallel prefix 'module.'.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        raise ValueError(
            f"could not load checkpoint {path} with weights_only=True ({type(error).__name__}: {error}). "
            "It is truncated, corrupted, or contains pickled code, which is never executed."
        ) from error
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def download_weights(entry: ModelEntry, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download the entry's published checkpoint (needs a network) and check its sha256 prefix when named."""
    if entry.weights_url is None or entry.weights_file is None:
        raise ValueError(f"model {entry.name} has no published weights; pass weights=PATH")
    cache = Path(cache_dir or Path.home() / ".cache" / "tta-runtime" / "weights")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / entry.weights_file
    if not target.exists():
        torch.hub.download_url_to_file(entry.weights_url, str(target), progress=True)
    prefix = entry.weights_file.split("-")[-1].split(".")[0]
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if len(prefix) == 8 and not digest.startswith(prefix):
        raise ValueError(f"{target}: sha256 {digest[:8]} does not match the expected prefix {prefix}")
    return target


def load_model(name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               download: bool = False) -> nn.Module:
    """Build a registered model with its input normalisation, load weights, return it in eval mode.

    ``weights``: a checkpoint path (state dict, loaded with ``weights_only=True``). Without it, ``download=True``
    fetches the published weights; otherwise the model keeps its random initialisation only if the entry has no
    published weights (an error is raised otherwise, so results are never silently random).
    """
    entry = model_entry(name)
    net = entry.build()
    if weights is None and download:
        weights = download_weights(entry)
    if weights is not None:
        state = load_checkpoint(weights)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    elif entry.weights_url is not None:
        raise ValueError(f"model {name} needs weights: pass weights=PATH (e.g. {entry.weights_file}) or download=True")
    model = NormalizedModel(net, entry.mean, entry.std)
    return model.to(device).eval()
