"""Reports built from result records alone: the table TTA papers print (rows: methods; columns: domains and the
mean), as Markdown and CSV, and PNG plots. ``tta`` rebuilds a report from results.jsonl without rerunning.

A protocol streamed for several rounds (``--rounds``) also gets the table "error per round" (rows: methods;
columns: rounds, each the mean over that round's domains) and its plot, error against round: whether a method
degrades over a long stream shows there at a glance, where the per-domain table has one column per segment."""
from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from eval.metrics import mean_error
from tta._extras import installed, missing_message, require


@dataclass
class ErrorTable:
    """errors[method][column] in [0, 1]; columns in stream order; methods in registry order."""

    protocol: str
    methods: list[str]
    columns: list[str]
    errors: dict[str, dict[str, float]]
    by_round: "RoundTable | None" = field(default=None, repr=False)  # records of several rounds: error per round

    def mean(self, method: str) -> float:
        return mean_error(self.errors[method][c] for c in self.columns if c in self.errors[method])

    def complete(self, method: str) -> bool:
        return all(c in self.errors[method] for c in self.columns)

    def to_markdown(self, title: str | None = None) -> str:
        header = ["method", *self.columns, "mean"]
        lines = [f"**{title}**\n" if title else "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for m in self.methods:
            cells = [f"{100 * self.errors[m][c]:.1f}" if c in self.errors[m] else "–" for c in self.columns]
            mean = f"{100 * self.mean(m):.1f}" + ("" if self.complete(m) else "*")
            lines.append("| " + " | ".join([m, *cells, mean]) + " |")
        lines.append("")
        lines.append("Error in % (lower is better)" + ("; * = mean over the finished columns only."
                                                        if not all(self.complete(m) for m in self.methods) else "."))
        return "\n".join(line for line in lines if line is not None) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["method", *self.columns, "mean"])
        for m in self.methods:
            writer.writerow([m, *[f"{self.errors[m].get(c, float('nan')):.6f}" for c in self.columns],
                             f"{self.mean(m):.6f}"])
        return out.getvalue()


@dataclass
class RoundTable:
    """errors[method][round]: the mean error over the domains of that round (0-based) that the method finished;
    ``finished[method][round]``: how many of them; ``per_round``: the domains in a round."""

    protocol: str
    methods: list[str]
    rounds: list[int]
    per_round: int
    errors: dict[str, dict[int, float]]
    finished: dict[str, dict[int, int]]

    def complete(self, method: str, round_index: int) -> bool:
        return self.finished[method].get(round_index, 0) == self.per_round

    def change(self, method: str) -> float | None:
        """The last complete round's mean minus the first round's (> 0: worse by the end); None without both."""
        done = [r for r in self.rounds if self.complete(method, r)]
        if not done or done[0] != self.rounds[0] or len(done) < 2:
            return None
        return self.errors[method][done[-1]] - self.errors[method][done[0]]

    def to_markdown(self, title: str | None = None) -> str:
        header = ["method", *[f"round {r}" for r in self.rounds], "last − first"]
        lines = [f"**{title}**\n" if title else "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        partial = False
        for m in self.methods:
            cells = []
            for r in self.rounds:
                if r not in self.errors[m]:
                    cells.append("–")
                    continue
                partial |= not self.complete(m, r)
                cells.append(f"{100 * self.errors[m][r]:.1f}" + ("" if self.complete(m, r) else "*"))
            change = self.change(m)
            lines.append("| " + " | ".join([m, *cells, "–" if change is None else f"{100 * change:+.1f}"]) + " |")
        lines.append("")
        lines.append(f"Error in % (lower is better), mean over each round's {self.per_round} domains; last − first: "
                     "the last complete round minus round 0 (> 0: worse by the end of the stream)"
                     + ("; * = mean over the round's finished domains only." if partial else "."))
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["method", "round", "error", "domains_finished", "domains_per_round"])
        for m in self.methods:
            for r in self.rounds:
                if r in self.errors[m]:
                    writer.writerow([m, r, f"{self.errors[m][r]:.6f}", self.finished[m][r], self.per_round])
        return out.getvalue()


def round_table(records: Sequence[dict[str, Any]], protocol: str | None = None) -> RoundTable | None:
    """The error per round of one protocol (the first one in the records when not given); None when its records
    all come from round 0 (a one-round stream, or a long one whose first round is still running). A record
    without a ``round`` (written before rounds existed) is round 0."""
    if not records:
        raise ValueError("no records to report")
    protocol = protocol or records[0].get("protocol", "")
    chosen = [r for r in records if r.get("protocol", "") == protocol]
    if not any(r.get("round", 0) for r in chosen):
        return None
    segments: dict[int, set[int]] = {}
    values: dict[str, dict[int, list[float]]] = {}
    for r in chosen:
        segments.setdefault(r.get("round", 0), set()).add(r["segment"])
        values.setdefault(r["method"], {}).setdefault(r.get("round", 0), []).append(r["error"])
    return RoundTable(protocol=protocol, methods=sorted(values, key=_method_order), rounds=sorted(segments),
                      per_round=max(len(s) for s in segments.values()),
                      errors={m: {k: mean_error(v) for k, v in by.items()} for m, by in values.items()},
                      finished={m: {k: len(v) for k, v in by.items()} for m, by in values.items()})


def _column(record: dict[str, Any]) -> str:
    return record.get("domain") or str(record.get("corruption"))


def error_table(records: Sequence[dict[str, Any]], protocol: str | None = None) -> ErrorTable:
    """The table of one protocol (the first one in the records when not given)."""
    if not records:
        raise ValueError("no records to report")
    protocol = protocol or records[0].get("protocol", "")
    chosen = [r for r in records if r.get("protocol", "") == protocol]
    methods: list[str] = []
    columns: dict[int, str] = {}
    errors: dict[str, dict[str, float]] = {}
    for r in chosen:
        if r["method"] not in errors:
            methods.append(r["method"])
            errors[r["method"]] = {}
        name = _column(r)
        if r["segment"] in columns and columns[r["segment"]] != name:
            raise ValueError(f"segment {r['segment']} is {columns[r['segment']]!r} and {name!r} in one results file")
        columns[r["segment"]] = name
        errors[r["method"]][name] = r["error"]
    ordered = [columns[s] for s in sorted(columns)]
    if len(set(ordered)) != len(ordered):
        raise ValueError("segment names repeat within one protocol; streams name repeated segments uniquely")
    return ErrorTable(protocol=protocol, methods=sorted(methods, key=_method_order), columns=ordered, errors=errors,
                      by_round=round_table(chosen, protocol))


def _method_order(label: str) -> tuple[int, str, bool]:
    """Registry order (source, norm, ...), a '<method>+guard' row right after its method, unknown labels last:
    tables look the same however a resumed run happened to finish its rows."""
    import tta

    base, _, suffix = label.partition("+")
    registered = tta.methods()
    return (registered.index(base) if base in registered else len(registered), base, bool(suffix))


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend (the ``plots`` extra)."""
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_errors(table: ErrorTable, path: str | os.PathLike, title: str | None = None) -> Path:
    """Grouped bars: error per domain (x) per method (colour), with the mean as the last group."""
    plt = pyplot()
    import numpy as np

    columns = [*table.columns, "mean"]
    width = 0.8 / max(len(table.methods), 1)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 1.5 + 0.75 * len(columns))), 4.8))
    x = np.arange(len(columns))
    for i, m in enumerate(table.methods):
        values = [100 * table.errors[m].get(c, np.nan) for c in table.columns] + [100 * table.mean(m)]
        ax.bar(x + (i - (len(table.methods) - 1) / 2) * width, values, width, label=m)
    ax.set_xticks(x, [c.replace("_", " ") for c in columns], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(table.methods), 6))
    ax.set_title(title or f"error per domain ({table.protocol})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_online_error(records: Sequence[dict[str, Any]], path: str | os.PathLike, protocol: str | None = None) -> Path:
    """The online (cumulative) error of each method through the stream, segment after segment."""
    plt = pyplot()

    table = error_table(records, protocol)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for m in table.methods:
        curve: list[float] = []
        for r in sorted((r for r in records if r["method"] == m and r.get("protocol") == table.protocol),
                        key=lambda r: r["segment"]):
            curve += [100 * v for v in r.get("online_error", [])]
        ax.plot(range(1, len(curve) + 1), curve, label=m)
    ax.set_xlabel("batch (segments in order; the curve restarts at each segment)")
    ax.set_ylabel("cumulative error in segment (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rounds(table: RoundTable, path: str | os.PathLike, title: str | None = None) -> Path:
    """Error against round, one line per method (its complete rounds only: a partial round's mean is over other
    domains than the others')."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 2.0 + 0.5 * len(table.rounds))), 4.2))
    for m in table.methods:
        done = [r for r in table.rounds if table.complete(m, r)]
        ax.plot(done, [100 * table.errors[m][r] for r in done], marker="o", label=m)
    ax.set_xticks(table.rounds)
    ax.set_xlabel(f"round (each the mean over its {table.per_round} domains)")
    ax.set_ylabel("error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(table.methods), 6))
    ax.set_title(title or f"error per round ({table.protocol})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(records: Sequence[dict[str, Any]], out_dir: str | os.PathLike, title: str | None = None
                 ) -> dict[str, ErrorTable]:
    """results.md / results_<protocol>.csv / errors_<protocol>.png / online_<protocol>.png for every protocol (the
    plots only where matplotlib is installed; else one line on stderr says how to get them); for a protocol with
    records of several rounds also the "error per round" table in results.md, results_<protocol>_rounds.csv and
    rounds_<protocol>.png."""
    out = Path(out_dir)
    plots = installed("matplotlib")
    if not plots:
        print(f"plots skipped: {missing_message('matplotlib', 'plotting')}", file=sys.stderr)
    protocols = list(dict.fromkeys(r.get("protocol", "") for r in records))
    tables = {}
    markdown = [f"# {title}\n" if title else ""]
    for protocol in protocols:
        table = error_table(records, protocol)
        tables[protocol] = table
        markdown.append(table.to_markdown(title=f"protocol: {protocol}"))
        (out / f"results_{protocol}.csv").write_text(table.to_csv())
        if plots:
            plot_errors(table, out / f"errors_{protocol}.png", title=f"{title or ''} {protocol}".strip())
            plot_online_error(records, out / f"online_{protocol}.png", protocol)
        if table.by_round is not None:
            markdown.append(table.by_round.to_markdown(title=f"error per round (protocol: {protocol})"))
            (out / f"results_{protocol}_rounds.csv").write_text(table.by_round.to_csv())
            if plots:
                plot_rounds(table.by_round, out / f"rounds_{protocol}.png",
                            title=f"{title or ''} {protocol}: error per round".strip())
    (out / "results.md").write_text("\n".join(markdown))
    return tables
