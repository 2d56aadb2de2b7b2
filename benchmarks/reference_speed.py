"""Our methods against the reference implementations (mariodoebler/test-time-adaptation, "MD"; T3A: matsuolab/T3A),
timed side by side in one run, for the goal "no method is more than 1.5x slower than a straightforward
implementation of it measured in the same run".

    PYTHONPATH=. python benchmarks/reference_speed.py MD_CHECKOUT [--methods all|a,b] [--batch-size 200]
        [--repeats 10] [--threads 1] [--weights PATH] [--memo-batch-size 1] [--t3a T3A_CHECKOUT] [--seed 0]
        [--no-accel] [--out DIR]

MD_CHECKOUT is a checkout of MD (its root or its ``classification`` folder; pinned commit 8b2ed63). Its method
modules are loaded at run time as the golden scripts load them (``benchmarks/golden/_md.py``: no model zoo, no data
sets, CUDA hidden); nothing of it is copied here. MD's deyo imports ``einops`` (``pip install einops`` where this
runs). t3a runs only with ``--t3a`` (a checkout of matsuolab/T3A, pinned ff8cde5), against its ``domainbed``
``T3A`` class as ``benchmarks/golden/t3a.py`` loads it.

Model: ``cifar10_resnet20`` as ``tta bench`` builds it (``eval.bench.build_model``: a seeded random initialisation
unless ``--weights``), on the CPU; inputs: four seeded batches of uniform random 3 x 32 x 32 images in [0, 1],
cycled (``eval.bench.make_inputs``). Rows, each on its own deep copy of the model:

- ``plain``: ``model.eval()`` under ``torch.inference_mode()`` (and ``plain (batch N)`` at memo's batch size);
- per method, ``ours``: ``tta.adapt(copy, name)`` with its defaults (MD's CIFAR-10-C configuration), called under
  ``torch.no_grad()`` as an evaluation loop calls it; ``MD``: MD's class built from a cfg holding the same
  hyper-parameters (translated from our options, so the two always agree), called as MD's evaluation loop calls it
  (``utils/eval_utils.py``: ``with torch.no_grad(): model(imgs)``).

Without ``--weights`` the random model is uncertain on every image, so the entropy and confidence filters of eta,
eata, rdumb, sar and deyo would select nothing and time a forward pass only: they are opened on both sides (the
method's ``select_all_options``, as ``tta bench`` does; MD gets the same values). eata's Fisher information comes
from the same seeded random "source" batches on both sides (ours: ``source_options``, i.e. ``tta.fisher``; MD: its
constructor, through a stand-in for its source loader).

Where the two differ in work per image, the reference's work is what it does, so it is timed as it is: MD's
bn_ema runs the model twice per batch (ours once), MD's cotta always runs the anchor model, and so on. memo runs at
``--memo-batch-size`` (1, MD's configuration) and MD's row includes what MD's data loader does for memo per image
(its AugMix views, PIL operations on the uint8 image: ``augmentations/transforms_augmix.py``), since ours makes
its views inside the call; MD runs its loader in worker processes, so on a multi-core machine that part would
overlap with the model. MD's RoTTA at 8b2ed63 calls ``loss_calculation(x)`` on a method that takes no argument
(a TypeError outside mixed precision): the argument is dropped, as ``benchmarks/golden/rotta.py`` does. MD's LAME
splits the model with ``models.model.split_up_model``; here the split is our model's ``forward_features`` and its
linear head (MD's split for its CIFAR-10 ResNets is the same: everything before the head, pooled and flattened).

Timing: each row's first two batches are a warm-up; then ``--repeats`` rounds, each timing one batch of every
row (``time.perf_counter`` around the call), the order rotated each round, so a change of machine load hits all
rows alike. Every row keeps its own global random state (torch, numpy, random: MD draws from the global
generators), swapped in and out around its calls outside the timed region, so rows do not disturb each other's
random streams. Reported per row: median ms per batch (IQR) and the paired ratio to plain inference at the same
batch size (the median over rounds of row / plain in the same round); per method: ours / MD, paired, against the
goal ours <= 1.5x MD. The CPU fast path is set as the ``tta`` command sets it for CPU runs (``tta.accel.enable()``
unless ``--no-accel``); its process-wide piece (the tensor cache) serves MD's rows too.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import random
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import tta  # noqa: E402
from eval.bench import (BenchConfig, build_model, describe_error, interleaved_rounds, machine,  # noqa: E402
                        make_inputs, quantile)
from eval.environment import versions  # noqa: E402
from eval.models import model_entry  # noqa: E402
from eval.records import write_json_atomic  # noqa: E402


def _golden_md() -> types.ModuleType:
    """``benchmarks/golden/_md.py`` (the golden scripts' loader of MD), imported without putting its folder on
    the path (its neighbours are named after the methods)."""
    spec = importlib.util.spec_from_file_location("golden_md", REPO / "benchmarks" / "golden" / "_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_md = _golden_md()
MD_COMMIT, T3A_COMMIT = "8b2ed63", "ff8cde5"
MODEL = "cifar10_resnet20"
GOAL = 1.5  # ours <= GOAL x the reference, paired
WARMUP = 2
#: the methods MD implements (t3a: matsuolab/T3A), in the order of the table
METHODS = ["tent", "bn_ema", "eta", "eata", "rdumb", "sar", "deyo", "lame", "roid", "cotta", "rotta", "memo", "t3a"]
#: methods whose sample filters are opened on a randomly initialised model (both sides), see the docstring
OPEN_FILTERS = ("eta", "eata", "rdumb", "sar", "deyo")
PLAIN = "plain"


# -- rows -----------------------------------------------------------------------------------------------------------
class RandomState:
    """A row's own global random state (torch CPU, numpy, random), swapped in around its calls."""

    def __init__(self, seed: int) -> None:
        saved = self._get()
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.state = self._get()
        self._set(saved)
        self.outside: tuple | None = None

    @staticmethod
    def _get() -> tuple:
        return torch.get_rng_state(), np.random.get_state(), random.getstate()

    @staticmethod
    def _set(state: tuple) -> None:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])

    def enter(self) -> None:
        self.outside = self._get()
        self._set(self.state)

    def leave(self) -> None:
        self.state = self._get()
        if self.outside is not None:
            self._set(self.outside)


@dataclass
class Row:
    name: str  # "plain", "plain (batch 1)", "tent (ours)", "tent (MD)"
    method: str | None
    side: str  # plain | ours | reference
    batch: int
    call: Callable[[Any], Any]
    inputs: list[Any]
    random_state: RandomState
    calls: int = 0
    warmup_ms: list[float] = field(default_factory=list)

    def run(self) -> float:
        """Milliseconds of one call on the next input (cycled), the row's random state swapped in untimed."""
        x = self.inputs[self.calls % len(self.inputs)]
        self.calls += 1
        self.random_state.enter()
        try:
            start = time.perf_counter()
            self.call(x)
            return (time.perf_counter() - start) * 1e3
        finally:
            self.random_state.leave()


def plain_name(batch: int, batch_size: int) -> str:
    return PLAIN if batch == batch_size else f"{PLAIN} (batch {batch})"


class Features(nn.Module):
    """The model up to its head: the pooled features (what MD's ``split_up_model`` gives for its CIFAR ResNets)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def head(model: nn.Module) -> nn.Linear:
    return model.net.linear


# -- the reference ----------------------------------------------------------------------------------------------------
class Reference:
    """MD's method modules, loaded once with the stubs they need (``_md.load``), plus T3A when given."""

    def __init__(self, checkout: str, t3a_checkout: str | None) -> None:
        root = _md.classification_dir(checkout)  # exits with a clear message for a path that is not MD
        self.checkout = str(Path(checkout).resolve())
        self.commit = git_commit(root)
        self.source_batches: list = []
        _md.load(root, "methods.base")  # the namespace packages and the models.model stub; hides CUDA
        sys.modules["models.model"].split_up_model = lambda model, arch, dataset: (Features(model), head(model))
        datasets = types.ModuleType("datasets")  # eata's source loader: the batches given to it
        datasets.__path__ = []
        loading = types.ModuleType("datasets.data_loading")
        loading.get_source_loader = lambda **kwargs: (None, list(self.source_batches))
        sys.modules.update({"datasets": datasets, "datasets.data_loading": loading})
        self.t3a_checkout = t3a_checkout
        self.t3a_commit = None
        if t3a_checkout is not None:
            if not (Path(t3a_checkout) / "domainbed" / "adapt_algorithms.py").is_file():
                raise SystemExit(f"{t3a_checkout}: not a matsuolab/T3A checkout (no domainbed/adapt_algorithms.py)")
            self.t3a_commit = git_commit(Path(t3a_checkout))

    def module(self, name: str) -> types.ModuleType:
        return importlib.import_module(name)

    def t3a_module(self) -> types.ModuleType:
        root = Path(self.t3a_checkout or "")
        domainbed = types.ModuleType("domainbed")  # skip domainbed/__init__.py and its imports
        domainbed.__path__ = [str(root / "domainbed")]
        algorithms = types.ModuleType("domainbed.algorithms")

        class Algorithm(nn.Module):
            def __init__(self, input_shape, num_classes, num_domains, hparams):
                super().__init__()
                self.hparams = hparams

        algorithms.Algorithm = Algorithm
        sys.modules.update({"domainbed": domainbed, "domainbed.algorithms": algorithms})
        return importlib.import_module("domainbed.adapt_algorithms")


def git_commit(path: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def md_cfg(name: str, o: Any, batch: int, source_images: int = 0) -> types.SimpleNamespace:
    """MD's cfg for method ``name`` holding our options ``o`` (defaults: conf.py's, through ``_md.config``)."""
    sections: dict[str, Any] = {
        "MODEL": {"EPISODIC": bool(getattr(o, "episodic", False)), "ARCH": "Standard", "ADAPTATION": name,
                  "CKPT_PATH": "", "RESET_AFTER_NUM_UPDATES": getattr(o, "reset_every", 0)},
        "TEST": {"BATCH_SIZE": batch, "WINDOW_LENGTH": 1},
        "DATA_DIR": "",
    }
    if hasattr(o, "optimizer"):
        sections["OPTIM"] = {"METHOD": {"adam": "Adam", "sgd": "SGD"}[o.optimizer], "LR": o.lr, "STEPS": o.steps,
                             "BETA": o.beta1, "MOMENTUM": o.momentum, "NESTEROV": o.nesterov, "WD": o.weight_decay}
    if name in ("eta", "eata", "rdumb", "sar", "deyo"):
        sections["EATA"] = {"MARGIN_E0": o.margin_e0, "D_MARGIN": getattr(o, "d_margin", 0.05),
                            "FISHER_ALPHA": getattr(o, "fisher_alpha", 0.0)}
        sections["SOURCE"] = {"NUM_SAMPLES": source_images, "PERCENTAGE": 1.0, "NUM_WORKERS": 0}
    if name == "sar":
        sections["SAR"] = {"RESET_CONSTANT_EM": o.reset_constant}
    if name == "deyo":
        sections["DEYO"] = {"REWEIGHT_ENT": o.reweight_ent, "REWEIGHT_PLPD": o.reweight_plpd, "PLPD": o.plpd_threshold,
                            "MARGIN": o.margin, "AUG_TYPE": o.aug_type, "OCCLUSION_SIZE": o.occlusion_size,
                            "ROW_START": o.row_start, "COLUMN_START": o.column_start, "PATCH_LEN": o.patch_len}
    if name == "lame":
        sections["LAME"] = {"AFFINITY": {"rbf": "rbf", "knn": "kNN", "linear": "linear"}[o.affinity], "KNN": o.knn,
                            "SIGMA": 1.0, "FORCE_SYMMETRY": o.force_symmetry}
    if name == "roid":
        sections["ROID"] = {"USE_WEIGHTING": o.weighting, "USE_PRIOR_CORRECTION": o.prior_correction,
                            "USE_CONSISTENCY": o.consistency, "MOMENTUM_SRC": o.source_momentum,
                            "MOMENTUM_PROBS": o.probs_momentum, "TEMPERATURE": o.temperature}
    if name == "cotta":
        sections["M_TEACHER"] = {"MOMENTUM": o.teacher_momentum}
        sections["COTTA"] = {"RST": o.restore_probability, "AP": o.confidence_threshold}
        sections["TEST"]["N_AUGMENTATIONS"] = o.n_augmentations
    if name == "rotta":
        sections["ROTTA"] = {"MEMORY_SIZE": o.memory_size, "UPDATE_FREQUENCY": o.update_frequency, "NU": o.nu,
                             "ALPHA": o.rbn_momentum, "LAMBDA_T": o.lambda_t, "LAMBDA_U": o.lambda_u}
    if name == "memo":
        sections["MODEL"]["EPISODIC"] = True
        sections["TEST"]["N_AUGMENTATIONS"] = o.n_augmentations
        sections["BN"] = {"ALPHA": 1.0 - o.alpha}  # MD's BN.ALPHA weighs the batch, our alpha the source
    return _md.config(**sections)


def check_translatable(name: str, o: Any) -> None:
    """Options MD has no setting for must be at the value MD hard-codes."""
    fixed = {"sar": {"rho": 0.05, "ema_momentum": 0.9, "nesterov": False, "optimizer": "sgd", "freeze_top": False},
             "eta": {"probs_momentum": 0.9}, "eata": {"probs_momentum": 0.9}, "rdumb": {"probs_momentum": 0.9},
             "deyo": {"freeze_top": False}, "lame": {"max_steps": 100}, "memo": {"severity": 1.0},
             "cotta": {"symmetric_loss": False, "soft_augmentations": False},
             "rotta": {"soft_augmentations": False}, "bn_ema": {"two_pass": False}}.get(name, {})
    for key, value in fixed.items():
        if getattr(o, key, value) != value:
            raise ValueError(f"{name}: option {key}={getattr(o, key)!r} has no MD counterpart (MD: {value!r})")


def build_reference(reference: Reference, name: str, o: Any, model: nn.Module, batch: int,
                    source: list) -> Callable[[Any], Any]:
    """MD's method around ``model`` (a deep copy), as a call ``x -> outputs`` the way MD's evaluation loop calls it."""
    num_classes = model_entry(MODEL).num_classes
    model.model_preprocess = None  # MD's models carry their pre-processing (None: done inside, as ours)
    if name == "t3a":
        module = reference.t3a_module()
        model.eval()
        trained = types.SimpleNamespace(featurizer=Features(model), classifier=head(model))
        method = module.T3A(None, num_classes, 1, {"filter_K": o.filter_k, "cached_loader": False}, trained)

        def t3a(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # domainbed's evaluation (scripts/unsupervised_adaptation.py)
                return method.predict(x, adapt=True)

        return t3a
    classes = {"tent": ("methods.tent", "Tent"), "bn_ema": ("methods.norm", "BNEMA"),
               "eta": ("methods.eata", "EATA"), "eata": ("methods.eata", "EATA"), "rdumb": ("methods.eata", "EATA"),
               "sar": ("methods.sar", "SAR"), "deyo": ("methods.deyo", "DeYO"), "lame": ("methods.lame", "LAME"),
               "roid": ("methods.roid", "ROID"), "cotta": ("methods.cotta", "CoTTA"),
               "rotta": ("methods.rotta", "RoTTA"), "memo": ("methods.memo", "MEMO")}
    module_name, class_name = classes[name]
    try:
        module = reference.module(module_name)
    except ModuleNotFoundError as error:
        raise RuntimeError(f"MD's {module_name} needs {error.name} (pip install {error.name})") from error
    cls = getattr(module, class_name)
    if name == "rotta" and not hasattr(cls, "md_loss_calculation"):  # 8b2ed63 passes x to a method taking none
        cls.md_loss_calculation = cls.loss_calculation
        cls.loss_calculation = lambda self, *unused: self.md_loss_calculation()
    reference.source_batches = source
    cfg = md_cfg(name, o, batch, sum(len(x) for x, _ in source))
    with contextlib.redirect_stdout(io.StringIO()):  # MD's AlphaBatchNorm prints what it replaced
        method = cls(cfg, model, num_classes)
    reference.source_batches = []
    if name != "memo":
        def md(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # MD's utils/eval_utils.py
                return method(x)

        return md
    from torchvision import transforms

    augment = reference.module("augmentations.transforms_augmix").AugMixAugmenter(
        None, transforms.ToTensor(), dataset_name="cifar10_c", n_views=o.n_augmentations, use_augmix=True,
        severity=int(o.severity))

    def md_memo(image) -> torch.Tensor:
        views = augment(image)  # MD's data loader: [image, view_1, ..., view_N], each collated to a batch of 1
        with torch.no_grad():
            return method([v[None] for v in views])

    return md_memo


def to_pil(batch: torch.Tensor) -> list:
    """The images of a batch as PIL images (the uint8 form MD's CIFAR data sets hand to their transforms)."""
    from PIL import Image

    return [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)) for x in batch]


def source_batches(batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """eata's random "source" batches, as ``tta bench`` makes them (labels cycling over the classes, unused)."""
    entry = model_entry(MODEL)
    n = max(2 * batch_size, 2 * entry.num_classes + 1)
    generator = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(n) % entry.num_classes
    return [(torch.rand(len(y), 3, entry.input_size, entry.input_size, generator=generator), y)
            for y in labels.split(batch_size)]


def ours_options(name: str, weights: str | None) -> dict[str, Any]:
    options = dict(tta.registry.method_class(name).select_all_options) if weights is None and name in OPEN_FILTERS \
        else {}
    return options


def build_pair(reference: Reference, name: str, base: nn.Module, batch: int, inputs: list[torch.Tensor],
               args: argparse.Namespace) -> tuple[list[Row], dict[str, str]]:
    """Our row and MD's row for ``name``, each on its own deep copy of ``base``, and the set-up error of either
    (row name -> error) where one cannot be built."""
    rows, errors = [], {}
    ours_name, md_name = f"{name} (ours)", f"{name} (MD)"
    try:
        options = ours_options(name, args.weights)
        source: list = []
        if tta.registry.method_class(name).source_data is not None:
            source = source_batches(batch, args.seed)
            options.update(tta.registry.method_class(name).source_options(base, source))
        o = tta.method_options(name)(**options)
    except Exception as error:
        text = describe_error(error, "options")
        return [], {ours_name: text, md_name: text}
    try:
        ours = tta.adapt(copy.deepcopy(base), name, **options)

        def ours_call(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # as an evaluation loop calls it; gradient methods enable gradients inside
                return ours(x)

        rows.append(Row(ours_name, name, "ours", batch, ours_call, inputs, RandomState(args.seed)))
    except Exception as error:
        errors[ours_name] = describe_error(error, "set-up")
    try:
        if name == "memo" and batch != 1:
            raise ValueError("MD's memo pools the views of every image of a batch: use --memo-batch-size 1")
        check_translatable(name, o)
        md_call = build_reference(reference, name, o, copy.deepcopy(base), batch, source)
        md_inputs = [image for x in inputs for image in to_pil(x)] if name == "memo" else inputs
        rows.append(Row(md_name, name, "reference", batch, md_call, md_inputs, RandomState(args.seed)))
    except Exception as error:
        errors[md_name] = describe_error(error, "set-up")
    return rows, errors


def plain_row(base: nn.Module, batch: int, batch_size: int, inputs: list[torch.Tensor], seed: int) -> Row:
    model = copy.deepcopy(base).eval()

    def plain(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return Row(plain_name(batch, batch_size), None, "plain", batch, plain, inputs, RandomState(seed))


# -- measurement --------------------------------------------------------------------------------------------------
def time_rounds(rows: list[Row], repeats: int, errors: dict[str, str],
                log: Callable[[str], None] = lambda s: None) -> dict[str, list[float]]:
    """Per-row ms in interleaved rounds (:func:`eval.bench.interleaved_rounds`); a method row that raises is dropped
    (its error in ``errors``), plain re-raises."""
    return interleaved_rounds(rows, repeats, lambda row, r: row.run(), lambda row: row.side == "plain", errors, log)


def paired_median(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator timed in the same round."""
    if not numerator or len(numerator) != len(denominator):
        raise ValueError(f"paired ratios need the same number of rounds, got {len(numerator)} and {len(denominator)}")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def paired_quantiles(numerator: list[float], denominator: list[float]) -> tuple[float, float]:
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return quantile(ratios, 0.25), quantile(ratios, 0.75)


def summarise(rows: list[dict[str, Any]], times: dict[str, list[float]], batch_size: int,
              methods: list[str], goal: float = GOAL) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Row records and per-method comparisons from the per-round times. ``rows``: dicts with name, method, side,
    batch (and error, warmup_ms); ``times``: name -> ms per round (rows that failed are absent)."""
    records = []
    for row in rows:
        record = {**row, "ms_per_batch": None, "ms_p25": None, "ms_p75": None, "ratio_to_plain_paired": None,
                  "ms_all": times.get(row["name"])}
        ms = times.get(row["name"])
        plain = times.get(plain_name(row["batch"], batch_size))
        if ms:
            record.update(ms_per_batch=statistics.median(ms), ms_p25=quantile(ms, 0.25), ms_p75=quantile(ms, 0.75))
            if plain:
                record["ratio_to_plain_paired"] = paired_median(ms, plain)
        records.append(record)
    by_name = {r["name"]: r for r in records}
    comparisons = []
    for name in methods:
        ours, md = by_name.get(f"{name} (ours)"), by_name.get(f"{name} (MD)")
        comparison: dict[str, Any] = {"method": name, "batch": (ours or md or {}).get("batch"), "ours_over_md": None,
                                      "ours_over_md_p25": None, "ours_over_md_p75": None, "goal": goal, "met": None,
                                      "error": None}
        errors = [f"{r['name']}: {r['error']}" for r in (ours, md) if r and r.get("error")]
        if ours is None or md is None:
            errors.append("not built")
        if errors:
            comparison["error"] = "; ".join(errors)
        elif ours["ms_all"] and md["ms_all"]:
            comparison["ours_over_md"] = paired_median(ours["ms_all"], md["ms_all"])
            comparison["ours_over_md_p25"], comparison["ours_over_md_p75"] = paired_quantiles(ours["ms_all"],
                                                                                              md["ms_all"])
            comparison["met"] = comparison["ours_over_md"] <= goal
        comparisons.append(comparison)
    return records, comparisons


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


def _ms_cell(record: dict[str, Any]) -> str:
    if record.get("error"):
        return f"failed: {record['error']}"
    if record.get("ms_per_batch") is None:
        return "-"
    return f"{record['ms_per_batch']:.1f} ({record['ms_p25']:.1f}-{record['ms_p75']:.1f})"


def format_table(result: dict[str, Any]) -> str:
    """The comparison as Markdown: plain inference, then per method ours and MD's ms, ratios and the goal."""
    by_name = {r["name"]: r for r in result["records"]}
    lines = []
    for record in result["records"]:
        if record["side"] == "plain":
            lines.append(f"{record['name']}: {_fmt(record['ms_per_batch'], '.2f')} ms/batch (IQR "
                         f"{_fmt(record['ms_p25'], '.2f')}-{_fmt(record['ms_p75'], '.2f')}), batch {record['batch']}")
    goal = result["comparisons"][0]["goal"] if result["comparisons"] else GOAL
    lines += ["", f"| method | batch | ours ms (IQR) | MD ms (IQR) | ours x plain | MD x plain | ours / MD, paired "
                  f"(IQR) | ours <= {goal:g}x MD |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in result["comparisons"]:
        ours, md = by_name.get(f"{c['method']} (ours)", {}), by_name.get(f"{c['method']} (MD)", {})
        met = "not measured" if c["met"] is None else ("yes" if c["met"] else "NO")
        cells = [_ms_cell(ours), _ms_cell(md), *(_fmt(r.get("ratio_to_plain_paired"), ".2f") for r in (ours, md)),
                 "-" if c["ours_over_md"] is None else
                 f"{c['ours_over_md']:.2f} ({c['ours_over_md_p25']:.2f}-{c['ours_over_md_p75']:.2f})", met]
        lines.append(f"| {c['method']} | {_fmt(c['batch'], 'd')} | " + " | ".join(cells) + " |")
    for note in result.get("notes", []):
        lines.append(f"\n{note}")
    return "\n".join(lines)


def parse_methods(text: str, t3a: str | None) -> tuple[list[str], list[str]]:
    """The methods to compare and notes on any left out."""
    given = [m.strip() for m in text.split(",") if m.strip()]
    names: list[str] = []
    for name in given:
        for item in (METHODS if name == "all" else [name]):
            if item not in METHODS:
                raise SystemExit(f"reference_speed: unknown method {item!r}; choose from all, {', '.join(METHODS)}")
            if item not in names:
                names.append(item)
    notes = []
    if "t3a" in names and t3a is None:
        names.remove("t3a")
        notes.append("t3a skipped: its reference is matsuolab/T3A, not MD; pass --t3a PATH to a checkout of it")
    if not names:
        raise SystemExit("reference_speed: no method to compare")
    return names, notes


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    if args.batch_size < 2:
        raise SystemExit("reference_speed: --batch-size must be at least 2 (MD treats a batch of 1 as single-sample "
                         "adaptation with a sliding window)")
    if args.repeats < 1:
        raise SystemExit("reference_speed: --repeats must be at least 1")
    methods, notes = parse_methods(args.methods, args.t3a)
    reference = Reference(args.md_checkout, args.t3a)
    if reference.commit and not MD_COMMIT.startswith(reference.commit[:7]):
        notes.append(f"MD checkout at {reference.commit}, not the pinned {MD_COMMIT}")
    if args.no_accel:
        accel_wanted = None
    else:
        accel_wanted = tta.accel.enable()  # as the tta command does for CPU runs, before any model runs
    torch.set_num_threads(args.threads)
    started = machine()
    config = BenchConfig(model=MODEL, weights=args.weights, batch_size=args.batch_size, seed=args.seed)
    base, weights_note = build_model(config)
    inputs = {args.batch_size: make_inputs(config)}
    batches = {args.batch_size}
    if "memo" in methods:
        batches.add(args.memo_batch_size)
        inputs[args.memo_batch_size] = make_inputs(
            BenchConfig(model=MODEL, batch_size=args.memo_batch_size, seed=args.seed))
    log(f"{MODEL}, {weights_note}; batch {args.batch_size}; threads {torch.get_num_threads()}; "
        f"CPU fast path {'off' if accel_wanted is None else 'on'}")

    rows: list[Row] = []
    meta: list[dict[str, Any]] = []
    for batch in sorted(batches, reverse=True):
        row = plain_row(base, batch, args.batch_size, inputs[batch], args.seed)
        rows.append(row)
        meta.append({"name": row.name, "method": None, "side": "plain", "batch": batch, "error": None})
    for name in methods:
        batch = args.memo_batch_size if name == "memo" else args.batch_size
        pair, failed = build_pair(reference, name, base, batch, inputs[batch], args)
        for row_name, side in ((f"{name} (ours)", "ours"), (f"{name} (MD)", "reference")):
            meta.append({"name": row_name, "method": name, "side": side, "batch": batch,
                         "error": failed.get(row_name)})
            if row_name in failed:
                log(f"{row_name}: failed: {failed[row_name]}")
        rows += pair
    by_meta = {m["name"]: m for m in meta}
    live = []
    for row in rows:  # warm-up: every row's first WARMUP batches, untimed for the table
        try:
            row.warmup_ms = [row.run() for _ in range(WARMUP)]
            by_meta[row.name]["warmup_ms"] = row.warmup_ms
            live.append(row)
            log(f"{row.name}: warm-up {', '.join(f'{t:.0f}' for t in row.warmup_ms)} ms")
        except Exception as error:
            if row.side == "plain":
                raise
            by_meta[row.name]["error"] = describe_error(error, "warm-up")
            log(f"{row.name}: failed: {by_meta[row.name]['error']}")
    errors: dict[str, str] = {}
    log(f"timing {len(live)} rows x {args.repeats} rounds, interleaved")
    times = time_rounds(live, args.repeats, errors, log)
    for name, error in errors.items():
        by_meta[name]["error"] = error
    records, comparisons = summarise(meta, times, args.batch_size, methods)
    notes.append(f"Methods with opened filters (random model): {', '.join(m for m in methods if m in OPEN_FILTERS)}"
                 if args.weights is None and any(m in OPEN_FILTERS for m in methods) else "")
    notes = [n for n in notes if n]
    accel_state = tta.accel.state()
    return {
        "records": records, "comparisons": comparisons, "notes": notes,
        "settings": {"model": MODEL, "weights": args.weights, "weights_note": weights_note, "methods": methods,
                     "batch_size": args.batch_size, "memo_batch_size": args.memo_batch_size, "repeats": args.repeats,
                     "warmup": WARMUP, "threads": torch.get_num_threads(), "seed": args.seed, "device": "cpu",
                     "accel": "off (--no-accel)" if accel_wanted is None else "on (tta.accel.enable())",
                     "opened_filters": [m for m in methods if m in OPEN_FILTERS] if args.weights is None else [],
                     "goal": f"ours <= {GOAL:g}x MD (paired median over rounds)"},
        "reference": {"md_checkout": reference.checkout, "md_commit": reference.commit, "md_pinned": MD_COMMIT,
                      "t3a_checkout": args.t3a, "t3a_commit": reference.t3a_commit, "t3a_pinned": T3A_COMMIT},
        "accel": accel_state, "versions": versions(), "machine": {"start": started, "end": machine()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def header(result: dict[str, Any]) -> str:
    s, md = result["settings"], result["reference"]
    return (f"{s['model']}, {s['weights_note']}; batch {s['batch_size']} (memo {s['memo_batch_size']}), CPU, threads "
            f"{s['threads']}, {s['repeats']} rounds after {s['warmup']} warm-up batches, CPU fast path {s['accel']}, "
            f"load average {result['machine']['start']['load_average']}; MD "
            f"{md['md_commit'] or '(commit unknown)'} at {md['md_checkout']}; {result['date']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("md_checkout", metavar="MD_CHECKOUT",
                        help="checkout of mariodoebler/test-time-adaptation (its root or its classification folder)")
    parser.add_argument("--methods", default="all", help=f"all or a comma-separated list of: {', '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--memo-batch-size", type=int, default=1, help="memo's batch (MD's configuration: 1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds after %d warm-up batches" % WARMUP)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--weights", default=None, help="checkpoint of cifar10_resnet20 (default: random init)")
    parser.add_argument("--t3a", default=None, metavar="T3A_CHECKOUT",
                        help="checkout of matsuolab/T3A: adds t3a against its official code")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs, the random init and every row")
    parser.add_argument("--no-accel", action="store_true", help="keep plain PyTorch (no tta.accel fast path)")
    parser.add_argument("--out", default=None, help="folder for reference_speed.json and reference_speed.md")
    args = parser.parse_args(argv)
    result = run(args, log=lambda line: print(line, file=sys.stderr, flush=True))
    text = f"{header(result)}\n\n{format_table(result)}\n"
    print(text)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "reference_speed.json", result)
        (folder / "reference_speed.md").write_text(text)
        print(f"written: {folder / 'reference_speed.json'}, {folder / 'reference_speed.md'}")
    failed = [c for c in result["comparisons"] if c["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
