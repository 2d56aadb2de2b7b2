"""NMC class-incremental for real on split-digits, beside its bounds (issue #22), with one command, resumably.

For each split, the small CNN (width 32, BatchNorm, 32 x 32 digits) is pre-trained on the training images of the
first K digits only (natural class order), then the other digits arrive as tasks of 2 classes (the last one of 1
when 10 - K is odd) and three methods learn them on that same backbone (same seed, same fingerprint):

* ``nmc``: frozen backbone, streaming class means (``tta continual --method nmc``);
* ``linear_probe``: frozen backbone, softmax layer refitted on all features seen so far: the upper bound;
* ``sgd``: the backbone fine-tuned with a fresh head, online (batch 10, one pass, lr 0.03): the lower bound.

Splits: K = 5 (pre-train on 0-4, learn 5-9 as tasks of 2, 2, 1) and K = 2 (pre-train on 0-1, learn 2-9 as four
tasks of 2): how the backbone's breadth matters. Seeds 0, 1, 2; every image of the embedded digits (1437 training,
360 test). Each run is ``continual.runner.run_experiment`` (what ``tta continual`` runs) into
``results/continual/nmc-digits/k<K>-<method>/``; rerunning skips finished seeds and resumes unfinished ones. The
table (``summary.md`` there) is rebuilt by ``benchmarks/nmc_digits_table.py`` at the end.

Usage: PYTHONPATH=. python benchmarks/nmc_digits.py [--out DIR] [--splits 5,2] [--methods nmc,linear_probe,sgd]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual.config import ContinualConfig  # noqa: E402
from continual.runner import run_experiment  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "continual" / "nmc-digits"
METHODS = ("nmc", "linear_probe", "sgd")
SEEDS = [0, 1, 2]


def config_for(k: int, method: str) -> ContinualConfig:
    """The run of one (split, method): everything at the CLI's defaults except the method and the held-out K."""
    return ContinualConfig(benchmark="split-digits", method=method, pretrain_classes=k, seeds=list(SEEDS), threads=1)


def command_for(k: int, method: str, out: Path) -> str:
    """The equivalent ``tta continual`` command line (what the docs print beside the table)."""
    return (f"tta continual --method {method} --pretrain-classes {k} --seeds {','.join(map(str, SEEDS))} "
            f"--threads 1 --out {out}")


def _commit() -> str:
    """The repository's HEAD commit (what code produced the run), or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--splits", default="5,2", help="comma-separated K (classes the backbone is trained on)")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for k in [int(s) for s in args.splits.split(",")]:
        for method in args.methods.split(","):
            run = args.out / f"k{k}-{method}"
            print(f"{run.name}: {command_for(k, method, run)}", flush=True)
            t0 = time.perf_counter()
            run_experiment(config_for(k, method), run, progress=False)
            with open(args.out / "runs.jsonl", "a") as log:  # wall time of each invocation (a resume is shorter)
                log.write(json.dumps({"run": run.name, "finished": datetime.now(timezone.utc).isoformat(
                    timespec="seconds"), "wall_seconds": round(time.perf_counter() - t0, 1), "commit": _commit()})
                          + "\n")
    from nmc_digits_table import write_table  # beside this script

    print(write_table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
