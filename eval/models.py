"""A small registry of model entries: architecture, weights source, input normalisation, number of classes.

Every model returned by :func:`load_model` takes images in [0, 1]; its input normalisation belongs to the entry
(never guessed) and runs inside the model as a :class:`Normalize` module. Weights are always loaded with
``weights_only=True``; a model without weights is refused unless asked for on purpose (``random_weights=True``).
Errors name arguments through :mod:`eval.errors`, so the ``tta`` command shows its flags instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from eval.cifar_resnet import CifarResNet
from tta._extras import require
from eval.errors import DownloadError, MissingFileError, UsageError

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
    """``net(normalize(x))``; ``forward_features`` passes through when the network has one.

    ``outputs`` (a class map): the network's output index of each class of the data, in the data's class order;
    the model then returns only those logits (a 1000-class ImageNet model on a 200-class subset)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 outputs: list[int] | None = None) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.outputs: torch.Tensor | None
        self.register_buffer("outputs", None if outputs is None else torch.tensor(outputs, dtype=torch.long),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.normalize(x))
        return logits if self.outputs is None else logits.index_select(1, self.outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.net, "forward_features"):
            raise AttributeError(f"{type(self.net).__name__} has no forward_features")
        return self.net.forward_features(self.normalize(x))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]  # build() gives the default network; build(num_classes=N) when it accepts it
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None  # outputs of build(); None: not known before building (an --arch callable)
    input_size: int
    weights_file: str | None = None  # file name of the published checkpoint
    weights_url: str | None = None  # where it is downloaded from when no local path is given
    notes: str = field(default="", compare=False)

    def make(self, num_classes: int | None = None) -> nn.Module:
        """The network; with ``num_classes``, built for that many classes when the constructor takes the count.

        A constructor that does not take it is built as it is, and :func:`load_model` then checks its outputs."""
        if num_classes is None or num_classes == self.num_classes:
            return self.build()
        if not _accepts_num_classes(self.build):
            return self.build()
        try:
            return self.build(num_classes=num_classes)
        except TypeError as error:  # a **kwargs constructor that does not know the argument after all
            raise UsageError("{name} cannot be built with {num_classes} ({reason}); leave {num_classes} out",
                             name=self.name, reason=str(error)) from error


MODELS: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    MODELS[entry.name] = entry
    return entry


for _depth, _file in ((20, "resnet20-12fca82f.th"), (32, "resnet32-d509ac18.th"),
                      (44, "resnet44-014dd654.th"), (56, "resnet56-4bfd9763.th")):
    register_model(ModelEntry(
        name=f"cifar10_resnet{_depth}",
        build=lambda d=_depth, num_classes=10: CifarResNet(d, num_classes),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10, input_size=32,
        weights_file=_file, weights_url=AKAMASTER_URL.format(file=_file),
        notes="akamaster/pytorch_resnet_cifar10 (BSD-2-Clause); trained with ImageNet mean/std normalisation",
    ))


IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # (x - 0) / 1: for models that normalise inside
ROBUSTBENCH_SHAPES = {"cifar10": (32, 10), "cifar100": (32, 100), "imagenet": (224, 1000)}  # input size, classes


def robustbench_dir() -> Path:
    """Where robustbench checkpoints are looked for: $TTA_ROBUSTBENCH_DIR, else ~/.cache/tta-runtime/robustbench;
    robustbench's own layout below it: <dir>/<dataset>/corruptions/<name>.pt."""
    return Path(os.environ.get("TTA_ROBUSTBENCH_DIR", Path.home() / ".cache" / "tta-runtime" / "robustbench"))


def _robustbench_entry(name: str) -> ModelEntry:
    """``robustbench:<Name>`` (CIFAR-10) or ``robustbench:<dataset>/<Name>``, from the corruptions leaderboard."""
    zoo_module = require("robustbench.model_zoo", "robustbench models")
    enums = require("robustbench.model_zoo.enums", "robustbench models")
    model_dicts, BenchmarkDataset, ThreatModel = zoo_module.model_dicts, enums.BenchmarkDataset, enums.ThreatModel

    spec = name.split(":", 1)[1]
    dataset, _, model_name = spec.rpartition("/")
    dataset = dataset or "cifar10"
    if dataset not in ROBUSTBENCH_SHAPES:
        raise ValueError(f"robustbench dataset must be one of {', '.join(ROBUSTBENCH_SHAPES)}, got {dataset!r}")
    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel.corruptions]
    if model_name not in zoo:
        raise ValueError(f"robustbench has no {dataset} corruptions model {model_name!r}; known: {', '.join(zoo)}")
    size, classes = ROBUSTBENCH_SHAPES[dataset]
    return ModelEntry(name=name, build=zoo[model_name]["model"], mean=IDENTITY[0], std=IDENTITY[1],
                      num_classes=classes, input_size=size, weights_file=f"{dataset}/corruptions/{model_name}.pt",
                      notes="robustbench model: input normalisation is inside the network")


def _accepts_num_classes(build: Callable[..., nn.Module]) -> bool:
    """Whether a constructor takes ``num_classes`` (by name, or through ``**kwargs`` as torchvision's do)."""
    try:
        parameters = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _callable_entry(arch: str, mean: tuple[float, ...], std: tuple[float, ...], num_classes: int | None,
                    input_size: int) -> ModelEntry:
    """Any architecture given as ``package.module:callable`` returning an nn.Module (weights from a state dict)."""
    import importlib

    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--arch must look like package.module:callable, got {arch!r}")
    try:
        build = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {arch!r}: {error}") from error
    return ModelEntry(name=arch, build=build, mean=mean, std=std, num_classes=num_classes, input_size=input_size)


def _torchvision_entry(name: str) -> ModelEntry:
    import torchvision

    arch = name.split(":", 1)[1]
    if arch not in torchvision.models.list_models():
        raise ValueError(f"unknown torchvision model {arch!r}")
    return ModelEntry(name=name, build=lambda num_classes=1000: torchvision.models.get_model(
                          arch, weights=None, num_classes=num_classes),
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000, input_size=224,
                      weights_url=_torchvision_url(arch))


def _torchvision_url(arch: str) -> str | None:
    """Where torchvision downloads the default weights of ``arch`` from (None when it publishes none)."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).DEFAULT.url
    except (ValueError, AttributeError, KeyError):
        return None


def model_entry(name: str) -> ModelEntry:
    """The entry for a registered name, or ``torchvision:<arch>`` for any torchvision ImageNet model."""
    if name.startswith("torchvision:"):
        return _torchvision_entry(name)
    if name.startswith("robustbench:"):
        return _robustbench_entry(name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}, torchvision:<arch>, "
                         "robustbench:[<dataset>/]<name>, or --arch package.module:callable")
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
        raise ValueError(f"could not load checkpoint {path} with weights_only=True ({_reason(error)}): it is "
                         "truncated, corrupted, or contains pickled code, which is never executed; a checkpoint "
                         "should hold a state dict of tensors") from error
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _reason(error: Exception) -> str:
    """The one informative line of a torch.load error (its text also suggests weights_only=False: we never do)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    blocked = [line for line in lines if "unsupported GLOBAL" in line]
    return f"{type(error).__name__}: {(blocked or lines or [''])[0]}"


def download_weights(entry: ModelEntry, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download the entry's published checkpoint (needs a network) and check its sha256 prefix when named."""
    if entry.weights_url is None or entry.weights_file is None:
        raise UsageError("model {name} has no published weights; pass {weights}", name=entry.name)
    cache = Path(cache_dir or Path.home() / ".cache" / "tta-runtime" / "weights")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / entry.weights_file
    if not target.exists():
        with _download_errors(entry.name, entry.weights_url, target):
            torch.hub.download_url_to_file(entry.weights_url, str(target), progress=True)
    prefix = entry.weights_file.split("-")[-1].split(".")[0]
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if len(prefix) == 8 and not digest.startswith(prefix):
        raise ValueError(f"{target}: sha256 {digest[:8]} does not match the expected prefix {prefix}")
    return target


@contextlib.contextmanager
def _download_errors(what: str, url: str, target: Path | None) -> Iterator[None]:
    """Turns a failed download (URLError, requests' ConnectionError, a timeout: all OSErrors) into one
    :class:`DownloadError` naming what, from where, and where to put the file by hand."""
    try:
        yield
    except (FileNotFoundError, DownloadError):
        raise
    except OSError as error:
        text = str(getattr(error, "reason", "") or error)
        reason = text.splitlines()[0] if text else type(error).__name__
        place = f"save it as {target}" if target else "save it anywhere"
        raise DownloadError("could not download the weights of {what} from {url} ({reason}); on a machine with a "
                            "network, download that file, then {place} or pass {weights}",
                            what=what, url=url, reason=reason, place=place) from error


def load_model(name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               download: bool = False, entry: ModelEntry | None = None, *, random_weights: bool = False,
               num_classes: int | None = None, class_map: list[int] | None = None) -> nn.Module:
    """Build a model with its input normalisation, load weights, return it in eval mode.

    ``weights``: a checkpoint path (state dict, loaded with ``weights_only=True``). Without it: robustbench models
    are looked for in :func:`robustbench_dir`; ``download=True`` fetches published weights (needs a network).
    A model left with no weights is refused, so results are never silently random, unless
    ``random_weights=True`` asks for a random initialisation on purpose (timing, smoke tests).
    ``num_classes``: build the network for that many classes (passed to a constructor that takes it; otherwise
    its outputs must already number that many). ``class_map``: keep only these outputs, in this order (see
    :class:`NormalizedModel`). ``entry`` overrides the registry (e.g. one made by :func:`custom_entry`).
    """
    entry = entry or model_entry(name)
    if random_weights and (weights is not None or download):
        raise UsageError("{random_weights} asks for no weights, but {what} was given too: give one or the other",
                         what="a checkpoint" if weights is not None else "a download")
    net = entry.make(num_classes)
    if weights is None and name.startswith("robustbench:") and not random_weights:
        local = robustbench_dir() / entry.weights_file
        if local.exists():
            weights = local
        elif download:
            weights = _download_robustbench(name, entry)
        else:
            raise MissingFileError("robustbench checkpoint not found at {local}; put the file there (or set "
                                   "TTA_ROBUSTBENCH_DIR), pass {weights}, or {download}", local=local)
    if weights is None and download:
        if name.startswith("torchvision:"):
            net = _torchvision_pretrained(name, entry, num_classes)
        else:
            weights = download_weights(entry)
    if weights is not None:
        state = load_checkpoint(weights)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    elif not download and not random_weights:
        example = f" (e.g. {entry.weights_file})" if entry.weights_file else ""
        fetch = " or {download} (the published ones)" if entry.weights_url else ""
        raise UsageError("model {name} has no weights: pass {weights}{example}" + fetch + "; {random_weights} "
                         "evaluates a randomly initialised network on purpose", name=name, example=example)
    model = NormalizedModel(net, entry.mean, entry.std, outputs=class_map)
    if num_classes is not None or class_map is not None:
        _check_outputs(model, entry, num_classes, class_map)
    return model.to(device).eval()


def _torchvision_pretrained(name: str, entry: ModelEntry, num_classes: int | None) -> nn.Module:
    """torchvision's published ImageNet weights (downloaded into torch.hub's cache on first use)."""
    import torchvision

    arch = name.split(":", 1)[1]
    if num_classes not in (None, entry.num_classes):
        raise UsageError("{download} gives torchvision's ImageNet weights ({published} classes), not {count}; pass "
                         "{weights} for a {count}-class checkpoint, or a class map for a subset of ImageNet's "
                         "classes ({class_map})", published=entry.num_classes, count=num_classes)
    file = Path(urllib.parse.urlparse(entry.weights_url or "").path).name
    with _download_errors(name, entry.weights_url or "torchvision", Path(torch.hub.get_dir()) / "checkpoints" / file):
        return torchvision.models.get_model(arch, weights="DEFAULT")


def output_count(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Number of outputs (logits) of ``model`` on one image of ``image_shape`` (C, H, W), by one forward pass in
    eval mode (the model's mode is restored)."""
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    try:
        with torch.no_grad():
            return int(model.eval()(torch.zeros(1, *image_shape, device=device)).shape[-1])
    finally:
        model.train(was_training)


def _check_outputs(model: NormalizedModel, entry: ModelEntry, num_classes: int | None,
                   class_map: list[int] | None) -> None:
    """A class map must index existing outputs; a requested class count must be what the network gives."""
    channels = model.normalize.mean.shape[1]
    outputs = output_count(model.net, (channels, entry.input_size, entry.input_size))
    if class_map is not None:
        bad = [i for i in class_map if not 0 <= i < outputs]
        if bad:
            raise UsageError("the class map names outputs {bad} but {name} has {outputs} outputs (0..{last})",
                             bad=bad[:5], name=entry.name, outputs=outputs, last=outputs - 1)
        if num_classes is not None and len(class_map) != num_classes:
            raise UsageError("the class map lists {mapped} classes but {num_classes} is {count}",
                             mapped=len(class_map), count=num_classes)
    elif num_classes is not None and outputs != num_classes:
        raise UsageError("{name} gives {outputs} outputs, not {count}, and its constructor takes no num_classes; "
                         "build it for {count} classes yourself (an --arch callable), or leave {num_classes} out",
                         name=entry.name, outputs=outputs, count=num_classes)


def custom_entry(arch: str, mean: tuple[float, ...], std: tuple[float, ...], num_classes: int | None = None,
                 input_size: int = 32) -> ModelEntry:
    """An entry for ``--arch package.module:callable``; the input normalisation must be given, never guessed.
    ``num_classes``: what the callable builds by default, when known (None: found by running it)."""
    return _callable_entry(arch, tuple(mean), tuple(std), num_classes, input_size)


def _download_robustbench(name: str, entry: ModelEntry) -> Path:
    """robustbench's own download (Google Drive; needs a network) into :func:`robustbench_dir`."""
    robustbench_load = require("robustbench.utils", "downloading robustbench models").load_model

    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    dataset, _, model_name = name.split(":", 1)[1].rpartition("/")
    dataset = dataset or "cifar10"
    gdrive = model_dicts[BenchmarkDataset(dataset)][ThreatModel.corruptions][model_name].get("gdrive_id")
    url = f"https://drive.google.com/uc?id={gdrive}" if isinstance(gdrive, str) else "robustbench's Google Drive"
    with _download_errors(name, url, robustbench_dir() / entry.weights_file):
        robustbench_load(model_name, model_dir=str(robustbench_dir()), dataset=dataset, threat_model="corruptions")
    return robustbench_dir() / entry.weights_file
