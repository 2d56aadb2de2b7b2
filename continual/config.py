"""The full, resolved configuration of a continual run (what config.json holds) and its validation."""
from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

METHODS = ("sgd", "er", "er_ace", "nmc")
NORMS = ("bn", "none", "adab2n", "layer", "rms", "nap")
SCHEDULES = ("constant", "linear", "cosine", "cosine-per-task")

# per-benchmark defaults for fields left as None
_DEFAULTS: dict[str, dict[str, Any]] = {
    "split-digits": {"model": "cnn", "epochs": 1, "batch_size": 10},
    "split-cifar10": {"model": "resnet18-reduced", "epochs": 1, "batch_size": 10},
    "split-cifar100": {"model": "resnet18-reduced", "epochs": 1, "batch_size": 10},
    "random-labels": {"model": "mlp", "epochs": 20, "batch_size": 32, "n_train": 512, "image_size": 16},
}
# fields that may change between a run and its resumption
RESUMABLE_CHANGES = ("seeds", "device", "threads")


@dataclass
class ContinualConfig:
    """Everything that determines a run. ``None`` fields are resolved by :meth:`resolved`."""

    benchmark: str = "split-digits"
    data: str | None = None
    method: str = "er"
    norm: str = "bn"
    model: str | None = None
    width: int | None = None
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    tasks: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    image_size: int | None = None
    shuffle_classes: bool = False
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    buffer: int = 500
    replay_batch_size: int | None = None
    # AdaB2N
    kappa: float = 0.7
    lambda_reg: float = 1.0
    adab2n_prior: str = "seen"
    reg_start_task: int = 1
    adab2n_task_source: str | None = None  # label | experience (None: label for split-*, experience otherwise)
    # NaP / inserted norms
    nap_kind: str = "layer"
    nap_every: int = 1
    nap_project_output: bool = False
    nap_project_affine: bool = True
    # NMC
    backbone: str | None = None
    weights: str | None = None
    nmc_metric: str = "euclidean"
    nmc_renormalize: bool = False
    # run
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "cpu"
    threads: int | None = None

    def resolved(self) -> "ContinualConfig":
        """Fill benchmark defaults and check the combination; raises ValueError with the reason."""
        from continual.benchmarks import BENCHMARKS

        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.benchmark!r}; known: {', '.join(BENCHMARKS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; known: {', '.join(NORMS)}")
        updates = {k: v for k, v in _DEFAULTS[self.benchmark].items() if getattr(self, k) is None}
        config = replace(self, **updates)
        if config.adab2n_task_source is None:
            config.adab2n_task_source = "experience" if config.benchmark == "random-labels" else "label"
        if config.method == "nmc":
            config.backbone = config.backbone or "cifar10_resnet56"
            config.norm = "none"
            config.epochs = 1
        else:
            if config.backbone is not None:
                raise ValueError("--backbone is for --method nmc; trained methods use --model")
            if config.norm in ("layer", "rms", "nap") and config.model == "resnet18-reduced":
                raise ValueError(f"--norm {config.norm} inserts norms into nn.Sequential models (cnn, mlp); "
                                 "the reduced ResNet-18 applies F.relu inside its blocks")
            if config.norm == "adab2n" and config.model == "mlp":
                raise ValueError("--norm adab2n replaces BatchNorm layers; the mlp has none (use cnn or "
                                 "resnet18-reduced)")
        if config.adab2n_prior not in ("seen", "present"):
            raise ValueError("adab2n_prior must be 'seen' or 'present'")
        if config.adab2n_task_source not in ("label", "experience"):
            raise ValueError("adab2n_task_source must be 'label' or 'experience'")
        if config.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}")
        if config.optimizer not in ("sgd", "adam"):
            raise ValueError("optimizer must be 'sgd' or 'adam'")
        if config.nap_kind not in ("layer", "rms"):
            raise ValueError("nap_kind must be 'layer' or 'rms'")
        if config.nmc_metric not in ("euclidean", "cosine"):
            raise ValueError("nmc_metric must be 'euclidean' or 'cosine'")
        if not 0.0 <= config.kappa <= 1.0:
            raise ValueError("kappa must be in [0, 1]")
        if config.buffer < 0 or config.epochs < 1 or config.batch_size < 1:
            raise ValueError("buffer must be >= 0, epochs and batch size >= 1")
        if config.method == "sgd":
            config.buffer = 0
        if not config.seeds:
            raise ValueError("at least one seed")
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContinualConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown configuration fields {sorted(unknown)}")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for config.json."""
    import avalanche
    import numpy
    import torch

    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "avalanche": getattr(avalanche, "__version__", "unknown"), "numpy": numpy.__version__}
