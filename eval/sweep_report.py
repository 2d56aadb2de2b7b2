"""The report of a sweep: the tables and plots ``tta corruption`` writes, with each value a mean over seeds.

Records are grouped into tables by (model, data, severity, protocol, batch size); in a table, a row is a method
with the options its cell set (``tent[lr=0.0001]``), a column a domain of the stream, and a value the mean error
over the seeds that finished it, shown with its spread: the sample standard deviation over seeds (``± –`` with
one seed). The last column is the mean over domains, its spread the standard deviation of the seeds' means.
Files: ``results.md`` (every table), ``results_<table>.csv`` (mean and std columns), ``errors_<table>.png`` (the
means, drawn by :func:`eval.report.plot_errors`). Continual cells get one more table (``results_continual.csv``,
:class:`eval.sweep_continual.ContinualTable`): per benchmark, method, norm and buffer, the final average accuracy,
average incremental accuracy and forgetting over the seeds.
"""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any, Sequence

from eval.records import write_text_atomic
from eval.report import ErrorTable, plot_errors
from eval.sweep import method_label, sort_key


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _group_name(axes: dict[str, Any]) -> str:
    severity = f"@{axes['severity']}" if axes["severity"] is not None else ""
    return f"{axes['model']} on {axes['data']}{severity}, {axes['protocol']}, batch {axes['batch_size']}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


class SeedTable:
    """One table of a sweep: per row and column, the errors of each seed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: list[str] = []
        self.columns: dict[int, str] = {}
        self.errors: dict[str, dict[int, dict[str, float]]] = {}  # row -> seed -> column -> error

    def add(self, row: str, seed: int, record: dict[str, Any]) -> None:
        if row not in self.errors:
            self.rows.append(row)
            self.errors[row] = {}
        column = record.get("domain") or str(record.get("corruption"))
        self.columns[record["segment"]] = column
        self.errors[row].setdefault(seed, {})[column] = record["error"]

    def ordered_columns(self) -> list[str]:
        return [self.columns[s] for s in sorted(self.columns)]

    def values(self, row: str, column: str | None) -> list[float]:
        """Per seed: the error in ``column``, or (None) the mean over the columns of seeds that finished all."""
        columns = self.ordered_columns()
        if column is not None:
            return [errors[column] for errors in self.errors[row].values() if column in errors]
        return [sum(errors[c] for c in columns) / len(columns) for errors in self.errors[row].values()
                if all(c in errors for c in columns)]

    def mean_table(self) -> ErrorTable:
        columns = self.ordered_columns()
        errors = {row: {c: statistics.fmean(v) for c in columns if (v := self.values(row, c))} for row in self.rows}
        return ErrorTable(protocol=self.name, methods=list(self.rows), columns=columns, errors=errors)

    def to_markdown(self) -> str:
        columns = self.ordered_columns()
        header = ["method", *columns, "mean"]
        lines = [f"**{self.name}** (seeds: {self.seed_count()})", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for row in self.rows:
            cells = [_cell(self.values(row, c)) for c in [*columns, None]]
            lines.append("| " + " | ".join([row, *cells]) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        columns = self.ordered_columns()
        writer.writerow(["method", "seeds", *[f"{c}{s}" for c in [*columns, "mean"] for s in ("", "_std")]])
        for row in self.rows:
            values = []
            for c in [*columns, None]:
                v = self.values(row, c)
                std = _std(v)
                values += [f"{statistics.fmean(v):.6f}" if v else "", "" if std is None else f"{std:.6f}"]
            writer.writerow([row, len(self.errors[row]), *values])
        return out.getvalue()

    def seed_count(self) -> str:
        counts = sorted({len(seeds) for seeds in self.errors.values()})
        return "/".join(str(c) for c in counts)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    std = _std(values)
    return f"{100 * statistics.fmean(values):.1f} ± " + ("–" if std is None else f"{100 * std:.1f}")


def sweep_tables(records: Sequence[dict[str, Any]]) -> list[SeedTable]:
    """The tables of a sweep's records, in cell order."""
    tables: dict[str, SeedTable] = {}
    for record in sorted(records, key=lambda r: sort_key(r["sweep"])):
        axes = record["sweep"]
        if axes.get("kind") == "continual":
            continue
        name = _group_name(axes)
        table = tables.setdefault(name, SeedTable(name))
        table.add(method_label(record["method"], axes["options"]), axes["seed"], record)
    return list(tables.values())


def write_sweep_report(records: Sequence[dict[str, Any]], out: str | Path, title: str = "sweep",
                       preamble: str = "") -> list[Any]:
    """Write results.md, results_<table>.csv and errors_<table>.png into ``out``; returns the tables (the
    continual table last, when there are continual records).
    ``preamble``: Markdown put in results.md before the tables (``tta select``'s selected hyper-parameters)."""
    from eval.sweep_continual import ContinualTable

    out = Path(out)
    tables = sweep_tables(records)
    continual = ContinualTable([r for r in records if r["sweep"].get("kind") == "continual"])
    markdown = [f"# {title}\n", *([preamble] if preamble else [])]
    if tables:
        markdown.append("Error in % (lower is better): mean over seeds ± sample standard deviation "
                        "(– with one seed); the last column is the mean over domains.\n")
    for table in tables:
        markdown.append(table.to_markdown())
        slug = _slug(table.name)
        write_text_atomic(out / f"results_{slug}.csv", table.to_csv())
        plot_errors(table.mean_table(), out / f"errors_{slug}.png", title=f"{table.name} (mean over seeds)")
    if continual.rows:
        markdown.append(continual.to_markdown())
        markdown.append("Continual: mean over seeds ± sample standard deviation (no spread with one seed).\n")
        write_text_atomic(out / "results_continual.csv", continual.to_csv())
    write_text_atomic(out / "results.md", "\n".join(markdown))
    return [*tables, *([continual] if continual.rows else [])]
