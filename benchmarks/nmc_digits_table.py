"""The tables of the NMC split-digits study (``benchmarks/nmc_digits.py``), rebuilt from its run folders.

Usage: PYTHONPATH=. python benchmarks/nmc_digits_table.py [DIR]   (default results/continual/nmc-digits)
Writes DIR/summary.md and prints it: per split and method, the four metrics as mean ± sample std over seeds, the
run time per seed (pre-training + training + evaluation, from timings.jsonl: process start-up and data loading not
included), then the accuracy on each task after the last one and just after learning it. Every run's report is
rebuilt from its results.jsonl first, so the tables never lag behind the records.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual.config import ContinualConfig  # noqa: E402
from continual.metrics import mean_std  # noqa: E402
from continual.report import METRIC_LABELS, mean_and_spread, write_report  # noqa: E402
from continual.runner import build_seed_stream  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "continual" / "nmc-digits"
LABELS = {"nmc": "NMC", "linear_probe": "linear probe (upper bound)", "sgd": "fine-tuning, online (lower bound)"}


def seconds_per_seed(run: Path) -> dict[int, float]:
    """Pre-training + training + evaluation seconds of each seed, from timings.jsonl (the last entry per step)."""
    steps: dict[tuple[int, Any], float] = {}
    for line in (run / "timings.jsonl").read_text().splitlines():
        t = json.loads(line)
        key = (t["seed"], t.get("experience", "pretrain"))
        steps[key] = t.get("pretrain_seconds", 0.0) + t.get("train_seconds", 0.0) + t.get("eval_seconds", 0.0)
    out: dict[int, float] = {}
    for (seed, _), seconds in steps.items():
        out[seed] = out.get(seed, 0.0) + seconds
    return out


def _spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")


def _runs(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    runs = sorted((p for p in root.iterdir() if (p / "results.jsonl").exists()),
                  key=lambda p: (-int(p.name.split("-")[0][1:]), list(LABELS).index(p.name.split("-", 1)[1])))
    return [(run, write_report(run)) for run in runs]


def write_table(root: Path = OUT) -> str:
    """Build the study's Markdown tables from ``root``'s run folders, write ``root/summary.md``, return the text."""
    runs = [(run, s) for run, s in _runs(Path(root)) if "metrics" in s]
    lines = ["| backbone trained on (images) | learned incrementally (tasks) | method | seeds | "
             + " | ".join(METRIC_LABELS.values()) + " | run time per seed (s) |",
             "|---|---|---|---|" + "---|" * len(METRIC_LABELS) + "---|"]
    details, fingerprints = [], {}
    for run, s in runs:
        config, seeds = s["config"], s["seeds"]
        backbone = s["backbone"][str(seeds[0])]
        stream = build_seed_stream(ContinualConfig.from_dict(config), seeds[0])
        trained = (f"digits {', '.join(backbone['trained_on_class_names'])} ({backbone['n_images']} train; "
                   f"{_spread([s['backbone'][str(x)]['test_accuracy_on_trained_classes'] for x in seeds])} % on "
                   f"their {backbone['n_test_images']} test)")
        learned = (f"digits {', '.join(backbone['incremental_class_names'])} ({stream.n_train} train, "
                   f"{stream.n_test} test; {'+'.join(map(str, stream.task_sizes))} classes)")
        times = seconds_per_seed(run)
        cells = [trained, learned, LABELS[config["method"]], str(len(seeds))]
        cells += [mean_and_spread(s["metrics"][m]) for m in METRIC_LABELS]
        cells.append(_spread([times[x] for x in seeds], 1.0))
        lines.append("| " + " | ".join(cells) + " |")
        for x in seeds:
            fingerprints.setdefault((config["pretrain_classes"], x), set()).add(s["backbone"][str(x)]["fingerprint"])
        R = np.array(s["accuracy_matrix_mean"])
        final = " / ".join(f"{100 * v:.1f}" for v in R[-1])
        diagonal = " / ".join(f"{100 * R[i, i]:.1f}" for i in range(len(R)))
        details.append(f"| {', '.join(backbone['trained_on_class_names'])} | {LABELS[config['method']]} | "
                       f"{final} | {diagonal} |")
    shared = all(len(f) == 1 for f in fingerprints.values())
    text = "\n".join(lines) + "\n\n" + (
        "One backbone per (split, seed), shared by the three methods (equal fingerprints in their backbone "
        "records).\n" if shared else "WARNING: the methods of a (split, seed) did not share one backbone.\n")
    text += ("\nAccuracy (%) on each task, mean over seeds: after the last task / just after learning it\n\n"
             "| backbone trained on | method | after the last task (task 0 / 1 / ...) | just after learning it |\n"
             "|---|---|---|---|\n" + "\n".join(details) + "\n")
    (Path(root) / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    print(write_table(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
