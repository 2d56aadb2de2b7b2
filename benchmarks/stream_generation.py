"""How long a corruption stream takes to make its batches, alone (no model): the most a prefetching thread can hide.

    python benchmarks/stream_generation.py --data ../shared/data/cifar10/cifar10-jpeg.zip --n-images 1000

Builds the stream exactly as ``tta corruption`` does (``eval.corruption_benchmark.build_stream``) and times building
it and iterating over every batch of every segment, one thread.
"""
from __future__ import annotations

import argparse
import time

import torch

from eval.corruption_benchmark import BenchmarkConfig, build_stream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="cifar10_resnet20", help="decides the input size and parameter table")
    parser.add_argument("--corruptions", default="all")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = BenchmarkConfig(out="unused", model=args.model, data=args.data, corruptions=args.corruptions,
                             severity=args.severity, n_images=args.n_images, batch_size=args.batch_size)
    start = time.perf_counter()
    stream = build_stream(config)
    built = time.perf_counter() - start
    start = time.perf_counter()
    batches = images = 0
    for segment in range(len(stream.segments)):
        for batch in stream.batches(segment):
            batches += 1
            images += len(batch.y)
    made = time.perf_counter() - start
    print(f"built in {built:.2f} s; {batches} batches ({images} images) made in {made:.2f} s "
          f"({1e3 * made / images:.3f} ms per image, {1e3 * made / batches:.1f} ms per batch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
