"""``tta demo``: the whole pipeline on an embedded dataset, no download, in under two minutes on 2 cores.

Trains a small BatchNorm CNN on scikit-learn's handwritten digits (8x8, upscaled to 32x32 RGB), corrupts the
held-out test split with the benchmark corruptions, and compares every method under the chosen protocol:
the same runner, records, tables and plots as ``tta corruption``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import streams
import tta
from eval.corruption_benchmark import BenchmarkConfig, run_benchmark
from eval.corruption_cli import print_tables
from eval.models import NormalizedModel
from streams.protocols import KINDS


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Three conv-BN-ReLU stages, global pooling, a linear classifier; inputs in [0, 1], normalised inside."""
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )
    return NormalizedModel(net, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def train_digits_cnn(seed: int = 0, epochs: int = 12, batch_size: int = 64, log: bool = True) -> nn.Module:
    """Train :func:`digits_cnn` on the digits train split (seeded); returns it in eval mode."""
    torch.manual_seed(seed)
    train = streams.load_digits(split="train", seed=seed)
    x_all = train.images.float() / 255
    y_all = train.labels
    model = digits_cnn(len(train.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=g)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if log and (epoch + 1) % 4 == 0:
            print(f"  epoch {epoch + 1}/{epochs}: training loss {total / len(order):.3f}")
    return model.eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--protocol", default="reset", choices=KINDS)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--corruptions", default="all")
    parser.add_argument("--methods", default="default",
                        help="'default' (every single-pass method: forward-only and one-step), 'all' (every method, "
                             "the multi-pass ones such as cotta and memo included: several minutes) or a "
                             "comma-separated list")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the demo's network is tiny, and on a busy 2-core machine "
                             "two threads made it 6x slower: 422 s against 70 s)")
    parser.add_argument("--no-progress", action="store_true")


def demo_methods(text: str) -> list[str]:
    """'default': the single-pass methods (as ``tta bench``'s default rows); 'all': every registered method."""
    if text == "all":
        return tta.methods()
    if text == "default":
        return [m for m in tta.methods() if not tta.registry.method_class(m).multi_pass]
    return [m.strip() for m in text.split(",") if m.strip()]


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "digits_cnn.pt"
    if weights.exists():
        model = digits_cnn()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        print(f"using the model trained earlier: {weights}")
    else:
        print("training a small BatchNorm CNN on scikit-learn's digits (train split)...")
        model = train_digits_cnn(args.seed, args.epochs)
        torch.save(model.state_dict(), weights)
    config = BenchmarkConfig(
        out=str(out), model="digits_cnn (trained by tta demo)", weights=str(weights), data="digits", split="test",
        methods=demo_methods(args.methods), corruptions=args.corruptions,
        severity=args.severity, protocol=args.protocol, batch_size=args.batch_size, seed=args.seed,
        source_images=1000, progress=not args.no_progress)
    print(f"evaluating {', '.join(config.methods)} on digits test images, corruptions={args.corruptions}, "
          f"severity {args.severity}, protocol {args.protocol}...")
    tables = run_benchmark(config, model=model)
    print_tables(tables, str(out))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
