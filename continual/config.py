"""The full, resolved configuration of a continual run (what config.json holds) and its validation.

An option that cannot apply to the chosen method, norm, model or benchmark is an error (never silently ignored):
see :data:`INAPPLICABLE`.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

METHODS = ("sgd", "er", "er_ace", "nmc", "linear_probe")
FROZEN = ("nmc", "linear_probe")  # methods on a frozen feature extractor (a loaded --backbone or a pre-trained one)
NORMS = ("bn", "none", "adab2n", "layer", "rms", "nap")
SCHEDULES = ("constant", "linear", "cosine", "cosine-per-task")

# per-benchmark defaults for fields left as None
_DEFAULTS: dict[str, dict[str, Any]] = {
    "split-digits": {"model": "cnn", "epochs": 1, "batch_size": 10},
    "split-cifar10": {"model": "resnet18-reduced", "epochs": 1, "batch_size": 10},
    "split-cifar100": {"model": "resnet18-reduced", "epochs": 1, "batch_size": 10},
    "random-labels": {"model": "mlp", "epochs": 20, "batch_size": 32, "n_train": 512, "image_size": 16},
}
# On split-digits the CNN learns only with BatchNorm (or AdaB2N): the digits are upscaled to 32 x 32 on a blank
# background, so the pooled features of a CNN without batch centring share a large common part (their spread
# across samples is ~7 % of their size at initialisation) and one pass of SGD learns the class prior only (50 % on
# every 2-class task at lr 0.03 to 1.0, with per-position LayerNorm, GroupNorm(1) or no norm alike). The mlp,
# whose LayerNorm acts on whole hidden vectors, learns every task, so it is the default for those norms there.
_MLP_NORMS_ON_DIGITS = ("none", "layer", "rms", "nap")
# fields that may change between a run and its resumption
RESUMABLE_CHANGES = ("seeds", "device", "threads")


def _trained(c: "ContinualConfig") -> bool:
    return c.method not in FROZEN


def _pretrained(c: "ContinualConfig") -> bool:
    return c.pretrain_classes is not None


def _builds_network(c: "ContinualConfig") -> bool:
    """The run builds its --model: to train it, or to pre-train it as a frozen method's feature extractor."""
    return _trained(c) or _pretrained(c)


def _digits(c: "ContinualConfig") -> bool:
    from continual.benchmarks import BENCHMARKS

    return (c.data or BENCHMARKS[c.benchmark]["source"]) == "digits"


def _model(c: "ContinualConfig") -> str:
    return c.model or default_model(c.benchmark, c.norm)


def default_model(benchmark: str, norm: str | None) -> str:
    """The benchmark's default network for a normalisation variant (see _MLP_NORMS_ON_DIGITS)."""
    if benchmark == "split-digits" and norm in _MLP_NORMS_ON_DIGITS:
        return "mlp"
    return _DEFAULTS[benchmark]["model"]


# (field, flag, when it applies, what it applies to): a field set away from its default where it cannot apply is
# refused. Checked before the benchmark's defaults fill the fields left as None; the values that resolution itself
# sets (nmc's norm "none" and single epoch, sgd's empty buffer) count as not given, so resolving is idempotent.
INAPPLICABLE: tuple[tuple[str, str, Any, str], ...] = (
    ("norm", "--norm", _builds_network,
     "trained methods and --pretrain-classes (a loaded --backbone keeps its own layers)"),
    ("model", "--model", _builds_network,
     "trained methods and --pretrain-classes (nmc and linear_probe otherwise use --backbone)"),
    ("width", "--width", lambda c: _builds_network(c) and _model(c) != "mlp", "the cnn and resnet18-reduced models"),
    ("hidden", "--hidden", lambda c: _builds_network(c) and _model(c) == "mlp", "the mlp model"),
    ("epochs", "--epochs", _trained,
     "trained methods (nmc and linear_probe make one pass over each task; see --pretrain-epochs)"),
    ("optimizer", "--optimizer", _trained, "trained methods"),
    ("lr", "--lr", _trained, "trained methods"),
    ("momentum", "--momentum", lambda c: _trained(c) and c.optimizer == "sgd", "--optimizer sgd"),
    ("weight_decay", "--weight-decay", _trained, "trained methods"),
    ("lr_schedule", "--lr-schedule", _trained, "trained methods"),
    ("buffer", "--buffer", lambda c: c.method in ("er", "er_ace"), "the replay methods er and er_ace"),
    ("replay_batch_size", "--replay-batch-size", lambda c: c.method in ("er", "er_ace"),
     "the replay methods er and er_ace"),
    ("kappa", "--kappa", lambda c: c.norm == "adab2n", "--norm adab2n"),
    ("lambda_reg", "--lambda-reg", lambda c: c.norm == "adab2n", "--norm adab2n"),
    ("adab2n_prior", "--adab2n-prior", lambda c: c.norm == "adab2n", "--norm adab2n"),
    ("reg_start_task", "--reg-start-task", lambda c: c.norm == "adab2n", "--norm adab2n"),
    ("nap_kind", "--nap-kind", lambda c: c.norm == "nap", "--norm nap"),
    ("nap_every", "--nap-every", lambda c: c.norm == "nap", "--norm nap"),
    ("nap_project_output", "--nap-project-output", lambda c: c.norm == "nap", "--norm nap"),
    ("nap_project_affine", "--nap-no-affine", lambda c: c.norm == "nap", "--norm nap"),
    ("backbone", "--backbone", lambda c: not _trained(c), "--method nmc or linear_probe (trained methods use --model)"),
    ("weights", "--weights", lambda c: not _trained(c), "--method nmc or linear_probe (the backbone's checkpoint)"),
    ("nmc_metric", "--nmc-metric", lambda c: c.method == "nmc", "--method nmc"),
    ("nmc_renormalize", "--nmc-renormalize", lambda c: c.method == "nmc", "--method nmc"),
    ("probe_l2", "--probe-l2", lambda c: c.method == "linear_probe", "--method linear_probe"),
    ("pretrain_classes", "--pretrain-classes", lambda c: c.benchmark != "random-labels",
     "class-incremental benchmarks"),
    ("pretrain_epochs", "--pretrain-epochs", _pretrained, "--pretrain-classes"),
    ("pretrain_lr", "--pretrain-lr", _pretrained, "--pretrain-classes"),
    ("pretrain_batch_size", "--pretrain-batch-size", _pretrained, "--pretrain-classes"),
    ("image_size", "--image-size", _digits, "digits (other data keep their stored size)"),
    ("n_test", "--n-test", lambda c: c.benchmark != "random-labels",
     "class-incremental benchmarks (random-labels tests on its training inputs)"),
    ("shuffle_classes", "--shuffle-classes", lambda c: c.benchmark != "random-labels",
     "class-incremental benchmarks"),
)


@dataclass
class ContinualConfig:
    """Everything that determines a run. ``None`` fields are resolved by :meth:`resolved`."""

    benchmark: str = "split-digits"
    data: str | None = None
    method: str = "er"
    norm: str | None = None  # None: bn when the run builds its --model, none for a loaded --backbone
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
    # linear probe (upper bound on a frozen extractor: continual/probe.py)
    probe_l2: float = 1e-4
    # pre-training the run's --model on the first K classes of the class order (continual/pretrain.py)
    pretrain_classes: int | None = None
    pretrain_epochs: int = 10
    pretrain_lr: float = 0.05
    pretrain_batch_size: int = 32
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
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; known: {', '.join(NORMS)}")
        self._check_extractor()
        self._check_applicable()
        updates = {k: v for k, v in _DEFAULTS[self.benchmark].items() if getattr(self, k) is None}
        if self.model is None and _builds_network(self):
            updates["model"] = default_model(self.benchmark, self.norm)
        config = replace(self, **updates)
        if config.adab2n_task_source is None:
            config.adab2n_task_source = "experience" if config.benchmark == "random-labels" else "label"
        if not _trained(config):
            config.epochs = 1
        if not _builds_network(config):
            config.backbone = config.backbone or "cifar10_resnet56"
            config.norm = "none"
        else:
            config.norm = config.norm or "bn"
            if _pretrained(config) and config.norm in ("adab2n", "nap"):
                raise ValueError(f"--norm {config.norm} cannot apply with --pretrain-classes: the pre-training is "
                                 "plain cross-entropy on the model's own layers (use bn, none, layer or rms)")
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
        if config.probe_l2 <= 0:
            raise ValueError("--probe-l2 must be > 0 (without it the probe's optimum does not exist on separable "
                             "features)")
        if _pretrained(config):
            classes = BENCHMARKS[config.benchmark]["classes"]
            if not 1 <= config.pretrain_classes < classes:
                raise ValueError(f"--pretrain-classes must be in [1, {classes - 1}] for {config.benchmark} "
                                 f"({classes} classes; the rest are learned incrementally)")
            if config.pretrain_epochs < 1 or config.pretrain_batch_size < 1 or config.pretrain_lr <= 0:
                raise ValueError("--pretrain-epochs and --pretrain-batch-size must be >= 1, --pretrain-lr > 0")
        if config.data is None:  # record where the data is read from, not null
            from continual.benchmarks import BENCHMARKS, default_data

            config.data = default_data(BENCHMARKS[config.benchmark]["source"])
        if not config.seeds:
            raise ValueError("at least one seed")
        return config

    def _check_extractor(self) -> None:
        """``--pretrain-classes`` and ``--backbone`` / ``--weights`` both choose the feature extractor: refuse both."""
        given = [f"--{name} {getattr(self, name)}" for name in ("backbone", "weights") if getattr(self, name)]
        if self.pretrain_classes is not None and given:
            raise ValueError(f"--pretrain-classes {self.pretrain_classes} and {' and '.join(given)} both choose the "
                             "feature extractor (--pretrain-classes trains --model on the first classes; "
                             "--backbone/--weights load a pretrained network): give one of them")

    def _check_applicable(self) -> None:
        """Refuse an option given (set away from its default) where it cannot apply: see :data:`INAPPLICABLE`."""
        defaults = ContinualConfig()
        resolution = {"norm": "none", "epochs": 1, "buffer": 0, "model": _DEFAULTS[self.benchmark]["model"]}
        for name, flag, applies, where in INAPPLICABLE:
            value = getattr(self, name)
            if value in (getattr(defaults, name), resolution.get(name, getattr(defaults, name))) or applies(self):
                continue
            norm = self.norm or ("bn" if _builds_network(self) else None)
            run = f"--method {self.method}" + (f" --norm {norm}" if norm and name != "norm" else "")
            shown = "" if isinstance(value, bool) else f" {_shown(value)}"
            raise ValueError(f"{flag}{shown} cannot apply to this run ({run}, --benchmark {self.benchmark}): it is "
                             f"for {where}; leave it out")

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


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for config.json."""
    import avalanche
    import numpy
    import torch

    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "avalanche": getattr(avalanche, "__version__", "unknown"), "numpy": numpy.__version__}
