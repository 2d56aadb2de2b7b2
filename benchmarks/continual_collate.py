"""Collect the summaries of the continual evidence runs into Markdown tables (pasted into docs/continual.md).

Usage: python benchmarks/continual_collate.py runs/continual-evidence
Every run folder's report is rebuilt from its results.jsonl first, so the tables never lag behind the records.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual.report import METRIC_LABELS, mean_and_spread, write_report  # noqa: E402


def main(root: str) -> int:
    runs = sorted(p for p in Path(root).iterdir() if (p / "results.jsonl").exists())
    summaries = {run.name: write_report(run) for run in runs}
    complete = {k: v for k, v in summaries.items() if "metrics" in v}
    print("| run | benchmark | method | norm | seeds | " + " | ".join(METRIC_LABELS.values()) + " |")
    print("|---|---|---|---|---|" + "---|" * len(METRIC_LABELS))
    for name, s in complete.items():
        c = s["config"]
        cells = [name, c["benchmark"], c["method"], c["norm"], str(len(s["seeds"]))]
        cells += [mean_and_spread(s["metrics"][m]) for m in METRIC_LABELS]
        print("| " + " | ".join(cells) + " |")
    plasticity = {k: v for k, v in complete.items() if v["config"]["benchmark"] == "random-labels"}
    if plasticity:
        names = list(plasticity)
        print("\nPer-task accuracy on the newest task (%) / total weight norm, mean over seeds:\n")
        print("| task | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        rows = max(len(v["per_experience"]) for v in plasticity.values())
        for i in range(rows):
            cells = []
            for name in names:
                entry = plasticity[name]["per_experience"][i]
                cells.append(f"{100 * entry['accuracy_on_this_task']:.1f} / {entry.get('weight_norm_total', 0):.1f}")
            print(f"| {i} | " + " | ".join(cells) + " |")
    for name, s in summaries.items():
        if "metrics" not in s:
            print(f"\n{name}: no complete seed yet (incomplete: {s['incomplete_seeds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/continual-evidence"))
