"""Continual cells of a sweep: the ``[continual]`` table of a sweep file, its cells, how a worker runs one.

A continual cell is one ``tta continual`` run of one seed: one benchmark, one method (``sgd``, ``er``, ``er_ace``,
``nmc``, ``linear_probe``) with one combination of its options, one normalisation variant, one replay buffer size,
one seed. The table::

    [continual]
    benchmarks = ["split-digits"]          # continual.benchmarks.BENCHMARKS
    norms = ["bn", "adab2n"]               # continual.config.NORMS (default ["bn"])
    buffers = [20, 100]                    # replay buffer sizes (default [200])
    seeds = [0, 1]                         # default: the top-level seeds
    n_train = 100                          # fixed settings: fields of ContinualConfig
    [continual.methods]                    # method = table of options (ContinualConfig fields; a list is a grid)
    er = { lr = [0.01, 0.1] }
    sgd = {}

An axis that cannot apply to a method is not expanded for it: ``nmc`` and ``linear_probe`` train nothing, so on a
loaded backbone they have one norm (its own layers, shown as ``none``; with ``pretrain_classes`` the norms axis is
the pre-trained model's), and ``sgd`` and ``nmc`` replay nothing (buffer ``0``). A fixed
setting or an option applies to the cells it can apply to (``kappa`` to the ``adab2n`` cells, ``lr`` to the trained
methods: :data:`continual.config.INAPPLICABLE`) and is left out of the others, so an option's values collapse
there into one cell; a setting that applies to no cell of the grid is an error naming it.

The worker runs the cell as ``tta continual`` does (:func:`continual.runner.run_experiment`, in a scratch folder
deleted afterwards) and returns the per-experience records of ``results.jsonl`` and one summary record (the
seed's final average accuracy, average incremental accuracy, forgetting and BWT), each with the cell's key
(``record["cell"]``) and its place in the grid (``record["sweep"]``, with ``"kind": "continual"``).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from eval.sweep import SweepError, _fail, _ints, _list, continual_cell_key

AXES = ("benchmarks", "methods", "norms", "buffers", "seeds")
# ContinualConfig fields that a sweep does not set as settings: the axes, and what the worker fixes
NOT_SETTINGS = ("benchmark", "method", "norm", "buffer", "seeds", "threads")
CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("resnet18-reduced", "cnn", "mlp"), "optimizer": ("sgd", "adam"), "adab2n_prior": ("seen", "present"),
    "adab2n_task_source": ("label", "experience"), "nap_kind": ("layer", "rms"), "nmc_metric": ("euclidean", "cosine"),
}
REPLAY = ("er", "er_ace")


@dataclass(frozen=True)
class ContinualCell:
    """One ``tta continual`` run of one seed. ``options``: the method options this cell sets (in its key);
    ``settings``: the fixed settings that apply to it (not in its key, like a corruption cell's n_images)."""

    benchmark: str
    method: str
    norm: str
    buffer: int
    options: dict[str, Any]
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "continual"

    def axes(self) -> dict[str, Any]:
        return {"kind": "continual", "benchmark": self.benchmark, "method": self.method,
                "options": dict(self.options), "norm": self.norm, "buffer": self.buffer, "seed": self.seed}

    @property
    def key(self) -> str:
        return continual_cell_key(self.axes())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContinualCell":
        return cls(**data)

    def config(self, threads: int | None = None):
        """The (unresolved) :class:`~continual.config.ContinualConfig` of the cell, as ``tta continual`` builds it
        from the equivalent flags."""
        from continual.config import ContinualConfig

        values: dict[str, Any] = {**self.settings, **self.options}
        if "hidden" in values:
            values["hidden"] = list(values["hidden"])
        return ContinualConfig(benchmark=self.benchmark, method=self.method,
                               norm=self.norm if _builds_network(self.method, values) else None,
                               buffer=self.buffer if self.method in REPLAY else ContinualConfig().buffer,
                               seeds=[self.seed], threads=threads, **values)


@dataclass
class ContinualGrid:
    """A validated ``[continual]`` table."""

    benchmarks: list[str]
    methods: dict[str, dict[str, list[Any]]]
    norms: list[str]
    buffers: list[int]
    seeds: list[int]
    settings: dict[str, Any]
    cells: list[ContinualCell] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("benchmarks", "methods", "norms", "buffers", "seeds", "settings")}


def _kind(name: str) -> str:
    from continual.config import ContinualConfig

    hint = {f.name: f.type for f in dataclasses.fields(ContinualConfig)}[name]
    return str(hint).replace(" | None", "")


def _check_value(value: Any, name: str, key: str, where: str) -> Any:
    kind = _kind(name)
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "list[int]": lambda v: isinstance(v, list) and bool(v)
          and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)}[kind]
    if not ok(value):
        allowed = "a list of positive integers" if kind == "list[int]" else f"a {kind}"
        raise _fail(where, key, f"{value!r} is not allowed; allowed: {allowed}")
    if name in CHOICES and value not in CHOICES[name]:
        raise _fail(where, key, f"{value!r} is not allowed; allowed: {', '.join(CHOICES[name])}")
    if name == "lr_schedule":
        from continual.config import SCHEDULES

        if value not in SCHEDULES:
            raise _fail(where, key, f"{value!r} is not allowed; allowed: {', '.join(SCHEDULES)}")
    return float(value) if kind == "float" else value


def _choices(values: list[Any], allowed: tuple[str, ...] | list[str], key: str, where: str) -> list[str]:
    for i, v in enumerate(values):
        if v not in allowed:
            raise _fail(where, f"{key}[{i}]", f"{v!r} is not allowed; allowed: {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise _fail(where, key, f"{values} repeats a value")
    return values


def parse_continual(raw: Any, where: str, seeds: list[int], device: str) -> ContinualGrid:
    """Validate the ``[continual]`` table (``seeds``, ``device``: the sweep's top-level values, the defaults) and
    expand it into cells; :class:`~eval.sweep.SweepError` names the first bad key and the allowed values."""
    from continual.benchmarks import BENCHMARKS
    from continual.config import METHODS, NORMS, ContinualConfig

    prefix = "continual."
    if not isinstance(raw, dict):
        raise _fail(where, "continual", "must be a table: [continual] with benchmarks, methods, norms, ...")
    names = [f.name for f in dataclasses.fields(ContinualConfig) if f.name not in NOT_SETTINGS]
    allowed = (*AXES, *names)
    for key in raw:
        if key not in allowed:
            raise _fail(where, prefix + key, f"unknown key; allowed: {', '.join(allowed)}")

    def axis(name: str, default: list[Any]) -> list[Any]:
        return _list({prefix + name: raw[name]} if name in raw else {}, prefix + name, where, default)

    benchmarks = _choices(axis("benchmarks", ["split-digits"]), list(BENCHMARKS), prefix + "benchmarks", where)
    norms = _choices(axis("norms", ["bn"]), NORMS, prefix + "norms", where)
    buffers = _ints(axis("buffers", [ContinualConfig().buffer]), prefix + "buffers", where, 0)
    seed_list = _ints(axis("seeds", list(seeds)), prefix + "seeds", where)
    settings = {"device": device}
    for name in names:
        if name in raw:
            settings[name] = _check_value(raw[name], name, prefix + name, where)
    methods_raw = raw.get("methods")
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise _fail(where, prefix + "methods", "missing or empty; give a table such as [continual.methods] with "
                    f"er = {{ lr = [0.01, 0.1] }} and sgd = {{}}; allowed methods: {', '.join(METHODS)}")
    methods: dict[str, dict[str, list[Any]]] = {}
    for method, options in methods_raw.items():
        key = f"{prefix}methods.{method}"
        if method not in METHODS:
            raise _fail(where, key, f"unknown method; allowed: {', '.join(METHODS)}")
        if not isinstance(options, dict):
            raise _fail(where, key, "must be a table of options, e.g. {} or { lr = [0.01, 0.1] }")
        grid = {}
        for name, value in options.items():
            if name not in names:
                raise _fail(where, f"{key}.{name}", f"unknown option; allowed: {', '.join(names)}")
            if name in raw:
                raise _fail(where, f"{key}.{name}", f"also set as {prefix}{name}; set an option in one place")
            is_list_field = _kind(name) == "list[int]"
            grid_given = isinstance(value, list) and (not is_list_field or all(isinstance(v, list) for v in value))
            values = value if grid_given else [value]
            if not values:
                raise _fail(where, f"{key}.{name}", "empty list; give at least one value")
            grid[name] = [_check_value(v, name, f"{key}.{name}", where) for v in values]
        methods[method] = grid
    grid = ContinualGrid(benchmarks=benchmarks, methods=methods, norms=norms, buffers=buffers, seeds=seed_list,
                         settings=settings)
    grid.cells = _expand(grid, where)
    return grid


def _builds_network(method: str, values: dict[str, Any]) -> bool:
    """The cell builds a network (so the norms axis applies): a trained method, or a frozen one that pre-trains."""
    from continual.config import FROZEN

    return method not in FROZEN or "pretrain_classes" in values


def _applies(name: str, probe) -> bool:
    from continual.config import INAPPLICABLE

    return all(applies(probe) for field_name, _, applies, _ in INAPPLICABLE if field_name == name)


def _expand(grid: ContinualGrid, where: str) -> list[ContinualCell]:
    from continual.config import INAPPLICABLE, ContinualConfig

    cells: dict[str, ContinualCell] = {}
    used: set[str] = set()
    for benchmark, (method, options), seed in itertools.product(grid.benchmarks, grid.methods.items(), grid.seeds):
        norms = grid.norms if _builds_network(method, {**grid.settings, **options}) else ["none"]
        buffers = grid.buffers if method in REPLAY else [0]
        names = sorted(options)
        for norm, buffer, values in itertools.product(norms, buffers,
                                                      itertools.product(*(options[n] for n in names))):
            chosen = dict(zip(names, values))
            everything = {**grid.settings, **chosen}
            probe = ContinualCell(benchmark, method, norm, buffer, {}, seed, everything).config()
            applied = {k: v for k, v in everything.items() if _applies(k, probe)}
            used |= {f"methods.{method}.{k}" if k in chosen else k for k in applied}
            cell = ContinualCell(benchmark=benchmark, method=method, norm=norm, buffer=buffer,
                                 options={k: v for k, v in applied.items() if k in chosen}, seed=seed,
                                 settings={k: v for k, v in applied.items() if k not in chosen})
            cells.setdefault(cell.key, cell)
    for name in [*grid.settings, *(f"methods.{m}.{o}" for m, opts in grid.methods.items() for o in opts)]:
        if name not in used and name != "device":
            field_name = name.rsplit(".", 1)[-1]
            what = next(w for f, _, _, w in INAPPLICABLE if f == field_name)
            raise _fail(where, f"continual.{name}", f"applies to no cell of this grid: it is for {what}")
    for cell in cells.values():
        try:
            cell.config().resolved()
        except FileNotFoundError:  # the default data is missing here: the cell fails when it runs
            pass
        except ValueError as error:
            raise _fail(where, "continual", f"cell {cell.key} is not a valid run: {error}") from None
    from eval.sweep import sort_key

    return sorted(cells.values(), key=lambda c: sort_key(c.axes()))


def continual_result_fields(cell: ContinualCell) -> dict[str, Any]:
    """The settings a continual cell's records depend on (its configuration, less what may change on resume)."""
    identity = cell.config().identity()
    return json.loads(json.dumps(identity, default=str))


def run_continual_cell(cell: ContinualCell, *, threads: int = 1,
                       accel: Mapping[str, bool] | None = None) -> list[dict[str, Any]]:
    """Run ``cell`` here as ``tta continual`` does and return its records: the per-experience records, then one
    summary record (``record["summary"]``: the seed's metrics), each with ``cell`` and ``sweep``."""
    import torch

    from continual.records import experience_records, read_records
    from continual.runner import run_experiment
    from tta import accel as fast_path

    torch.set_num_threads(threads)
    if accel is not None and str(cell.settings.get("device", "cpu")).startswith("cpu"):
        fast_path.enable(**accel)  # as tta continual does before any model runs
    with tempfile.TemporaryDirectory(prefix="tta-cell-") as scratch:
        result = run_experiment(cell.config(threads), scratch, progress=False)
        records = experience_records(read_records(Path(scratch) / "results.jsonl"))
    summary = {"kind": "summary", "summary": result["per_seed"][str(cell.seed)], "seed": cell.seed, "benchmark": cell.benchmark,
               "method": cell.method, "norm": result["config"]["norm"], "experiences": len(records),
               "config": result["config"]}
    return [{**r, "cell": cell.key, "sweep": cell.axes()} for r in [*records, summary]]


METRICS = (("final_average_accuracy", "final average accuracy"),
           ("average_incremental_accuracy", "average incremental accuracy"), ("forgetting", "forgetting"))


class ContinualTable:
    """The continual cells of a sweep: per (benchmark, method with options, norm, buffer), each metric's mean over
    the seeds with its spread (sample standard deviation; none with one seed)."""

    name = "continual"

    def __init__(self, records: list[dict[str, Any]]) -> None:
        from eval.sweep import method_label, sort_key

        self.rows: dict[tuple[str, str, str, int], dict[int, dict[str, float]]] = {}
        for record in sorted(records, key=lambda r: sort_key(r["sweep"])):
            if "summary" not in record:
                continue
            axes = record["sweep"]
            row = (axes["benchmark"], method_label(axes["method"], axes["options"]), axes["norm"], axes["buffer"])
            self.rows.setdefault(row, {})[axes["seed"]] = record["summary"]

    def values(self, row: tuple, metric: str) -> list[float]:
        return [m[metric] for m in self.rows[row].values() if m.get(metric) is not None]

    def to_markdown(self) -> str:
        header = ["benchmark", "method", "norm", "buffer", "seeds", *(label for _, label in METRICS)]
        lines = ["**continual** (accuracy in %, higher is better; forgetting in points, lower is better)", "",
                 "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
        for row, seeds in self.rows.items():
            cells = [_mean_spread(self.values(row, metric)) for metric, _ in METRICS]
            lines.append("| " + " | ".join([*row[:3], str(row[3]), str(len(seeds)), *cells]) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        import csv
        import io
        import statistics

        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["benchmark", "method", "norm", "buffer", "seeds",
                         *[f"{m}{s}" for m, _ in METRICS for s in ("", "_std")]])
        for row, seeds in self.rows.items():
            values = []
            for metric, _ in METRICS:
                v = self.values(row, metric)
                values += [f"{statistics.fmean(v):.6f}" if v else "",
                           f"{statistics.stdev(v):.6f}" if len(v) > 1 else ""]
            writer.writerow([*row, len(seeds), *values])
        return out.getvalue()


def _mean_spread(values: list[float]) -> str:
    import statistics

    if not values:
        return "–"
    text = f"{100 * statistics.fmean(values):.1f}"
    return text + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def check_no_selection(raw: dict[str, Any], where: str) -> None:
    if "select" in raw and "continual" in raw:
        raise SweepError(f"{where}: select: chooses options of corruption cells; a file with [select] cannot hold "
                         "[continual] too (run the continual cells as a sweep of their own)")
