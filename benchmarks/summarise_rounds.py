"""Mean error per round of a multi-round continual run (``--rounds N``), per method, over the corruptions each round
has finished (a round in progress is marked *): whether a method degrades over a long stream.

    .venv/bin/python benchmarks/summarise_rounds.py resnet20-n10000-continual-rounds10
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(run: str, root: Path = Path("results/cifar10")) -> str:
    errors: dict[str, dict[int, list[float]]] = {}
    for folder in sorted(root.glob(run + "*")):
        for line in open(folder / "results.jsonl"):
            record = json.loads(line)
            if record.get("kind") == "summary" or "round" not in record:
                continue
            errors.setdefault(record["method"], {}).setdefault(record["round"], []).append(record["error"])
    full = max(len(values) for rounds in errors.values() for values in rounds.values())
    rounds = sorted({r for by_round in errors.values() for r in by_round})
    lines = ["| method | " + " | ".join(f"round {r + 1}" for r in rounds) + " |",
             "|---|" + "---:|" * len(rounds)]
    for method, by_round in errors.items():
        cells = []
        for r in rounds:
            values = by_round.get(r, [])
            mark = "" if len(values) == full else f"* ({len(values)}/{full})"
            cells.append(f"{100 * sum(values) / len(values):.1f}{mark}" if values else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
