"""Choosing hyper-parameters on held-out validation corruptions, then running the test grid with the choice.

A sweep file's ``[select]`` block names, per method, a grid of candidate option values (``tent = { lr = [1e-4,
1e-3] }``) and the validation data: by default the same data entries with their ``"extra"`` corruptions
(speckle_noise, gaussian_blur, spatter, saturate), the same severities, protocols, batch sizes, seeds and image
count as the test grid; each of those can be set apart (``n_images = 7500``: a validation stream as long as the
test stream). A selection whose validation corruptions overlap the test corruptions is refused: choosing on the
test corruptions would make the test results optimistic.

``tta select FILE --out DIR`` (or ``tta sweep`` on such a file) runs in two stages, both through the sweep
machinery (:func:`eval.sweep_driver.run_sweep`, the same cells on Ray, resumable):

1. validation cells into ``DIR/validation/``: every selected method with every candidate, on the validation data;
2. the test cells of the sweep file into ``DIR``, a selected method with the options chosen for its group.

The rule (:data:`RULE`, fixed before any result is seen): per method (with its fixed ``[methods]`` options) and
selection key (the cell axes named by ``per``, default model and data), a candidate's validation error is the
mean of the errors of all its validation records (one per corruption, severity, protocol, batch size and seed not
in ``per``, each weighted equally); the candidate with the lowest one is chosen, a tie going to the first in grid
order (the file's order). With ``margin > 0`` the method's default options (its options dataclass) are kept unless
the best candidate is lower by more than ``margin`` (a fraction: 0.003 = 0.3 points), so noise does not move a
default. With ``extend = N``, a single float option whose best value sits at an end of its grid gets one more
value beyond that end, with the ratio of the two last values (3 significant digits), at most N times, so the
choice is not an artefact of the grid's ends. Defaults in the code are never changed: the choice is recorded in
``DIR/selection.json``, in the test records' options, and in the "Selected hyper-parameters" table of
``DIR/results.md`` beside the default.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from eval.sweep import Cell, Sweep, _fail, _ints, _list, _unknown, method_label, sort_key

SELECT_KEYS = ("methods", "corruptions", "severities", "n_images", "protocols", "batch_sizes", "seeds", "models",
               "per", "margin", "extend")
PER_AXES = ("model", "data", "severity", "protocol", "batch_size", "seed")
VALIDATION_DIR = "validation"
TIE_TOLERANCE = 1e-9  # mean errors this close count as equal (the first in grid order wins; the margin includes it)

RULE = ("per method (with its fixed options) and selection key: the candidate with the lowest mean error over all "
        "its validation records (every validation corruption, severity, protocol, batch size and seed outside the "
        "key, equally weighted); a tie goes to the first candidate in grid order; with margin > 0 the default "
        "options are kept unless the best candidate is lower by more than the margin; with extend = N a single "
        "float option whose best value is at an end of its grid gets one more value beyond it (the ratio of the two "
        "last values), at most N times")


@dataclass
class Selection:
    """A validated ``[select]`` block. ``None`` fields take the test grid's value."""

    methods: dict[str, dict[str, list[Any]]]  # method -> option -> candidate values, in the file's order
    corruptions: str | list[str] = "extra"
    severities: list[int] | None = None
    n_images: int | None = None
    protocols: list[str] | None = None
    batch_sizes: list[int] | None = None
    seeds: list[int] | None = None
    models: list[str] | None = None  # names of [[models]] entries to validate with (None: all)
    per: list[str] = field(default_factory=lambda: ["model", "data"])
    margin: float = 0.0
    extend: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- parsing -------------------------------------------------------------------------------------------------------

def parse_selection(raw: Any, sweep: Sweep, where: str) -> Selection:
    """Validate the ``[select]`` block of ``sweep``'s file; :class:`SweepError` names the key and what is allowed
    (an overlap of validation and test corruptions names the corruptions)."""
    import tta
    from eval.sweep import _parse_methods
    from streams.protocols import KINDS

    if not isinstance(raw, dict):
        raise _fail(where, "select", "must be a table: [select] with methods = { tent = { lr = [...] } }")
    _unknown(raw, SELECT_KEYS, "select.", where)
    methods = _parse_methods(raw.get("methods"), f"{where}: select", tta)
    for method, grid in methods.items():
        if method not in sweep.methods:
            raise _fail(where, f"select.methods.{method}", f"not in [methods] ({', '.join(sweep.methods)}); a "
                        "selected method must also be a method of the test grid")
        both = sorted(set(grid) & set(sweep.methods[method]))
        if both:
            raise _fail(where, f"select.methods.{method}.{both[0]}", "also set in [methods]; an option is either "
                        "fixed (or a grid) in [methods] or selected in [select], not both")
        for name, values in grid.items():
            if any(values.index(v) != i for i, v in enumerate(values)):  # 1 and 1.0 too: the same candidate
                raise _fail(where, f"select.methods.{method}.{name}", f"{values} repeats a value")
    selection = Selection(methods=methods)
    prefixed = {f"select.{key}": value for key, value in raw.items()}  # so that errors name select.KEY
    if "corruptions" in raw:
        selection.corruptions = raw["corruptions"]
    if "severities" in raw:
        severities = _ints(_list(prefixed, "select.severities", where), "select.severities", where, 1)
        if any(s > 5 for s in severities):
            raise _fail(where, "select.severities", f"{severities} is not allowed; allowed: 1, 2, 3, 4, 5")
        selection.severities = severities
    if "n_images" in raw:
        n = raw["n_images"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _fail(where, "select.n_images", f"{n!r} is not allowed; allowed: an integer >= 1")
        selection.n_images = n
    if "protocols" in raw:
        protocols = _list(prefixed, "select.protocols", where)
        for i, p in enumerate(protocols):
            if p not in KINDS or protocols.index(p) != i:
                raise _fail(where, f"select.protocols[{i}]", f"{p!r} is not allowed; allowed: each of "
                            f"{', '.join(KINDS)} at most once")
        selection.protocols = protocols
    if "batch_sizes" in raw:
        selection.batch_sizes = _ints(_list(prefixed, "select.batch_sizes", where), "select.batch_sizes", where, 1)
    if "seeds" in raw:
        selection.seeds = _ints(_list(prefixed, "select.seeds", where), "select.seeds", where)
    if "models" in raw:
        names = [m["name"] for m in sweep.models]
        models = _list(prefixed, "select.models", where)
        for i, name in enumerate(models):
            if name not in names or models.index(name) != i:
                raise _fail(where, f"select.models[{i}]", f"{name!r} is not allowed; allowed: each [[models]] name "
                            f"at most once ({', '.join(names)})")
        selection.models = models
    if "per" in raw:
        per = raw["per"] if isinstance(raw["per"], list) else [raw["per"]]
        for i, axis in enumerate(per):
            if axis not in PER_AXES or per.count(axis) > 1:
                raise _fail(where, f"select.per[{i}]", f"{axis!r} is not allowed; allowed: each of "
                            f"{', '.join(PER_AXES)} at most once")
        selection.per = [a for a in PER_AXES if a in per]
    if "margin" in raw:
        margin = raw["margin"]
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
            raise _fail(where, "select.margin", f"{margin!r} is not allowed; allowed: a number in [0, 1) (an error "
                        "difference: 0.003 = 0.3 points)")
        selection.margin = float(margin)
    if "extend" in raw:
        extend = raw["extend"]
        if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
            raise _fail(where, "select.extend", f"{extend!r} is not allowed; allowed: an integer >= 0")
        selection.extend = extend
    _check_data(selection, sweep, where)
    _check_defaults(selection, where)
    _check_coverage(selection, sweep, where)
    return selection


def _check_data(selection: Selection, sweep: Sweep, where: str) -> None:
    """Validation data must be corruptions, and none of them a test corruption of data the choice applies to."""
    from streams.protocols import corruption_names

    try:
        validation = set(corruption_names(selection.corruptions))
    except ValueError as error:
        raise _fail(where, "select.corruptions", f"{error} (or 'all', 'extra')") from None
    for i, entry in enumerate(sweep.data):
        if "domains" in entry:
            raise _fail(where, f"data[{i}]", "streams domains; [select] chooses on held-out corruptions, so every "
                        "data entry of a file with [select] needs corruptions")
    for i, entry in enumerate(sweep.data):
        # every data entry, whatever select.per: the validation corruptions are held out from all test streams
        test = set(corruption_names(entry["corruptions"]))
        overlap = sorted(validation & test)
        if overlap:
            raise _fail(where, "select.corruptions", f"the validation corruptions overlap the test corruptions of "
                        f"data[{i}] ({entry['name']}): {', '.join(overlap)}; hyper-parameters must be chosen on "
                        "held-out corruptions (default 'extra': speckle_noise, gaussian_blur, spatter, saturate), "
                        "never on the test ones")


def _check_defaults(selection: Selection, where: str) -> None:
    """With a margin, each method's default options must be one of its candidates (the margin keeps them)."""
    if selection.margin <= 0:
        return
    for method, grid in selection.methods.items():
        default = default_candidate(method, list(grid))
        if any(default[name] not in values for name, values in grid.items()):
            shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in default.items())
            raise _fail(where, f"select.methods.{method}", "select.margin keeps the default unless a candidate "
                        f"beats it by more, so the grid must contain the default ({shown})")


def _check_coverage(selection: Selection, sweep: Sweep, where: str) -> None:
    """Every test cell of a selected method needs validation cells of its selection key."""
    validation = {(c.method, group_key(c.axes(), selection.per)) for c in validation_sweep(sweep, selection).cells()}
    for cell in sweep.cells():
        if cell.method in selection.methods and (cell.method, group_key(cell.axes(), selection.per)) not in validation:
            raise _fail(where, "select.per", f"the test cell {cell.key} has no validation cells for "
                        f"{key_label(group_key(cell.axes(), selection.per))} (a choice is made per "
                        f"{', '.join(selection.per) or 'nothing'}); validate on those values too, or leave that "
                        "axis out of select.per")


# -- the cells -----------------------------------------------------------------------------------------------------

def default_candidate(method: str, names: Sequence[str]) -> dict[str, Any]:
    """The dataclass defaults of the selected options of ``method``."""
    from eval.method_cli import resolved_options

    defaults = resolved_options(method, {})
    return {name: defaults[name] for name in names}


def validation_sweep(sweep: Sweep, selection: Selection, grids: dict[str, dict[str, list[Any]]] | None = None
                     ) -> Sweep:
    """The sweep of validation cells: each selected method with its fixed options and every candidate (``grids``:
    the candidate grids, when extended beyond the file's), on the validation corruptions of every data entry."""
    grids = selection.methods if grids is None else grids
    data = []
    for entry in sweep.data:
        entry = {**entry, "corruptions": selection.corruptions}
        if selection.severities is not None:
            entry["severities"] = list(selection.severities)
        if selection.n_images is not None:
            entry["n_images"] = selection.n_images
        data.append(entry)
    models = [m for m in sweep.models if selection.models is None or m["name"] in selection.models]
    methods = {m: {**sweep.methods[m], **grid} for m, grid in grids.items()}
    return dataclasses.replace(
        sweep, path=f"{sweep.path} (validation)", methods=methods, models=models, data=data,
        protocols=list(selection.protocols or sweep.protocols),
        batch_sizes=list(selection.batch_sizes or sweep.batch_sizes), seeds=list(selection.seeds or sweep.seeds),
        select=None)


def group_key(axes: dict[str, Any], per: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """The selection key of a cell: its values on the ``per`` axes."""
    return tuple((axis, axes[axis]) for axis in per)


def key_label(key: tuple[tuple[str, Any], ...]) -> str:
    """``model=resnet20|data=cifar10`` (``all`` for an empty key)."""
    return "|".join(f"{axis}={'-' if value is None else value}" for axis, value in key) or "all"


@dataclass
class Candidate:
    """One candidate of one group: its options and the validation errors of its finished cells."""

    options: dict[str, Any]
    errors: list[float] = field(default_factory=list)
    cells: int = 0
    missing: list[str] = field(default_factory=list)  # validation cells not done (failed or not run yet)

    @property
    def error(self) -> float | None:
        return statistics.fmean(self.errors) if self.errors and not self.missing else None


@dataclass
class Group:
    """The candidates of one method (with its fixed options) for one selection key, and the choice."""

    method: str
    fixed: dict[str, Any]
    key: tuple[tuple[str, Any], ...]
    candidates: list[Candidate]
    default: dict[str, Any]
    chosen: dict[str, Any] | None = None
    best: dict[str, Any] | None = None  # the lowest mean error, before the margin

    @property
    def complete(self) -> bool:
        return all(c.error is not None for c in self.candidates)

    def candidate(self, options: dict[str, Any]) -> Candidate | None:
        return next((c for c in self.candidates if c.options == options), None)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.candidate(self.chosen) if self.chosen is not None else None
        default = self.candidate(self.default)
        return {"method": self.method, "fixed": self.fixed, "key": dict(self.key),
                "candidates": [{"options": c.options, "validation_error": c.error, "records": len(c.errors),
                                "cells": c.cells, "missing": c.missing} for c in self.candidates],
                "best": self.best, "chosen": self.chosen,
                "validation_error": None if chosen is None else chosen.error,
                "default": self.default, "default_validation_error": None if default is None else default.error}


def choose(candidates: Sequence[Candidate], default: dict[str, Any], margin: float = 0.0
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(chosen, best) options of complete ``candidates`` by :data:`RULE`: best = the lowest mean error, the first
    in grid order on a tie; chosen = best, or the default when ``margin > 0`` and the default is within it."""
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate.error < best.error - TIE_TOLERANCE:
            best = candidate
    chosen = best
    kept = next((c for c in candidates if c.options == default), None)
    if margin > 0 and kept is not None and kept.error - best.error <= margin + TIE_TOLERANCE:
        chosen = kept
    return dict(chosen.options), dict(best.options)


def candidates_of(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The candidates of a grid in grid order: the product of the values, the file's first option varying slowest."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def evaluate(sweep: Sweep, selection: Selection, grids: dict[str, dict[str, list[Any]]], out: Path) -> list[Group]:
    """The groups of the validation cells with the errors recorded in ``out`` (a validation folder), and the choice
    of every complete group. Only cells of the current validation grid count."""
    from eval.records import ResultsLog
    from eval.sweep_driver import latest_status

    status = latest_status(out)
    errors: dict[str, list[float]] = {}
    for record in ResultsLog(out / "results.jsonl").read():
        errors.setdefault(record["cell"], []).append(record["error"])
    groups: dict[tuple, Group] = {}
    for cell in validation_sweep(sweep, selection, grids).cells():
        names = grids[cell.method]
        fixed = {k: v for k, v in cell.options.items() if k not in names}
        options = {k: cell.options[k] for k in names}
        key = group_key(cell.axes(), selection.per)
        ident = (cell.method, json.dumps(fixed, sort_keys=True), key)
        if ident not in groups:
            groups[ident] = Group(method=cell.method, fixed=fixed, key=key,
                                  candidates=[Candidate(c) for c in candidates_of(names)],
                                  default=default_candidate(cell.method, list(names)))
        candidate = groups[ident].candidate(options)
        if status.get(cell.key, {}).get("kind") == "done":
            candidate.errors += errors.get(cell.key, [])
            candidate.cells += 1
        else:
            candidate.missing.append(cell.key)
    for group in groups.values():
        if group.complete:
            group.chosen, group.best = choose(group.candidates, group.default, selection.margin)
    return list(groups.values())


def extensions(selection: Selection, grids: dict[str, dict[str, list[Any]]], groups: Sequence[Group]
               ) -> dict[str, list[float]]:
    """Per method, the values to add to its grid (see :data:`RULE`): beyond an end of a single float option's grid
    where the best value of some group sits. Empty when nothing is to be added (or a group is incomplete)."""
    import tta
    from eval.method_cli import cli_fields

    if not all(g.complete for g in groups):
        return {}
    added: dict[str, list[float]] = {}
    for method, grid in grids.items():
        if len(grid) != 1:
            continue
        (name, values), = grid.items()
        hint = dict((f.name, h) for f, h in cli_fields(method))[name]
        if hint is not float or len(values) < 2 or not all(isinstance(v, (int, float)) and v > 0 for v in values):
            continue
        ordered = sorted(values)
        new = []
        for group in (g for g in groups if g.method == method):
            best = group.best[name]
            if best == ordered[-1]:
                new.append(float(f"{ordered[-1] * ordered[-1] / ordered[-2]:.3g}"))
            if best == ordered[0]:
                new.append(float(f"{ordered[0] * ordered[0] / ordered[1]:.3g}"))
        fresh = []
        for value in dict.fromkeys(new):
            try:
                tta.method_options(method)(**{name: value})
            except (TypeError, ValueError):
                continue  # beyond the option's range (alpha > 1): that end stays
            if value not in values:
                fresh.append(value)
        if fresh:
            added[method] = fresh
    return added


def test_cells(sweep: Sweep, selection: Selection, groups: Sequence[Group]) -> tuple[list[Cell], list[str]]:
    """(runnable test cells, keys of test cells still waiting for a choice): the sweep file's grid, each cell of a
    selected method with the options chosen for its group."""
    chosen = {(g.method, json.dumps(g.fixed, sort_keys=True), g.key): g.chosen for g in groups}
    cells, waiting = [], []
    for cell in sweep.cells():
        if cell.method not in selection.methods:
            cells.append(cell)
            continue
        options = chosen.get((cell.method, json.dumps(cell.options, sort_keys=True),
                              group_key(cell.axes(), selection.per)))
        if options is None:
            waiting.append(cell.key)
        else:
            cells.append(dataclasses.replace(cell, options={**cell.options, **options}))
    return sorted(cells, key=lambda c: sort_key(c.axes())), waiting


@dataclass
class CellsSweep(Sweep):
    """A sweep whose cells are given (the test cells with the chosen options), for :func:`run_sweep`."""

    given: list[Cell] = field(default_factory=list)

    def cells(self) -> list[Cell]:
        return list(self.given)


# -- running -------------------------------------------------------------------------------------------------------

@dataclass
class SelectOutcome:
    """What a call of :func:`run_selection` did: the sweep summaries of both stages, the groups, waiting cells."""

    validation: list[Any] = field(default_factory=list)  # SweepSummary per validation round
    test: list[Any] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    grids: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)  # test cells without a choice (a validation cell failed)

    @property
    def failed(self) -> list[str]:
        last = [s.still_failed for s in (self.validation[-1:] + self.test[-1:])]
        return [key for keys in last for key in keys]


def settle(sweep: Sweep, out: Path, run: Callable[[Sweep, Path], Any] | None = None
           ) -> tuple[dict[str, dict[str, list[Any]]], list[Group], list[Any]]:
    """Run (``run(validation_sweep, folder)``; None: only read what is there) the validation cells round by round,
    extending the grids as :data:`RULE` says; returns the final grids, the groups and the round summaries."""
    selection = sweep.select
    grids = {m: {k: list(v) for k, v in grid.items()} for m, grid in selection.methods.items()}
    folder = out / VALIDATION_DIR
    summaries = []
    for round_ in range(selection.extend + 1):
        if run is not None:
            summaries.append(run(validation_sweep(sweep, selection, grids), folder))
        groups = evaluate(sweep, selection, grids, folder)
        added = extensions(selection, grids, groups) if round_ < selection.extend else {}
        if not added:
            break
        for method, values in added.items():
            (name,) = grids[method]
            grids[method][name] = grids[method][name] + values
    return grids, groups, summaries


def run_selection(sweep: Sweep, out: str | Path, executor, *, retry_failed: bool = False, progress: bool = True,
                  validation_only: bool = False) -> SelectOutcome:
    """Choose on the validation cells (``out/validation``), write ``out/selection.json``, then run the test cells
    with the choices into ``out`` (unless ``validation_only``). Reruns skip finished cells of both stages;
    ``retry_failed`` reruns the failed ones (and runs test cells whose choice has become possible)."""
    from eval.sweep_driver import run_sweep

    out = Path(out)
    outcome = SelectOutcome()

    def run_validation(validation: Sweep, folder: Path):
        return run_sweep(validation, folder, executor, retry_failed=retry_failed, progress=progress)

    outcome.grids, outcome.groups, outcome.validation = settle(sweep, out, run_validation)
    write_selection(sweep, outcome.grids, outcome.groups, out)
    if validation_only:
        return outcome
    cells, outcome.waiting = test_cells(sweep, sweep.select, outcome.groups)
    test = CellsSweep(**{f.name: getattr(sweep, f.name) for f in dataclasses.fields(Sweep)}, given=cells)
    if retry_failed:  # the failed test cells, then those never run (their choice may be new)
        outcome.test.append(run_sweep(test, out, executor, retry_failed=True, progress=progress))
    outcome.test.append(run_sweep(test, out, executor, progress=progress))
    return outcome


def write_selection(sweep: Sweep, grids: dict[str, dict[str, list[Any]]], groups: Sequence[Group], out: Path
                    ) -> dict[str, Any]:
    """Write ``out/selection.json``: the rule and validation settings, and per method (its label with the fixed
    options, ``tent`` or ``tent[steps=2]``) and selection key, each candidate's options and validation error, the
    chosen options and the defaults. Returns what it wrote."""
    from eval.records import write_json_atomic
    from streams.protocols import corruption_names

    selection = sweep.select
    validation = validation_sweep(sweep, selection, grids)
    methods: dict[str, dict[str, Any]] = {}
    for group in groups:
        methods.setdefault(method_label(group.method, group.fixed), {})[key_label(group.key)] = group.to_dict()
    data = {"rule": RULE, "select": selection.to_dict(), "grids": grids,
            "extended": {m: [v for v in grids[m][n] if v not in selection.methods[m][n]]
                         for m in grids for n in grids[m] if len(grids[m][n]) > len(selection.methods[m][n])},
            "validation": {"corruptions": list(corruption_names(selection.corruptions)),
                           "models": [m["name"] for m in validation.models],
                           "data": {d["name"]: {"severities": d["severities"],
                                                "n_images": d.get("n_images", sweep.settings["n_images"])}
                                    for d in validation.data},
                           "protocols": validation.protocols, "batch_sizes": validation.batch_sizes,
                           "seeds": validation.seeds, "cells": len(validation.cells())},
            "test_corruptions": {d["name"]: list(corruption_names(d["corruptions"])) for d in sweep.data},
            "methods": methods}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "selection.json", data)
    return data


# -- the report ----------------------------------------------------------------------------------------------------

def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, bool)) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def _options(options: dict[str, Any] | None) -> str:
    if options is None:
        return "–"
    return ", ".join(f"{k}={_value(v)}" for k, v in options.items())


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def selection_markdown(groups: Sequence[Group], selection: Selection) -> str:
    """The "Selected hyper-parameters" table: per method and key, the chosen options, their validation error, the
    defaults with theirs, and every candidate's error."""
    lines = ["## Selected hyper-parameters", "",
             f"Chosen on the validation corruptions only ({', '.join(_names(selection.corruptions))}), never on "
             "the test corruptions. Rule: " + RULE + f" (margin {selection.margin:g}, extend {selection.extend}). "
             "Validation error in %, mean over the validation records; the defaults in the code are unchanged. "
             "Per candidate: `selection.json`, `validation/results.md`.", "",
             "| method | for | chosen | validation error | default | its validation error | candidates |",
             "|---|---|---|---:|---|---:|---|"]
    for group in groups:
        chosen = group.candidate(group.chosen) if group.chosen is not None else None
        default = group.candidate(group.default)
        candidates = ", ".join(("**" if c.options == group.chosen else "") + _options(c.options) + ": "
                               + _percent(c.error) + ("**" if c.options == group.chosen else "")
                               for c in group.candidates)
        lines.append(_row(group, chosen, default, candidates))
    return "\n".join(lines) + "\n"


def _row(group: Group, chosen: Candidate | None, default: Candidate | None, candidates: str) -> str:
    default_error = _percent(default.error) if default is not None else "not a candidate"
    where = key_label(group.key).replace("|", ", ")  # a bare | would end the Markdown cell
    return (f"| {method_label(group.method, group.fixed)} | {where} | "
            f"{_options(group.chosen) if chosen else '(not chosen: validation incomplete)'} | "
            f"{_percent(chosen.error if chosen else None)} | {_options(group.default)} | {default_error} | "
            f"{candidates} |")


def _names(spec: str | list[str]) -> list[str]:
    from streams.protocols import corruption_names

    return list(corruption_names(spec))
