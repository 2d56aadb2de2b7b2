"""The summary table of docs/results.md's full-size section: each method's mean error over the corruptions it has
finished (runs in progress marked *), beside source, norm and tent on the same corruptions, and its median
images/s. Reads results/cifar10/<run>*/ (a run and its .<part> folders, e.g. methods run in a second process).

    .venv/bin/python benchmarks/summarise_reset.py resnet20-n10000-reset
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import tta

BASELINES = ("source", "norm", "tent")


def summary(run: str, root: Path = Path("results/cifar10")) -> str:
    errors: dict[str, dict[str, float]] = {}
    speeds: dict[str, list[float]] = {}
    for folder in sorted(root.glob(run + "*")):
        for line in open(folder / "results.jsonl"):
            record = json.loads(line)
            errors.setdefault(record["method"], {})[record["corruption"]] = record["error"]
        for line in open(folder / "timings.jsonl"):
            timing = json.loads(line)
            speeds.setdefault(timing["method"], []).append(timing["images_per_s"])
    total = len(errors["source"])
    lines = ["| method | mean error (%) | corruptions done | source / norm / tent on those (%) | images/s |",
             "|---|---:|---:|---:|---:|"]
    for method in (m for m in tta.methods() if m in errors):
        done = list(errors[method])
        mean = 100 * statistics.mean(errors[method].values())
        beside = " / ".join(f"{100 * statistics.mean(errors[b][c] for c in done):.1f}" for b in BASELINES)
        mark = "" if len(done) == total else "*"
        lines.append(f"| {method} | {mean:.1f}{mark} | {len(done)}/{total} | {beside} | "
                     f"{statistics.median(speeds[method]):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1] if len(sys.argv) > 1 else "resnet20-n10000-reset"))
