"""A sweep file as plain data: parse and validate a TOML grid, expand it into cells, order the cells.

A cell is one stream run of ``tta corruption`` / ``tta domains``: one model, one data entry (corruptions at one
severity, or a list of domains), one protocol, one batch size, one method with one combination of its options,
one seed; or (a ``[continual]`` table, :mod:`eval.sweep_continual`) one ``tta continual`` run of one seed.
``tta sweep`` (:mod:`eval.sweep_cli`) runs the cells; this module only describes them, so it imports
neither Ray nor a model.

The order of cells (and so of the records in a sweep's results.jsonl) is :func:`sort_key`: cells compare by the
tuple (model name, data name, severity, protocol, batch size, method, options, seed), element by element; names
compare by code point, numbers numerically (batch size 64 before 128, seed 2 before 10), a missing severity
(domains, the gradual protocol) before any number; options compare as their (name, value) pairs sorted by name.
Continual cells come after all corruption cells and compare by (benchmark, method, options, norm, buffer, seed).
The order does not depend on the order of the sweep file or on which cell finished first.
"""
from __future__ import annotations

import itertools
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TOP_LEVEL_KEYS = ("methods", "models", "data", "protocols", "batch_sizes", "seeds", "n_images", "delta", "device",
                  "deterministic", "source_images", "source_split", "select", "amp", "channels_last", "continual")
AMP_VALUES = ("bf16", "fp16")  # a sweep's ``amp``: every cell under that autocast (left out: float32)
MODEL_KEYS = ("name", "model", "weights", "arch", "input_mean", "input_std", "num_classes", "download")
DATA_KEYS = ("name", "path", "split", "corruptions", "severities", "domains", "source_data", "n_images")


class SweepError(ValueError):
    """An invalid sweep file; the message names the key and what is allowed there."""


@dataclass(frozen=True)
class Cell:
    """One stream run of the grid. ``model`` and ``data`` are the validated entries of the sweep file;
    ``options`` holds the method options this cell sets (the others keep their defaults)."""

    model: dict[str, Any]
    data: dict[str, Any]
    severity: int | None
    protocol: str
    batch_size: int
    method: str
    options: dict[str, Any]
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)  # the sweep's scalar settings (n_images, delta, ...)

    def axes(self) -> dict[str, Any]:
        """The cell's position in the grid, as every record of the cell carries it (``record["sweep"]``)."""
        return {"model": self.model["name"], "data": self.data["name"], "severity": self.severity,
                "protocol": self.protocol, "batch_size": self.batch_size, "method": self.method,
                "options": dict(self.options), "seed": self.seed}

    @property
    def key(self) -> str:
        return cell_key(self.axes())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cell":
        return cls(**data)


def method_label(method: str, options: dict[str, Any]) -> str:
    """``tent`` or ``tent[lr=0.0001,steps=2]``: a method with the options its cell sets."""
    if not options:
        return method
    return method + "[" + ",".join(f"{k}={json.dumps(options[k])}" for k in sorted(options)) + "]"


def cell_key(axes: dict[str, Any]) -> str:
    """The readable, unique name of a cell (records carry it as ``record["cell"]``)."""
    if axes.get("kind") == "continual":
        return continual_cell_key(axes)
    data = axes["data"] + (f"@{axes['severity']}" if axes["severity"] is not None else "")
    return (f"model={axes['model']}|data={data}|protocol={axes['protocol']}|batch_size={axes['batch_size']}"
            f"|method={method_label(axes['method'], axes['options'])}|seed={axes['seed']}")


def continual_cell_key(axes: dict[str, Any]) -> str:
    """The key of a continual cell: ``benchmark=split-digits|method=er[lr=0.1]|norm=bn|buffer=200|seed=0``."""
    return (f"benchmark={axes['benchmark']}|method={method_label(axes['method'], axes['options'])}"
            f"|norm={axes['norm']}|buffer={axes['buffer']}|seed={axes['seed']}")


def _comparable(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)):  # bool too: False < True
        return (0, float(value))
    return (1, str(value))


def sort_key(axes: dict[str, Any]) -> tuple:
    """The order of cells and of their records (see the module docstring); ``axes`` as in :meth:`Cell.axes` (or
    :meth:`eval.sweep_continual.ContinualCell.axes`)."""
    options = tuple((name, _comparable(axes["options"][name])) for name in sorted(axes["options"]))
    if axes.get("kind") == "continual":
        return (1, axes["benchmark"], axes["method"], options, axes["norm"], axes["buffer"], axes["seed"])
    severity = (0, -1) if axes["severity"] is None else (1, axes["severity"])
    return (0, axes["model"], axes["data"], severity, axes["protocol"], axes["batch_size"], axes["method"], options,
            axes["seed"])


@dataclass
class Sweep:
    """A validated sweep file."""

    path: str
    methods: dict[str, dict[str, list[Any]]]  # method -> option -> values (a grid; one value = fixed)
    models: list[dict[str, Any]]
    data: list[dict[str, Any]]
    protocols: list[str]
    batch_sizes: list[int]
    seeds: list[int]
    settings: dict[str, Any]
    select: Any = None  # the [select] block (eval.sweep_select.Selection): choose options on validation data first
    continual: Any = None  # the [continual] table (eval.sweep_continual.ContinualGrid), with its cells

    def cells(self) -> list[Any]:
        """Every cell of the grid, corruption cells (:meth:`corruption_cells`) then continual cells."""
        return self.corruption_cells() + (list(self.continual.cells) if self.continual is not None else [])

    def corruption_cells(self) -> list[Cell]:
        """Every cell of the grid, in :func:`sort_key` order (a selected method with its fixed options only: the
        test cells with the chosen options are :func:`eval.sweep_select.test_cells`)."""
        cells = []
        for model, data, protocol, batch_size, seed in itertools.product(
                self.models, self.data, self.protocols, self.batch_sizes, self.seeds):
            severities: list[int | None] = [None] if "domains" in data or protocol == "gradual" \
                else list(data["severities"])
            for severity, (method, grid) in itertools.product(severities, self.methods.items()):
                names = sorted(grid)
                for values in itertools.product(*(grid[n] for n in names)):
                    cells.append(Cell(model=model, data=data, severity=severity, protocol=protocol,
                                      batch_size=batch_size, method=method, options=dict(zip(names, values)),
                                      seed=seed, settings=dict(self.settings)))
        return sorted(cells, key=lambda c: sort_key(c.axes()))


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (TOML); :class:`SweepError` names the first bad key and the allowed values.
    Methods registered by plugins must be imported before (``tta sweep --plugin``)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep file {path} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise SweepError(f"{path}: not valid TOML: {error}") from None
    return parse_sweep(raw, str(path))


def _fail(where: str, key: str, problem: str) -> SweepError:
    return SweepError(f"{where}: {key}: {problem}")


def _list(raw: dict[str, Any], key: str, where: str, default: list[Any] | None = None) -> list[Any]:
    value = raw.get(key, default)
    if value is None:
        raise _fail(where, key, "missing (required)")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise _fail(where, key, "empty; give at least one value")
    return values


def _ints(values: list[Any], key: str, where: str, minimum: int | None = None) -> list[int]:
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
            raise _fail(where, f"{key}[{i}]", f"{v!r} is not allowed; allowed: integers"
                        + (f" >= {minimum}" if minimum is not None else ""))
    if len(set(values)) != len(values):
        raise _fail(where, key, f"{values} repeats a value")
    return values


def _unknown(table: dict[str, Any], allowed: tuple[str, ...], prefix: str, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise _fail(where, f"{prefix}{key}", f"unknown key; allowed: {', '.join(allowed)}")


def parse_sweep(raw: dict[str, Any], where: str = "sweep") -> Sweep:
    """Validate a parsed sweep file (see :func:`load_sweep`). It holds corruption cells (``methods``, ``models``,
    ``data``), continual cells (``[continual]``), or both."""
    import tta
    from streams.protocols import KINDS

    _unknown(raw, TOP_LEVEL_KEYS, "", where)
    corruption = "continual" not in raw or any(k in raw for k in ("methods", "models", "data"))
    if corruption:
        methods = _parse_methods(raw.get("methods"), where, tta)
        models = _parse_named(raw, "models", MODEL_KEYS, where, _check_model)
        data = _parse_named(raw, "data", DATA_KEYS, where, _check_data)
    else:
        methods, models, data = {}, [], []
    protocols = _list(raw, "protocols", where, ["reset"])
    for i, p in enumerate(protocols):
        if p not in KINDS:
            raise _fail(where, f"protocols[{i}]", f"{p!r} is not a protocol; allowed: {', '.join(KINDS)}")
    if len(set(protocols)) != len(protocols):
        raise _fail(where, "protocols", f"{protocols} repeats a value")
    if "gradual" in protocols and any("domains" in d for d in data):
        raise _fail(where, "protocols", "'gradual' needs corruptions; a data entry with domains cannot run it")
    settings: dict[str, Any] = {"n_images": None, "delta": 0.1, "device": "cpu", "deterministic": False,
                                "source_images": 2000, "source_split": "train", "amp": None, "channels_last": False}
    for key, kind in (("n_images", int), ("delta", float), ("device", str), ("deterministic", bool),
                      ("source_images", int), ("source_split", str), ("amp", str), ("channels_last", bool)):
        if key in raw:
            value = raw[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise _fail(where, key, f"{value!r} is not allowed; allowed: a single {kind.__name__}")
            settings[key] = value
    if settings["n_images"] is not None and settings["n_images"] < 1:
        raise _fail(where, "n_images", f"{settings['n_images']} is not allowed; allowed: an integer >= 1")
    if not settings["delta"] > 0:
        raise _fail(where, "delta", f"{settings['delta']} is not allowed; allowed: a number > 0")
    if settings["amp"] is not None and settings["amp"] not in AMP_VALUES:
        raise _fail(where, "amp", f"{settings['amp']!r} is not allowed; allowed: "
                    f"{', '.join(repr(v) for v in AMP_VALUES)} (leave it out for float32)")
    sweep = Sweep(path=where, methods=methods, models=models, data=data, protocols=protocols,
                  batch_sizes=_ints(_list(raw, "batch_sizes", where, [200]), "batch_sizes", where, 1),
                  seeds=_ints(_list(raw, "seeds", where, [0]), "seeds", where), settings=settings)
    if "continual" in raw:
        from eval.sweep_continual import check_no_selection, parse_continual

        check_no_selection(raw, where)
        sweep.continual = parse_continual(raw["continual"], where, sweep.seeds, settings["device"])
    if "select" in raw:
        from eval.sweep_select import parse_selection

        sweep.select = parse_selection(raw["select"], sweep, where)
    return sweep


def _parse_methods(raw: Any, where: str, tta) -> dict[str, dict[str, list[Any]]]:
    from eval.method_cli import cli_fields

    if not isinstance(raw, dict) or not raw:
        raise _fail(where, "methods", "missing or empty; give a table such as [methods] with source = {} and "
                    f"tent = {{ lr = [0.001, 0.0001] }} (or a [continual] table alone); allowed methods: "
                    f"{', '.join(tta.methods())}")
    methods = {}
    for method, options in raw.items():
        if method not in tta.methods():
            raise _fail(where, f"methods.{method}", f"unknown method; allowed: {', '.join(tta.methods())} "
                        "(a plugin's methods: pass --plugin MODULE)")
        if not isinstance(options, dict):
            raise _fail(where, f"methods.{method}", "must be a table of options, e.g. {} or { lr = [0.001] }")
        fields = {f.name: hint for f, hint in cli_fields(method)}
        grid = {}
        for name, value in options.items():
            if name not in fields:
                raise _fail(where, f"methods.{method}.{name}", f"unknown option; allowed: {', '.join(fields)}")
            values = value if isinstance(value, list) else [value]
            if not values:
                raise _fail(where, f"methods.{method}.{name}", "empty list; give at least one value")
            for v in values:
                try:
                    tta.method_options(method)(**{name: v})
                except (TypeError, ValueError) as error:
                    raise _fail(where, f"methods.{method}.{name}", f"{v!r} is not allowed ({error})") from None
                if not _value_fits(v, fields[name]):
                    raise _fail(where, f"methods.{method}.{name}",
                                f"{v!r} is not allowed; allowed: {_describe(fields[name])}")
            grid[name] = values
        methods[method] = grid
    return methods


def _value_fits(value: Any, hint: Any) -> bool:
    from typing import Literal, get_args, get_origin

    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(hint) is Literal:
        return ", ".join(repr(a) for a in get_args(hint))
    return f"a {getattr(hint, '__name__', hint)} or a list of them"


def _parse_named(raw: dict[str, Any], key: str, allowed: tuple[str, ...], where: str, check) -> list[dict[str, Any]]:
    entries = raw.get(key)
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise _fail(where, key, f"missing or not an array of tables; give one or more [[{key}]] tables with "
                    f"keys {', '.join(allowed)}")
    names = []
    out = []
    for i, entry in enumerate(entries):
        prefix = f"{key}[{i}]."
        _unknown(entry, allowed, prefix, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "|@[]="):
            raise _fail(where, f"{prefix}name", "missing or not allowed; allowed: a non-empty string without "
                        "| @ [ ] =")
        if name in names:
            raise _fail(where, f"{prefix}name", f"{name!r} is used twice; names must be unique")
        names.append(name)
        out.append(check(dict(entry), prefix, where))
    return out


def _check_model(entry: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    if "arch" in entry and ("input_mean" not in entry or "input_std" not in entry):
        raise _fail(where, f"{prefix}arch", "needs input_mean and input_std (0,0,0 and 1,1,1 when the model "
                    "normalises inside)")
    if "model" not in entry and "arch" not in entry:
        raise _fail(where, f"{prefix}model", "missing; give model (cifar10_resnet20, torchvision:<arch>, ...) or "
                    "arch (package.module:callable) with weights")
    for key in ("input_mean", "input_std"):
        if key in entry and (not isinstance(entry[key], list)
                             or not all(isinstance(v, (int, float)) for v in entry[key])):
            raise _fail(where, f"{prefix}{key}", "allowed: a list of numbers, one per channel")
    entry.setdefault("num_classes", 10)
    return entry


def _check_data(entry: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    from streams.protocols import corruption_names

    if not isinstance(entry.get("path"), str):
        raise _fail(where, f"{prefix}path", "missing; give 'digits', an ImageFolder .zip/folder, a CIFAR python "
                    "folder, a CIFAR-10-C / ImageNet-C folder, or (with domains) a folder of domain folders")
    if "n_images" in entry and (not isinstance(entry["n_images"], int) or isinstance(entry["n_images"], bool)
                                or entry["n_images"] < 1):
        raise _fail(where, f"{prefix}n_images", f"{entry['n_images']!r} is not allowed; allowed: an integer >= 1")
    if "domains" in entry:
        for key in ("corruptions", "severities"):
            if key in entry:
                raise _fail(where, f"{prefix}{key}", "not allowed with domains (a data entry streams either "
                            "corruptions or domains)")
        if not isinstance(entry["domains"], list) or not all(isinstance(d, str) for d in entry["domains"]):
            raise _fail(where, f"{prefix}domains", "allowed: a list of domain folder names ([] = all)")
        return entry
    corruptions = entry.setdefault("corruptions", "all")
    try:
        corruption_names(corruptions)
    except ValueError as error:
        raise _fail(where, f"{prefix}corruptions", f"{error} (or 'all', 'extra')") from None
    severities = entry.setdefault("severities", [5])
    severities = severities if isinstance(severities, list) else [severities]
    for i, s in enumerate(severities):
        if s not in (1, 2, 3, 4, 5) or isinstance(s, bool):
            raise _fail(where, f"{prefix}severities[{i}]", f"{s!r} is not allowed; allowed: 1, 2, 3, 4, 5")
    entry["severities"] = severities
    return entry
