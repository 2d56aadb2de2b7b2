"""Collate results/cifar10/<model>-n<N>-<protocol>/results.jsonl (written by benchmarks/results_cifar10.sh) into the
Markdown tables of docs/results.md: a summary of mean errors per protocol, then one full table per run.

    .venv/bin/python benchmarks/collate_results.py results/cifar10 > /tmp/tables.md
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from eval.records import ResultsLog
from eval.report import error_table

ORDER = ["reset", "continual", "gradual", "mixed", "correlated", "correlated-continual"]


def split_name(name: str) -> tuple[str, str]:
    """'resnet20-n2000-correlated-continual' -> ('resnet20-n2000', 'correlated-continual')."""
    match = re.fullmatch(r"(.*-n\d+)-(.+)", name)
    if not match:
        raise ValueError(f"run folder {name!r} is not named <model>-n<N>-<protocol>")
    return match.group(1), match.group(2)


def run_records(root: str) -> dict[str, list[dict]]:
    """Records per run name. A folder ``<model>-n<N>-<protocol>.<part>`` (e.g. ``.multipass``: methods run in a
    second process beside the first, on the same stream settings) adds its records to ``<model>-n<N>-<protocol>``."""
    records: dict[str, list[dict]] = {}
    for run in sorted(p for p in Path(root).iterdir() if (p / "results.jsonl").exists()):
        records.setdefault(run.name.split(".", 1)[0], []).extend(ResultsLog(run / "results.jsonl").read())
    return records


def main(root: str = "results/cifar10") -> None:
    tables = {name: error_table(records) for name, records in run_records(root).items()}
    models = sorted({split_name(name)[0] for name in tables})
    for model in models:
        found = [split_name(name)[1] for name in tables if split_name(name)[0] == model]
        protocols = sorted(found, key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
        methods = list(dict.fromkeys(m for p in protocols for m in tables[f"{model}-{p}"].methods))
        print(f"### {model}: mean error over the 15 corruptions (%)\n")
        print("| method | " + " | ".join(protocols) + " |")
        print("|---|" + "---:|" * len(protocols))
        for method in methods:
            cells = []
            for p in protocols:
                table = tables[f"{model}-{p}"]
                if method not in table.methods:
                    cells.append("–")
                else:
                    cells.append(f"{100 * table.mean(method):.1f}" + ("" if table.complete(method) else "*"))
            print(f"| {method} | " + " | ".join(cells) + " |")
        print()
        guard_summary(root, model, protocols)
        for p in protocols:
            print(tables[f"{model}-{p}"].to_markdown(title=f"{model}, protocol {p}"))
            print()
            if tables[f"{model}-{p}"].by_round is not None:  # a long stream (--rounds): its error per round
                print(tables[f"{model}-{p}"].by_round.to_markdown(title=f"{model}, protocol {p}: error per round"))
                print()


def guard_summary(root: str, model: str, protocols: list[str]) -> None:
    """For runs with --collapse-guard: each method's mean error without and with the guard, and how many times
    the guard reset it (summed over segments that start from a reset; the running count in a continual chain)."""
    rows: dict[str, dict[str, str]] = {}
    for p in protocols:
        records = run_records(root)[f"{model}-{p}"]
        if not any("guard_resets" in r for r in records):
            continue
        table = error_table(records)
        for method in table.methods:
            if method.endswith("+guard") or f"{method}+guard" not in table.methods:
                continue
            guarded = [r for r in records if r["method"] == f"{method}+guard"]
            chained = [r for r in guarded if not r.get("reset_before", True)]
            resets = max((r["guard_resets"] for r in guarded), default=0) if chained else \
                sum(r["guard_resets"] for r in guarded)
            rows.setdefault(method, {})[p] = (f"{100 * table.mean(method):.1f} | "
                                              f"{100 * table.mean(method + '+guard'):.1f} | {resets}")
    if not rows:
        return
    used = [p for p in protocols if any(p in by_p for by_p in rows.values())]
    print(f"### {model}: collapse guard, mean error without | with the guard | guard resets\n")
    print("| method | " + " | ".join(f"{p}: without | with | resets" for p in used) + " |")
    print("|---|" + "---:|---:|---:|" * len(used))
    for method, by_p in rows.items():
        print(f"| {method} | " + " | ".join(by_p.get(p, "– | – | –") for p in used) + " |")
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
