"""The corruption benchmark as a Python function: the same thing ``tta corruption`` runs.

``run_benchmark(config)`` resolves the model, the data (clean data corrupted on the fly, or a pre-corrupted
CIFAR-10-C / ImageNet-C folder, or real domains), the protocol and the methods, and checks that they fit together
(classes, image counts) before anything is written; then writes ``config.json``, runs each method through
:func:`eval.runner.run_methods` (resumable) into ``results.jsonl``, and writes the report.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import streams
import tta
from eval.environment import versions
from eval.errors import UsageError
from eval.method_cli import resolved_options
from eval.metrics import mce
from eval.records import ResultsLog, write_json_atomic
from eval.report import ErrorTable, write_report
from eval.runner import MethodRun, check_amp, run_methods
from streams.corruption_photos import find_frost_dir
from streams.protocols import corruption_names

# Fields that change results: a rerun into the same --out must agree on them (the others may differ).
_RESULT_FIELDS = ("model", "weights", "arch", "input_mean", "input_std", "guard_window", "guard_min_entropy", "data", "split", "corruptions", "severity", "protocol", "delta", "batch_size",
                  "n_images", "seed", "domains", "class_map")

#: Result fields added after folders were written, with the value a folder that predates them was run with: such a
#: folder resumes when the field is at that value (``rounds``: before it existed, every stream was one round;
#: ``amp``, ``channels_last``: float32, contiguous). They stay out of ``_RESULT_FIELDS``, whose keys a sweep records
#: per cell and compares as they are (a sweep records these only when they differ from that value).
_RESULT_FIELDS_SINCE = {"rounds": 1, "amp": None, "channels_last": False}

#: Options of earlier versions that never changed results and are no longer recorded (``lean_graph``, tta 0.1: the
#: same gradients bit for bit; a deprecated, unrecorded option since 0.2): a folder that recorded them resumes.
_RESULT_NEUTRAL_OPTIONS = frozenset({"lean_graph"})


@dataclass
class BenchmarkConfig:
    """Everything a corruption or domain-shift run needs; written as config.json."""

    out: str
    model: str = "cifar10_resnet20"
    weights: str | None = None
    download: bool = False  # fetch published weights when none are given (needs a network)
    arch: str | None = None  # package.module:callable for a model outside the registry (with a state dict)
    input_mean: list[float] | None = None  # input normalisation of an --arch model (required with it)
    input_std: list[float] | None = None
    num_classes: int | None = None  # build the network for this many classes (None: its own default)
    class_map: list[int] | None = None  # the model's output index of each class of the data, in the data's order
    random_weights: bool = False  # evaluate a model without weights on purpose (otherwise refused)
    data: str = "digits"
    split: str = "test"
    methods: list[str] = field(default_factory=lambda: list(tta.methods()))
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    corruptions: str | list[str] = "all"
    severity: int = 5
    protocol: str = "reset"
    delta: float = 0.1
    rounds: int = 1  # the domain sequence streamed this many times as one chain (continual kinds only)
    batch_size: int = 200
    n_images: int | None = None
    # Per-method stream settings where a method's design needs other ones (e.g. memo: batch 1, fewer images);
    # such a method runs on its own stream of the same data, protocol and seed.
    method_batch_size: dict[str, int] = field(default_factory=dict)
    method_n_images: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    domains: list[str] | None = None  # real domains (one ImageFolder each) instead of corruptions; [] = all
    source_data: str | None = None  # labelled source data of the methods that need some (default: ``data``)
    source_split: str = "train"
    source_images: int = 2000
    guard: bool = False  # also run every BatchNorm method wrapped in a CollapseGuard (rows "<method>+guard")
    guard_window: int = 1000
    guard_min_entropy: float = 0.3
    baseline: str | None = None  # a results.jsonl whose 'source' rows are the mCE baseline
    progress: bool = True
    prefetch: int | None = None  # batches made ahead in a thread (0: in the loop; None: 2 on CUDA, 0 on CPU)
    deterministic: bool = False  # recorded only: eval.determinism.enable_deterministic is process-wide
    corrupt_device: str | None = None  # where batches are made and corrupted (None: ``device``)
    # Mixed precision: every adapter call under torch.autocast with bfloat16 ("bf16") or float16 ("fp16"; gradient
    # methods scale the loss on CUDA), None for float32. Results change with it (a different run on resume).
    amp: str | None = None
    channels_last: bool = False  # model and 4-D batches in channels_last memory format (faster convolutions on GPU)


def _check_same_run(path: Path, config: BenchmarkConfig, resolved: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume a folder whose results came from other data, model, protocol or method options (a changed
    option or library default would otherwise mix old rows into the new table). Adding methods is fine."""
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    previous = saved.get("config", {})
    changed = [k for k in _RESULT_FIELDS if k in previous and previous[k] != _jsonable(getattr(config, k))]
    changed += [k for k, then in _RESULT_FIELDS_SINCE.items() if previous.get(k, then) != getattr(config, k)]
    previous_options = saved.get("resolved_options", {})
    changed += [f"{method} options" for method, options in _jsonable(resolved).items()
                if method in previous_options and _options_differ(method, previous_options[method], options)]
    previous_methods = previous.get("methods", [])
    for method in (m for m in config.methods if m in previous_methods):
        then = (previous.get("method_batch_size", {}).get(method, previous.get("batch_size")),
                previous.get("method_n_images", {}).get(method, previous.get("n_images")))
        if then != stream_settings(config, method):
            changed.append(f"{method}'s batch size or image count")
    if changed:
        raise ValueError(f"{path.parent} holds results of a different run ({', '.join(changed)} differ); "
                         "use another --out, or delete that folder to start again")


def _options_differ(method: str, previous: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether rows made with ``previous`` options would differ from rows made with ``now``. An option added to the
    library since the folder was written did not exist then, which is the same as its default now."""
    previous = {name: value for name, value in previous.items() if name not in _RESULT_NEUTRAL_OPTIONS}
    defaults = _jsonable(resolved_options(method, {})) if set(now) - set(previous) else {}
    return set(previous) - set(now) != set() or any(
        previous.get(name, defaults.get(name)) != value for name, value in now.items())


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _pre_corrupted_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "labels.npy").exists() or (path / "CIFAR-10-C" / "labels.npy").exists()
                              or (path / "CIFAR-100-C" / "labels.npy").exists())


def _imagenet_c_folder(path: Path) -> bool:
    return path.is_dir() and any((path / c / "5").is_dir() for c in streams.CORRUPTIONS)


def stream_settings(config: BenchmarkConfig, method: str) -> tuple[int, int | None]:
    """(batch size, images per domain) that ``method`` runs with: its own where given, else the run's."""
    return (config.method_batch_size.get(method, config.batch_size),
            config.method_n_images.get(method, config.n_images))


def method_streams(config: BenchmarkConfig) -> dict[tuple[int, int | None], list[str]]:
    """The run's methods grouped by their stream settings (the run's own first)."""
    groups: dict[tuple[int, int | None], list[str]] = {(config.batch_size, config.n_images): []}
    for method in config.methods:
        groups.setdefault(stream_settings(config, method), []).append(method)
    return {key: methods for key, methods in groups.items() if methods}


def build_stream(config: BenchmarkConfig):
    """The protocol and the data it streams: corrupted on the fly, pre-corrupted files, or real domains.
    ``--n-images`` larger than a domain's data is refused (the stream itself would quietly take all of it)."""
    stream = _build_stream(config)
    if config.n_images is not None:
        for position, domain in enumerate(stream.domains):
            available = len(stream.source(position))
            if config.n_images > available:
                raise ValueError(f"--n-images {config.n_images} is more than the {available} images of {domain.name} "
                                 f"in {config.data} (split {config.split}); pass --n-images {available} or fewer, or "
                                 "leave it out to use them all")
    return stream


def _build_stream(config: BenchmarkConfig):
    path = Path(config.data).expanduser()
    if config.domains is not None:  # real domains: one ImageFolder per domain; [] = every domain found
        data = streams.load_domains(path, config.domains or None)
        protocol = streams.make_protocol(config.protocol, domains=list(data), batch_size=config.batch_size,
                                         seed=config.seed, n_images=config.n_images, delta=config.delta,
                                         rounds=config.rounds)
        return streams.make_stream(data, protocol)
    if config.data != "digits" and (_pre_corrupted_folder(path) or _imagenet_c_folder(path)):
        names = corruption_names(config.corruptions)
        loader = streams.load_cifar_c if _pre_corrupted_folder(path) else streams.load_imagenet_c
        if config.protocol == "gradual":
            raise ValueError("the gradual protocol needs on-the-fly corruption (give clean data, not a -C folder)")
        data = {f"{c}-{config.severity}": loader(path, c, config.severity) for c in names}
        protocol = streams.make_protocol(config.protocol, domains=list(data), batch_size=config.batch_size,
                                         seed=config.seed, n_images=config.n_images, delta=config.delta,
                                         rounds=config.rounds)
        return streams.make_stream(data, protocol)
    if "frost" in corruption_names(config.corruptions):  # fail before the other corruptions run, not at frost
        find_frost_dir()
    clean = streams.load_dataset(config.data, split=config.split)
    protocol = streams.make_protocol(config.protocol, corruptions=config.corruptions, severity=config.severity,
                                     batch_size=config.batch_size, seed=config.seed, n_images=config.n_images,
                                     delta=config.delta, rounds=config.rounds)
    return streams.make_stream(clean, protocol, device=config.corrupt_device or config.device)


def _fresh_copy(model: nn.Module, config: "BenchmarkConfig") -> Callable[[], nn.Module]:
    """Fresh copies of an in-memory model, each in its original (source) state, on ``config.device`` (4-D weights
    in channels_last memory format with ``config.channels_last``, before any adapter copies or swaps layers)."""
    template = copy.deepcopy(model).cpu()

    def fresh() -> nn.Module:
        copied = copy.deepcopy(template).to(config.device)
        if config.channels_last:
            copied = copied.to(memory_format=torch.channels_last)
        return copied.eval()

    return fresh


def model_factory(config: BenchmarkConfig, model: nn.Module | None = None) -> Callable[[], nn.Module]:
    """A function giving a fresh copy of the source model for each method (adapters change models in place).
    The model is loaded (and so checked: weights, classes) once, here."""
    from eval.models import custom_entry, load_model

    if model is not None:
        return _fresh_copy(model, config)
    entry = None
    if config.arch:
        if config.input_mean is None or config.input_std is None:
            raise ValueError("--arch needs the model's input normalisation: --input-mean and --input-std "
                             "(0,0,0 and 1,1,1 when the model normalises inside)")
        entry = custom_entry(config.arch, tuple(config.input_mean), tuple(config.input_std))
    loaded = load_model(config.model, config.weights, device="cpu", download=config.download, entry=entry,
                        random_weights=config.random_weights, num_classes=config.num_classes,
                        class_map=config.class_map)
    return _fresh_copy(loaded, config)


def check_model_fits_data(model: nn.Module, stream, config: BenchmarkConfig) -> None:
    """The model must give one output per class of the data (a class map selects them from a larger model), and
    run on the data's images."""
    from eval.models import output_count

    dataset = stream.source(0)
    classes = len(dataset.classes)
    channels, height, width = tuple(dataset.image_shape)
    try:
        outputs = output_count(model, (channels, height, width))
    except Exception as error:  # the network's own error (shapes), with the images it was given
        raise ValueError(f"{config.model} cannot run on the images of {config.data} ({channels}x{height}x{width}): "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    if outputs != classes:
        how = ("the class map lists" if config.class_map is not None else "the model gives")
        raise UsageError("{how} {outputs} outputs but {data} has {classes} classes; give a model with {classes} "
                         "outputs ({num_classes} when its constructor takes it, with {weights} trained for them), or "
                         "{class_map} with the model's output index of each of the data's classes, in the data's "
                         "class order (comma-separated, or a file of them)", how=how, outputs=outputs,
                         data=config.data, classes=classes)


def needs_source_data(method: str) -> bool:
    """Whether the method computes something from source data before it adapts (its class declares it)."""
    return tta.registry.method_class(method).source_data is not None


def source_batches(config: BenchmarkConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A seeded class-balanced labelled subset of the source split (``source_images`` images), in batches."""
    source = streams.load_dataset(config.source_data or config.data, split=config.source_split)
    subset = streams.class_balanced_subset(source, min(config.source_images, len(source)), seed=config.seed)
    batches = []
    for start in range(0, len(subset), config.batch_size):
        x, y = subset.get_batch(torch.arange(start, min(start + config.batch_size, len(subset))))
        batches.append((x.float().div(255).to(config.device), y))
    return batches


def source_files(out: Path, method: str, options: dict[str, Any]) -> dict[str, Path]:
    """Where a method's source-data options are cached in the run's folder (one file per option)."""
    return {key: out / f"source_{method}_{key}.pt" for key in options}


def method_source_options(config: BenchmarkConfig, make_model: Callable[[], nn.Module], out: Path, method: str,
                          options: Any) -> dict[str, Any]:
    """What ``method`` computes from the source subset (its class's ``source_options``), or the files a previous
    run of this folder cached (saved by the caller once the run's folder is written, so a refused run writes
    nothing). An option is then given as its file's path, which every such option accepts."""
    cls = tta.registry.method_class(method)
    cached = sorted(out.glob(f"source_{method}_*.pt"))
    if cached:
        return {path.stem[len(f"source_{method}_"):]: str(path) for path in cached}
    return cls.source_options(make_model(), source_batches(config), options)


def run_benchmark(config: BenchmarkConfig, model: nn.Module | None = None, report: bool = True
                  ) -> dict[str, ErrorTable]:
    """Run (or resume) every method of ``config`` and write results.jsonl, config.json and the report
    (``report=False``: no report and no tables returned; ``tta sweep`` reports once over all its cells).

    Everything that can be refused (methods, options, data, model, classes, source data) is checked
    before anything is written to ``config.out``: a corrected command then starts cleanly in the same folder."""
    out = Path(config.out)
    unknown = [m for m in config.methods if m not in tta.methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {', '.join(tta.methods())}")
    check_amp(config.amp, config.device)
    resolved = {m: resolved_options(m, config.method_options.get(m, {})) for m in config.methods}
    _check_same_run(out / "config.json", config, resolved)
    torch.manual_seed(config.seed)
    stream = build_stream(config)
    group_streams = {key: stream if key == (config.batch_size, config.n_images) else
                     build_stream(dataclasses.replace(config, batch_size=key[0], n_images=key[1]))
                     for key in method_streams(config)}  # built (and checked) before anything is written
    make_model = model_factory(config, model)
    check_model_fits_data(make_model(), stream, config)
    from_source = {m: method_source_options(config, make_model, out, m, tta.method_options(m)(**config.method_options.get(m, {})))
                   for m in config.methods if needs_source_data(m)}

    out.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((out / "config.json").read_text()).get("resolved_options", {}) \
        if (out / "config.json").exists() else {}
    write_json_atomic(out / "config.json", {"config": _jsonable(dataclasses.asdict(config)),  # every method ever run
                                            "resolved_options": {**earlier, **_jsonable(resolved)}, **versions()})
    for method, values in from_source.items():
        for key, path in source_files(out, method, values).items():
            if not isinstance(values[key], str):
                values[key].save(path)
    log = ResultsLog(out / "results.jsonl")
    for (batch_size, n_images), methods in method_streams(config).items():
        context = {"protocol": config.protocol, "seed": config.seed, "model": config.model,
                   "batch_size": batch_size, "n_images": n_images, **precision_context(config)}
        runs = []
        for method in methods:
            options = {**config.method_options.get(method, {}), **from_source.get(method, {})}
            runs.append(MethodRun(label=method, options=resolved[method],
                                  make_adapter=lambda m=method, o=options: tta.adapt(make_model(), m, **o)))
            if config.guard and method != "source":
                guard = {"window": config.guard_window, "min_entropy": config.guard_min_entropy}
                runs.append(MethodRun(
                    label=f"{method}+guard", options={**resolved[method], "guard": guard},
                    make_adapter=lambda m=method, o=options, g=guard: tta.CollapseGuard(
                        tta.adapt(make_model(), m, **o), **g)))
        run_methods(runs, group_streams[batch_size, n_images], log, context=context, checkpoint_dir=out / "checkpoints",
                    device=config.device, progress=config.progress, prefetch=config.prefetch, amp=config.amp,
                    channels_last=config.channels_last)
    if not report:
        return {}
    records = log.read()
    precision = (f", {config.amp} autocast" if config.amp else "") + (", channels_last" if config.channels_last else "")
    tables = write_report(records, out, title=f"{config.model} on {Path(config.data).name}{precision}")
    _note_method_streams(config, out)
    if config.baseline:
        _write_mce(records, config, out)
    return tables


def precision_context(config: BenchmarkConfig) -> dict[str, Any]:
    """What each record says of the run's precision and memory format: ``amp`` and ``channels_last`` when they
    are on (a record without them was float32 and contiguous, as every record written before they existed)."""
    context: dict[str, Any] = {}
    if config.amp is not None:
        context["amp"] = config.amp
    if config.channels_last:
        context["channels_last"] = True
    return context


def _note_method_streams(config: BenchmarkConfig, out: Path) -> None:
    """Say in results.md which methods ran with their own batch size or image count."""
    own = [m for m in config.methods if stream_settings(config, m) != (config.batch_size, config.n_images)]
    if not own:
        return
    lines = ["", f"Batch {config.batch_size}, {config.n_images or 'all'} images per domain, except:"]
    lines += [f"- {m}: batch {stream_settings(config, m)[0]}, {stream_settings(config, m)[1] or 'all'} images per "
              "domain" for m in own]
    with open(out / "results.md", "a") as f:
        f.write("\n".join(lines) + "\n")


def _errors_by_corruption(records: list[dict[str, Any]], method: str, protocol: str) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    for r in records:
        if r["method"] == method and r.get("protocol") == protocol and r.get("severity") is not None:
            table.setdefault(r["corruption"], {})[r["severity"]] = r["error"]
    return table


def _write_mce(records: list[dict[str, Any]], config: BenchmarkConfig, out: Path) -> None:
    baseline_records = ResultsLog(config.baseline).read()
    baseline = _errors_by_corruption(baseline_records, "source", baseline_records[0].get("protocol", "reset"))
    lines = ["", f"**mCE relative to the source model in {config.baseline}** (%)", "", "| method | mCE |",
             "|---|---:|"]
    for method in dict.fromkeys(r["method"] for r in records):
        errors = _errors_by_corruption(records, method, config.protocol)
        if errors:
            lines.append(f"| {method} | {100 * mce(errors, baseline):.1f} |")
    with open(out / "results.md", "a") as f:
        f.write("\n".join(lines) + "\n")
