"""Runs a continual configuration seed by seed, experience by experience, resumably.

After every experience: evaluate on every test experience (one row of the accuracy matrix), save a checkpoint
(model, optimizer, strategy and plugin state, RNG states) atomically, then append the record to
``results.jsonl`` with fsync (wall times go to ``timings.jsonl``, so the results are the same bytes on every run
with the same seed). After a seed's last experience record comes its summary record (``"kind": "summary"``: the
four metrics of :func:`continual.report.seed_metrics`), so results.jsonl alone holds the whole run. A rerun with
the same output folder skips finished seeds (appending a summary record that is missing, once) and resumes an
unfinished one after its last checkpointed experience; because the RNG states are restored, the resumed run
continues exactly as the uninterrupted one would have. A finished seed's checkpoint is deleted.

With ``pretrain_classes``, each seed first pre-trains its backbone (:mod:`continual.pretrain`) and appends one
``"kind": "backbone"`` record (the classes it was trained on, images, epochs, fingerprint) before its first
experience; a resumed seed loads the backbone from its checkpoint instead of training it again.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin

from continual import adab2n, nap
from continual.benchmarks import (BENCHMARKS, TaskStream, build_benchmark, default_data, incremental_task_sizes,
                                  shared_data_dir)
from continual.config import FROZEN, ContinualConfig, library_versions
from continual.models import build_model
from continual.nmc import ForwardFeatures, NMCClassifier, NMCStrategy, feature_dim
from continual.pretrain import describe_backbone, pretrain, replace_head
from continual.probe import LinearProbe, LinearProbeStrategy
from continual.records import (BACKBONE, EXPERIENCE, SUMMARY, append_record, backbone_records, experience_records,
                               load_checkpoint, read_records, save_checkpoint, summary_records, write_json)
from continual.report import seed_metrics
from continual.replay import JointReplay
from continual.schedules import LRSchedulePlugin, make_schedule
from eval import kill_points
from eval.records import remove_with_temporaries


class ConfigMismatch(ValueError):
    """An output folder (or checkpoint) belongs to a run with a different configuration."""


class AccuracyPlugin(SupervisedPlugin):
    """Counts correct top-1 predictions per evaluated experience (one row of the accuracy matrix per eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.correct: dict[int, int] = {}
        self.total: dict[int, int] = {}

    def before_eval(self, strategy, **kwargs) -> None:
        self.correct, self.total = {}, {}

    def after_eval_iteration(self, strategy, **kwargs) -> None:
        exp = int(strategy.experience.current_experience)
        pred = strategy.mb_output.argmax(1)
        self.correct[exp] = self.correct.get(exp, 0) + int((pred == strategy.mb_y).sum())
        self.total[exp] = self.total.get(exp, 0) + int(strategy.mb_y.numel())

    def row(self, num_tasks: int) -> list[float]:
        return [self.correct[j] / self.total[j] if self.total.get(j) else float("nan") for j in range(num_tasks)]


class ProgressPlugin(SupervisedPlugin):
    """A tqdm bar over the training iterations of each experience."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled, self.bar = enabled, None

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.enabled:
            steps = math.ceil(len(strategy.adapted_dataset) / strategy.train_mb_size) * strategy.train_epochs
            self.bar = tqdm(total=steps, desc=f"  experience {strategy.experience.current_experience}",
                            leave=False, unit="step")

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def quiet_evaluator() -> EvaluationPlugin:
    """Avalanche's evaluator with no metrics and no loggers (accuracy is counted by AccuracyPlugin)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(loggers=[])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached)],
            "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))


def default_backbone_weights(backbone: str) -> str | None:
    """The backbone's published checkpoint in the shared data folder (``$TTA_SHARED_DATA/models/...``), if there."""
    from eval.models import model_entry

    entry = model_entry(backbone)
    if entry.weights_file:
        candidate = shared_data_dir() / "models" / "akamaster-resnet-cifar10" / entry.weights_file
        if candidate.exists():
            return str(candidate)
    return None


def resolve_backbone_weights(config: ContinualConfig, download: bool = False) -> ContinualConfig:
    """NMC's backbone checkpoint made explicit (so config.json records the file used): ``--weights``, else the
    shared copy, else a download (``--download``); refused when none is found."""
    if config.method not in FROZEN or config.pretrain_classes is not None or config.weights is not None:
        return config
    from eval.models import download_weights, model_entry

    entry = model_entry(config.backbone)
    weights = default_backbone_weights(config.backbone)
    if weights is None and download:
        weights = str(download_weights(entry))
    if weights is None:
        shared = shared_data_dir() / "models" / "akamaster-resnet-cifar10" / (entry.weights_file or "<file>")
        fetch = ", or --download to fetch the published one" if entry.weights_url else ""
        raise FileNotFoundError(f"--method {config.method} needs the weights of its backbone {config.backbone}: "
                                f"pass --weights PATH, put the checkpoint at {shared} (the shared data folder, "
                                f"$TTA_SHARED_DATA){fetch}")
    return replace(config, weights=weights)


def build_network(config: ContinualConfig, stream: TaskStream,
                  num_classes: int | None = None) -> tuple[nn.Module, nap.NaP | None]:
    """The trained network with its normalisation variant applied (before the optimizer is built); ``num_classes``
    outputs (default: the stream's classes)."""
    channels, size, _ = stream.image_shape
    batch_norm = config.norm in ("bn", "adab2n")
    model = build_model(config.model, num_classes or stream.num_classes, channels, size, config.width, config.hidden,
                        batch_norm)
    projector = None
    if config.norm == "adab2n":
        adab2n.convert_model(model, stream.num_tasks, config.kappa, prior=config.adab2n_prior)
    elif config.norm in ("layer", "rms"):
        nap.insert_norms(model, kind=config.norm)
    elif config.norm == "nap":
        nap.insert_norms(model, kind=config.nap_kind)
        projector = nap.NaP(model, project_affine=config.nap_project_affine,
                            project_output=config.nap_project_output)
    return model.to(config.device), projector


def pretrained_backbone(config: ContinualConfig, stream: TaskStream, seed: int, out_dir: Path,
                        train: bool = True) -> nn.Module:
    """The seed's backbone: ``--model`` with a head over the held-out classes, pre-trained on their training images
    (``train=False``: only built, for a resumed seed whose checkpoint holds the trained weights). Appends the seed's
    backbone record to results.jsonl (once) and its pre-training time to timings.jsonl."""
    model, _ = build_network(config, stream, num_classes=len(stream.pretrain_classes))
    if not train:
        return model
    t0 = time.perf_counter()
    report = pretrain(model, stream.pretrain_train, epochs=config.pretrain_epochs, lr=config.pretrain_lr,
                      batch_size=config.pretrain_batch_size, seed=seed, device=config.device)
    seconds = time.perf_counter() - t0
    results = out_dir / "results.jsonl"
    if any(r.get("seed") == seed for r in backbone_records(read_records(results))):
        return model  # killed after this record, before the first checkpoint: trained again, identically
    record = {"kind": BACKBONE, "seed": seed, "model": config.model, "norm": config.norm,
              **describe_backbone(model, stream, report, config.eval_batch_size, config.device)}
    append_record(results, record, kill_points_here=True)
    append_record(out_dir / "timings.jsonl", {"seed": seed, "pretrain_seconds": round(seconds, 3)})
    return model


def build_strategy(config: ContinualConfig, stream: TaskStream, seed: int, progress: bool,
                   backbone: nn.Module | None = None):
    """(strategy, {name: stateful plugin}, AccuracyPlugin) for one seed. ``backbone``: the pre-trained network
    (:func:`pretrained_backbone`): frozen as the extractor of nmc / linear_probe, or given a fresh head and trained
    by the other methods."""
    accuracy = AccuracyPlugin()
    plugins: list[SupervisedPlugin] = [accuracy, ProgressPlugin(progress)]
    evaluator = quiet_evaluator()
    if config.method in FROZEN:
        if backbone is None:
            from eval.models import load_model

            backbone = load_model(config.backbone, weights=config.weights, device=config.device)
        extractor = ForwardFeatures(backbone)
        dim = feature_dim(extractor, stream.image_shape)
        batch = max(config.batch_size, config.eval_batch_size)  # neither result depends on the batching
        if config.method == "nmc":
            model = NMCClassifier(extractor, stream.num_classes, dim, metric=config.nmc_metric,
                                  renormalize=config.nmc_renormalize)
            strategy = NMCStrategy(model=model, train_mb_size=batch, eval_mb_size=config.eval_batch_size,
                                   device=config.device, plugins=plugins, evaluator=evaluator)
        else:
            model = LinearProbe(extractor, stream.num_classes, dim, l2=config.probe_l2)
            strategy = LinearProbeStrategy(model=model, train_mb_size=batch, eval_mb_size=config.eval_batch_size,
                                           device=config.device, plugins=plugins, evaluator=evaluator)
        return strategy, {}, accuracy
    if backbone is not None:
        model, projector = replace_head(backbone, stream.num_classes).to(config.device), None
    else:
        model, projector = build_network(config, stream)
    stateful: dict[str, Any] = {}
    steps_per_task = math.ceil(stream.n_train / stream.num_tasks / config.batch_size) * config.epochs
    if stream.kind == "random-labels":
        steps_per_task = math.ceil(stream.n_train / config.batch_size) * config.epochs
    schedule = None
    if config.lr_schedule != "constant":
        schedule = make_schedule(config.lr_schedule, steps_per_task * stream.num_tasks, steps_per_task)
    if config.norm == "adab2n":
        task_of = adab2n.experience_tasks if config.adab2n_task_source == "experience" else None
        stateful["adab2n"] = adab2n.AdaB2NPlugin(config.lambda_reg, stream.classes_per_task, task_of,
                                                 config.reg_start_task)
    if projector is not None:
        stateful["nap"] = nap.NaPPlugin(projector, config.nap_every, schedule)
    elif schedule is not None:
        stateful["lr_schedule"] = LRSchedulePlugin(schedule)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    loss = "er_ace" if config.method == "er_ace" else "er"
    strategy = JointReplay(model=model, optimizer=optimizer, mem_size=config.buffer,
                           batch_size_mem=config.replay_batch_size, loss=loss, buffer_seed=seed,
                           train_mb_size=config.batch_size, train_epochs=config.epochs,
                           eval_mb_size=config.eval_batch_size, device=config.device,
                           plugins=list(stateful.values()) + plugins, evaluator=evaluator)
    return strategy, stateful, accuracy


def _state_of(strategy, stateful: dict[str, Any]) -> dict[str, Any]:
    optimizer = getattr(strategy, "optimizer", None)
    return {"model": strategy.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "strategy": strategy.state_dict() if hasattr(strategy, "state_dict") else None,
            "plugins": {name: plugin.state_dict() for name, plugin in stateful.items()
                        if hasattr(plugin, "state_dict")},
            "rng": _rng_state()}


def _restore(strategy, stateful: dict[str, Any], state: dict[str, Any]) -> None:
    strategy.model.load_state_dict(state["model"])
    if state["optimizer"] is not None:
        strategy.pending_optimizer_state = state["optimizer"]
    if state["strategy"] is not None:
        strategy.load_state_dict(state["strategy"])
    for name, plugin_state in state["plugins"].items():
        stateful[name].load_state_dict(plugin_state)
    _set_rng_state(state["rng"])


def _diagnostics(model: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    norms = nap.weight_norms(model)
    if norms:
        out["weight_norms"] = norms
        out["weight_norm_total"] = float(math.sqrt(sum(v * v for v in norms.values())))
    layers = list(adab2n.adab2n_layers(model))
    if layers:
        first = layers[0]
        out["adab2n"] = {"t": int(first.num_batches_tracked), "eta": float(first.eta), "task": int(first.task),
                         "mean_task_log_weights": torch.stack([layer.task_log_weights.detach() for layer in layers])
                         .mean(0).tolist()}
    return out


def build_seed_stream(config: ContinualConfig, seed: int) -> TaskStream:
    """The task stream of one seed (subsets and class order are seeded)."""
    return build_benchmark(config.benchmark, config.data, seed, config.tasks, config.n_train, config.n_test,
                           config.image_size, config.shuffle_classes, pretrain_classes=config.pretrain_classes or 0)


def num_tasks(config: ContinualConfig) -> int:
    """The number of experiences of the run's stream (fewer with --pretrain-classes: only the other classes)."""
    tasks = config.tasks or BENCHMARKS[config.benchmark]["tasks"]
    if config.pretrain_classes is None:
        return tasks
    return len(incremental_task_sizes(BENCHMARKS[config.benchmark]["classes"], tasks, config.pretrain_classes))


def run_seed(config: ContinualConfig, seed: int, out_dir: str | Path, progress: bool = True,
             stop_after: int | None = None,
             prepared: tuple[TaskStream, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Train and evaluate one seed; returns the records written by this call (empty when already finished).
    ``prepared``: this seed's task stream and the RNG states right after it was built (:func:`check_inputs`)."""
    out_dir = Path(out_dir)
    results = out_dir / "results.jsonl"
    timings = out_dir / "timings.jsonl"
    checkpoint = out_dir / "checkpoints" / f"seed{seed}.pt"
    T = num_tasks(config)
    done = {r["experience"] for r in experience_records(read_records(results)) if r.get("seed") == seed}
    if all(i in done for i in range(T)):
        append_summary(config, seed, results)  # a kill between the last record and the summary leaves none
        _remove_checkpoint(checkpoint)  # a kill between the summary and the clean-up can leave it behind
        return []  # finished: nothing is loaded or built
    if prepared is None:
        seed_everything(seed)
        stream = build_seed_stream(config, seed)
    else:  # as if built here: the same RNG states follow
        stream = prepared[0]
        _set_rng_state(prepared[1])
    backbone = None
    if config.pretrain_classes is not None:
        backbone = pretrained_backbone(config, stream, seed, out_dir, train=not checkpoint.exists())
    strategy, stateful, accuracy = build_strategy(config, stream, seed, progress, backbone)
    start, history = 0, []
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        if state["identity"] != _jsonable(config.identity()):
            raise ConfigMismatch(f"{checkpoint} was written by a different configuration; use another --out")
        _restore(strategy, stateful, state["state"])
        start, history = state["experience"] + 1, list(state["records"])
        for record in history:  # a crash between checkpoint and append leaves a record only in the checkpoint
            if record["experience"] not in done:
                append_record(results, record)
    written: list[dict[str, Any]] = []
    end = T if stop_after is None else min(T, stop_after)
    bar = tqdm(total=T, initial=start, desc=f"seed {seed}", unit="task", disable=not progress)
    for i in range(start, end):
        t0 = time.perf_counter()
        strategy.train(stream.train_stream[i])
        t1 = time.perf_counter()
        strategy.eval(stream.test_stream)
        row = accuracy.row(T)
        record = {"kind": EXPERIENCE, "seed": seed, "experience": i, "accuracies": row,
                  "seen_average": float(np.mean(row[: i + 1])),
                  "n_train": len(stream.train_stream[i].dataset), "benchmark": config.benchmark,
                  "method": config.method, "norm": config.norm}
        timing = {"seed": seed, "experience": i, "train_seconds": round(t1 - t0, 3),
                  "eval_seconds": round(time.perf_counter() - t1, 3)}
        if config.method not in FROZEN:  # a frozen backbone never changes
            record.update(_diagnostics(strategy.model))
        if config.method == "linear_probe":
            record["probe_fit"] = {k: round(v, 9) if isinstance(v, float) else v
                                   for k, v in strategy.model.last_fit.items()}
        history.append(record)
        save_checkpoint(checkpoint, {"experience": i, "records": history, "state": _state_of(strategy, stateful),
                                     "identity": _jsonable(config.identity())})
        kill_points.reached("checkpoint")
        append_record(results, record, kill_points_here=True)
        append_record(timings, timing)  # kept apart, so results.jsonl is the same bytes on every run
        written.append(record)
        bar.update(1)
        bar.set_postfix(acc=f"{np.nanmean(row[: i + 1]):.3f}")
    bar.close()
    if end == T:
        append_summary(config, seed, results)
        _remove_checkpoint(checkpoint)
    return written


def summary_record(config: ContinualConfig, seed: int, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The summary record of ``seed`` (its four metrics, computed from its experience records among ``records``
    exactly as summary.json's per-seed metrics are), or None while the seed is incomplete."""
    metrics = seed_metrics([r for r in records if r.get("seed") == seed]).get(seed)
    if metrics is None:
        return None
    return {"kind": SUMMARY, "seed": seed, "method": config.method, "norm": config.norm,
            "benchmark": config.benchmark, "metrics": metrics}


def append_summary(config: ContinualConfig, seed: int, results: Path) -> None:
    """Append the summary record of a finished ``seed`` to ``results`` unless it is already there: written once,
    also on a resume after a kill between the seed's last experience record and its summary (or in the middle of
    the summary, whose torn line the append cuts), and for a folder written before summary records existed."""
    records = read_records(results)
    if any(r.get("seed") == seed for r in summary_records(records)):
        return
    record = summary_record(config, seed, records)
    if record is not None:
        append_record(results, record, kill_points_here=True)


def _remove_checkpoint(checkpoint: Path) -> None:
    """Delete a finished seed's checkpoint and any temporary file a killed save left beside it, then the folder
    once it is empty."""
    remove_with_temporaries(checkpoint)
    if checkpoint.parent.exists() and not any(checkpoint.parent.iterdir()):
        checkpoint.parent.rmdir()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _recorded_before(previous: dict[str, Any]) -> dict[str, Any]:
    """A config.json identity written before data and weights were recorded (null meant the default location)
    with those defaults filled in, so such a folder still resumes."""
    previous = dict(previous)
    if previous.get("data") is None:
        with contextlib.suppress(FileNotFoundError, KeyError):
            previous["data"] = default_data(BENCHMARKS[previous["benchmark"]]["source"])
    if previous.get("weights") is None and previous.get("method") == "nmc" and previous.get("backbone"):
        previous["weights"] = default_backbone_weights(previous["backbone"])
    return previous


def prepare_output(config: ContinualConfig, out_dir: str | Path) -> None:
    """Write config.json, or check that an existing one describes the same run (only seeds/device may differ)."""
    path = Path(out_dir) / "config.json"
    if path.exists():
        previous = ContinualConfig.from_dict(json.loads(path.read_text())["config"])
        before, now = _recorded_before(_jsonable(previous.identity())), _jsonable(config.identity())
        if before != now:
            changed = sorted(k for k in now if before.get(k) != now[k])
            raise ConfigMismatch(f"{out_dir} holds a run with a different configuration ({', '.join(changed)} "
                                 "differ); use another --out or the same options")
        seeds = sorted(set(previous.seeds) | set(config.seeds))
        config = ContinualConfig.from_dict({**config.to_dict(), "seeds": seeds})
    write_json(path, {"config": config.to_dict(), "versions": library_versions()})


def check_inputs(config: ContinualConfig) -> tuple[TaskStream, dict[str, Any]]:
    """Load what the run reads (the first seed's task stream; NMC's backbone) so that a missing or unusable input
    is refused before anything is written; returns that stream and the RNG states after it, for :func:`run_seed`."""
    seed_everything(config.seeds[0])
    stream = build_seed_stream(config, config.seeds[0])
    state = _rng_state()
    if config.method in FROZEN and config.pretrain_classes is None:
        from eval.models import load_model

        load_model(config.backbone, weights=config.weights)
    return stream, state


def run_experiment(config: ContinualConfig, out_dir: str | Path, progress: bool = True,
                   stop_after: int | None = None, download: bool = False) -> dict[str, Any]:
    """Resolve, check the inputs, record config.json, run every seed (skipping finished ones), write the report;
    returns it. ``download``: fetch NMC's published backbone weights when no file is found (network)."""
    from continual.report import write_report

    config = resolve_backbone_weights(config.resolved(), download)
    first = check_inputs(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepare_output(config, out_dir)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        for seed in config.seeds:
            run_seed(config, seed, out_dir, progress, stop_after, first if seed == config.seeds[0] else None)
    finally:
        torch.set_num_threads(threads)
    return write_report(out_dir)
