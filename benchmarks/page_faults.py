"""Minor page faults and CPU time per batch of each ``tta bench`` row, on the CPU fast path as the ``tta`` commands
set it.

    python benchmarks/page_faults.py --weights ../shared/data/models/akamaster-resnet-cifar10/resnet20-12fca82f.th
    python benchmarks/page_faults.py --weights ... --accel-without tensor_cache   # every tensor from glibc's malloc

A page fault here is the kernel handing the process a fresh zeroed page: memory the allocator returned to the
system and the next batch touched again. Rows are built as ``tta bench`` builds them; faults are counted with
``getrusage`` over ``--batches`` batches after ``--warmup``.
"""
from __future__ import annotations

import argparse
import json
import mmap
import resource
import time

import torch

from eval.bench import BenchConfig, build_model, build_row, make_inputs, random_source_options, row_names
from eval.cli import accel_pieces, add_accel_arguments
import tta
from tta.accel.allocator import settings as tensor_cache_settings


def fault_cost_ms_per_100mb(repeats: int = 5) -> tuple[float, float]:
    """(ms to write 100 MB of pages the process holds, ms to write 100 MB of fresh pages): the difference is what
    faulting the memory in costs (the kernel's zeroing and bookkeeping), best of ``repeats``."""
    n = 100 * 2**20
    held = torch.zeros(n // 4)
    warm, fresh = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        held.fill_(1.0)
        warm.append(time.perf_counter() - start)
        region = mmap.mmap(-1, n)
        view = torch.frombuffer(region, dtype=torch.float32)
        start = time.perf_counter()
        view.fill_(1.0)
        fresh.append(time.perf_counter() - start)
        del view
        region.close()
    return min(warm) * 1e3, min(fresh) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--methods", default="all")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    add_accel_arguments(parser)
    args = parser.parse_args(argv)
    pieces = accel_pieces(args)
    if pieces is not None:
        tta.accel.enable(**pieces)  # as the tta commands do
    torch.set_num_threads(1)
    config = BenchConfig(model=args.model, weights=args.weights, batch_size=args.batch_size, threads=1)
    inputs = make_inputs(config)
    print(f"tensor cache: {tensor_cache_settings() or 'off'}")
    warm, fresh = fault_cost_ms_per_100mb()
    print(f"writing 100 MB: {warm:.1f} ms to held pages, {fresh:.1f} ms to fresh pages (faulting in)")
    results = {}
    for name in row_names(args.methods):
        model, _ = build_model(config)
        row = build_row(name, model, config, random_source_options(name, model, config))
        for i in range(args.warmup):
            row.call(inputs[i % len(inputs)])
        faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        for i in range(args.batches):
            row.call(inputs[i % len(inputs)])
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.batches
        cpu = (time.process_time() - cpu) / args.batches
        results[name] = {"faults_per_batch": faults, "mb_faulted_per_batch": faults * resource.getpagesize() / 1e6,
                         "cpu_s_per_batch": cpu}
        print(f"{name:26s} {faults:9.0f} faults/batch {faults * resource.getpagesize() / 1e6:7.1f} MB "
              f"{cpu * 1e3:7.0f} ms CPU")
    print(json.dumps({"tensor_cache": tensor_cache_settings(), "write_100mb_ms": {"held": warm, "fresh": fresh},
                      "rows": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
