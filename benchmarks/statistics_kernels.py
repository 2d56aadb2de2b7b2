"""Per-channel batch statistics: the one-pass C kernel against PyTorch's ways, alone and inside a model's forward.

    python benchmarks/statistics_kernels.py --weights ../shared/data/models/akamaster-resnet-cifar10/resnet20-12fca82f.th

Part 1 times, on ResNet-20's three map shapes at batch 200 (one thread, median of ``--repeats`` calls on the same
tensor, so the map is in cache): ``tta.accel.channel_moments`` (contiguous and channels_last), the two-pass float32 sums
that ``tta.accel.batch_norm`` falls back to, ``torch.batch_norm_update_stats`` (Welford, both layouts) and
``torch.var_mean``; then bfloat16 maps (autocast's), the C kernel against ``batch_norm_update_stats``; then both
element types over growing row lengths (where the kernel starts to pay, ``native_moments.MIN_ROW_LENGTH``); then
the stage-1 map with one thread and with one per CPU. Part 2 times the statistics call inside test-time BN's forward on the real model (the map
was just written by the convolution), per shape and per batch, with the kernel and with ``TTA_NATIVE=0``'s path.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

import tta
import tta.accel.batch_norm as kernel
from eval.bench import BenchConfig, build_model, make_inputs
from tta.accel import channel_moments as native_moments

SHAPES = [(200, 16, 32, 32), (200, 32, 16, 16), (200, 64, 8, 8)]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def alone(repeats: int) -> None:
    print("alone (same tensor every call), ms:")
    print("| shape | C kernel | C kernel, channels_last | two-pass sums | batch_norm_update_stats | "
          "batch_norm_update_stats, channels_last | var_mean | C kernel, bfloat16 | "
          "batch_norm_update_stats, bfloat16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        x = torch.randn(shape)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        x_bf16 = x.bfloat16()
        cells = [median_ms(lambda: native_moments.channel_moments(x, kernel.CONDITION_LIMIT), repeats),
                 median_ms(lambda: native_moments.channel_moments(x_cl, kernel.CONDITION_LIMIT), repeats),
                 median_ms(lambda: kernel._sum_statistics(x), repeats),
                 median_ms(lambda: torch.batch_norm_update_stats(x, None, None, 0.0), repeats),
                 median_ms(lambda: torch.batch_norm_update_stats(x_cl, None, None, 0.0), repeats),
                 median_ms(lambda: torch.var_mean(x, dim=(0, 2, 3), correction=0), max(5, repeats // 4)),
                 (median_ms(lambda: native_moments.channel_moments(x_bf16, kernel.CONDITION_LIMIT), repeats)
                  if native_moments.layout(x_bf16) is not None else None),  # short bfloat16 rows: PyTorch's
                 median_ms(lambda: torch.batch_norm_update_stats(x_bf16, None, None, 0.0), repeats)]
        print(f"| {shape} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")


def row_lengths(repeats: int) -> None:
    """Where the kernel pays for contiguous maps: (200, 64, L) for growing rows L, both element types."""
    print("\nrow length L of a contiguous (200, 64, L) map, ms (the kernel timed at every L, also below "
          f"MIN_ROW_LENGTH = {({str(k).replace('torch.', ''): v for k, v in native_moments.MIN_ROW_LENGTH.items()})}):")
    print("| L | C kernel, float32 | batch_norm_update_stats, float32 | C kernel, bfloat16 | "
          "batch_norm_update_stats, bfloat16 |")
    print("|---:|---:|---:|---:|---:|")
    thresholds = native_moments.MIN_ROW_LENGTH
    native_moments.MIN_ROW_LENGTH = dict.fromkeys(thresholds, 1)
    try:
        for length in (16, 32, 64, 128, 256):
            x = torch.randn(200, 64, length)
            cells = []
            for t in (x, x.bfloat16()):
                cells.append(median_ms(lambda: native_moments.channel_moments(t, kernel.CONDITION_LIMIT), repeats))
                cells.append(median_ms(lambda: torch.batch_norm_update_stats(t, None, None, 0.0), repeats))
            print(f"| {length} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    finally:
        native_moments.MIN_ROW_LENGTH = thresholds


def threads(repeats: int) -> None:
    """The stage-1 map with 1 and with all of torch's threads (the kernel splits the work in PyTorch's OpenMP pool)."""
    most = os.cpu_count() or 1
    print("\nthreads (torch.set_num_threads), (200, 16, 32, 32), ms:")
    print("| threads | C kernel | C kernel, channels_last | two-pass sums |")
    print("|---:|---:|---:|---:|")
    x = torch.randn(SHAPES[0])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for count in sorted({1, most}):
        torch.set_num_threads(count)
        cells = [median_ms(lambda: native_moments.channel_moments(x, kernel.CONDITION_LIMIT), repeats),
                 median_ms(lambda: native_moments.channel_moments(x_cl, kernel.CONDITION_LIMIT), repeats),
                 median_ms(lambda: kernel._sum_statistics(x), repeats)]
        print(f"| {count} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    torch.set_num_threads(1)


def in_model(weights: str | None, batches: int) -> None:
    config = BenchConfig(weights=weights)
    inputs = make_inputs(config)
    original, kernel_moments = kernel.batch_statistics, native_moments.channel_moments
    print("\ninside test-time BN's forward on ResNet-20 (median ms per call; per batch = sum over the 19 layers):")
    print("| path | " + " | ".join(str(s) for s in SHAPES) + " | per batch |")
    print("|---|" + "---:|" * (len(SHAPES) + 1))
    for label, use_kernel in (("C kernel", True), ("two-pass sums (TTA_NATIVE=0's path)", False)):
        calls: dict[tuple, list[float]] = {}

        def timed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            start = time.perf_counter()
            result = original(x)
            calls.setdefault(tuple(x.shape), []).append(time.perf_counter() - start)
            return result

        model, _ = build_model(config)
        adapted = tta.adapt(model, "norm")
        kernel.batch_statistics = timed
        if not use_kernel:  # batch_statistics then takes its own fallback, as with TTA_NATIVE=0
            native_moments.channel_moments = lambda x, limit: None
        try:
            with torch.no_grad():
                for i in range(batches):
                    adapted(inputs[i % len(inputs)])
        finally:
            kernel.batch_statistics = original
            native_moments.channel_moments = kernel_moments
        medians = {shape: statistics.median(calls[shape]) * 1e3 for shape in SHAPES}
        per_batch = sum(medians[s] * len(calls[s]) / batches for s in SHAPES)
        print(f"| {label} | " + " | ".join(f"{medians[s]:.3f}" for s in SHAPES) + f" | {per_batch:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tta.accel.enable()
    state = native_moments.status()
    if not state["available"]:
        print(f"the C kernel is not available: {state['detail']}")
        return 1
    print(f"kernel: {state['detail']}; torch {torch.__version__}, 1 thread\n")
    alone(args.repeats)
    row_lengths(args.repeats)
    threads(args.repeats)
    in_model(args.weights, args.batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
