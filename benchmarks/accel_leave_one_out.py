"""Leave-one-out measurement of the CPU fast path (tta.accel): what each piece buys, with the others on.

For each batch size, `tta bench` runs once with every piece on, once with each piece off (``--accel-without``) and
once with none (``--no-accel``), in alternating rounds so that a drift of the machine's load hits every setting
alike. Reported per method and setting: median ms per batch (the median over rounds of each run's median), paired
ratio to plain inference, peak RSS and peak tensor MB; and what each piece buys = (value without it) / (value with
everything on) - 1. A piece earns its place by at least 5 % in time or in peak memory on some method at batch 64
or 200 (issue 19).

    .venv/bin/python benchmarks/accel_leave_one_out.py --out results/bench/accel-leave-one-out [--rounds 2]

Resumable: a finished bench run (its bench.json) is not repeated. Writes summary.md beside the runs; the runs of
pieces removed since (``REMOVED_PIECES``) are summarised where the folder has them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PIECES = ("kernels", "batch_norm", "lean_graph", "tensor_cache")
#: Pieces measured here and then removed from tta.accel (malloc: glibc's mallopt settings): their runs are never
#: started again, but those in the output folder are summarised, as the measurement behind the removal.
REMOVED_PIECES = ("malloc",)
METHODS = "norm,tent,core,shot_im,tent_ref"


def settings(pieces: tuple[str, ...] = PIECES) -> list[tuple[str, list[str]]]:
    """(name, tta bench flags) of every setting: all on, each of ``pieces`` off, all off."""
    return ([("all on", [])] + [(f"without {p}", ["--accel-without", p]) for p in pieces]
            + [("all off", ["--no-accel"])])


def folder_of(out: Path, batch: int, name: str, round_: int) -> Path:
    return out / f"b{batch}" / name.replace(" ", "-") / f"round{round_}"


def run(out: Path, batch: int, name: str, flags: list[str], round_: int, repeats: int) -> dict:
    folder = folder_of(out, batch, name, round_)
    result = folder / "bench.json"
    if not result.is_file():
        command = [str(Path(sys.executable).with_name("tta")), "bench", "--threads", "1", "--methods", METHODS,
                   "--batch-size", str(batch), "--repeats", str(repeats), "--out", str(folder), *flags]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def summarise(runs: dict[tuple[int, str], list[dict]]) -> str:
    lines = []
    for batch in sorted({b for b, _ in runs}):
        base = {r["method"]: r for r in _merged(runs[(batch, "all on")])}
        lines += [f"## batch {batch}", "",
                  "| setting | method | ms/batch | x plain (paired) | peak MB | tensor MB | time bought | RSS bought "
                  "| tensors bought |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, _ in settings(PIECES + REMOVED_PIECES):
            if (batch, name) not in runs:
                continue
            for r in _merged(runs[(batch, name)]):
                b = base[r["method"]]
                lines.append(
                    f"| {name} | {r['method']} | {r['ms']:.1f} | {r['paired']:.2f} | {r['rss']:.1f} | {r['tensor']:.1f} | "
                    f"{_gain(r['ms'], b['ms'])} | {_gain(r['rss'], b['rss'])} | {_gain(r['tensor'], b['tensor'])} |")
        lines.append("")
    return "\n".join(lines)


def _gain(without: float, with_: float) -> str:
    return "-" if not with_ else f"{100 * (without / with_ - 1):+.1f} %"


def _merged(rounds: list[dict]) -> list[dict]:
    """Per method, the median over rounds of each run's figures."""
    methods = [r["method"] for r in rounds[0]["records"]]
    merged = []
    for method in methods:
        rs = [next(r for r in run["records"] if r["method"] == method) for run in rounds]
        merged.append({"method": method,
                       "ms": statistics.median(r["ms_per_batch"] for r in rs),
                       "paired": statistics.median((r.get("ratio_paired") or 1.0) for r in rs),
                       "rss": statistics.median(r["peak_memory_mb"] or 0.0 for r in rs),
                       "tensor": statistics.median(r.get("peak_tensor_mb") or 0.0 for r in rs)})
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="64,200")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    runs: dict[tuple[int, str], list[dict]] = {}
    for round_ in range(args.rounds):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            order = settings() if round_ % 2 == 0 else settings()[::-1]
            for name, flags in order:
                runs.setdefault((batch, name), []).append(run(args.out, batch, name, flags, round_, args.repeats))
            for piece in REMOVED_PIECES:
                result = folder_of(args.out, batch, f"without {piece}", round_) / "bench.json"
                if result.is_file():
                    runs.setdefault((batch, f"without {piece}"), []).append(json.loads(result.read_text()))
    summary = summarise(runs)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
