"""Where each method's time goes: torch.profiler self time per operator, per batch, for the rows of ``tta bench``.

    python benchmarks/profile_methods.py --weights ../shared/data/models/akamaster-resnet-cifar10/resnet20-12fca82f.th \
        --methods plain,norm,alpha_bn,tent,core,cafa --threads 1 --batches 3 --top 12

The rows are built exactly as ``tta bench`` builds them (``eval.bench.build_row``), so the profile is of what the
benchmark times. Prints, per row, the top operators by self CPU time (ms per batch and share of the row's total);
``--out FILE`` writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from eval.bench import BenchConfig, build_model, build_row, make_inputs, random_source_options, row_names


def profile_row(name: str, config: BenchConfig, batches: int, warmup: int) -> list[dict]:
    """Self CPU time per operator (ms per batch), largest first, for one row on a fresh copy of the model."""
    model, _ = build_model(config)
    row = build_row(name, model, config, random_source_options(name, model, config))
    inputs = make_inputs(config)
    for i in range(warmup):
        row.call(inputs[i % len(inputs)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(batches):
            row.call(inputs[i % len(inputs)])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "ms_per_batch": e.self_cpu_time_total / 1e3 / batches,
            "share": e.self_cpu_time_total / total, "calls_per_batch": e.count / batches} for e in events]
    return sorted(ops, key=lambda o: -o["ms_per_batch"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--methods", default="plain,norm,alpha_bn,tent,core,cafa")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = BenchConfig(model=args.model, weights=args.weights, batch_size=args.batch_size, threads=args.threads)
    names = [n for n in row_names([m for m in args.methods.split(",") if m != "plain"])]
    result = {}
    for name in names:
        ops = profile_row(name, config, args.batches, args.warmup)
        result[name] = ops
        total = sum(o["ms_per_batch"] for o in ops)
        print(f"\n{name}: {total:.1f} ms per batch (profiled self time)")
        for o in ops[:args.top]:
            print(f"  {o['ms_per_batch']:8.2f} ms {100 * o['share']:5.1f} %  x{o['calls_per_batch']:<5g} {o['op']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
