"""core's BatchNorm backward (alpha > 0) with the one-pass C kernel for ``a * x + b + s * g`` against PyTorch's two
passes (batch_norm's eval kernel, then an in-place addcmul), one thread, interleaved rounds.

    python benchmarks/core_backward.py [--rounds 25] [--batch-size 200]

Prints the median ms of the elementwise pass alone at ResNet-20's first-stage shape (N, 16, 32, 32), and of the whole
``MixedBatchNormFunction`` backward summed over ResNet-20's 19 BatchNorm layers (7 at 16 x 32 x 32, 6 at
32 x 16 x 16, 6 at 64 x 8 x 8), with the largest difference between the two gradients.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

LAYERS = [(16, 32)] * 7 + [(32, 16)] * 6 + [(64, 8)] * 6  # (channels, side) of ResNet-20's BatchNorm inputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tta
    from tta.accel import batch_norm as mixed_bn_kernel
    from tta.accel import kernels as native

    tta.accel.enable()
    torch.set_num_threads(1)
    if native.library() is None:
        print(f"C kernels not built: {native.status()}")
        return 1
    g = torch.Generator().manual_seed(0)
    n = args.batch_size

    def without_kernel(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            saved = native.library
            native.library = lambda: None  # the PyTorch passes
            try:
                return fn()
            finally:
                native.library = saved
        return run

    x, grad = torch.randn(n, 16, 32, 32, generator=g), torch.randn(n, 16, 32, 32, generator=g)
    a, b, s = (torch.randn(16, generator=g) for _ in range(3))
    elementwise = lambda: mixed_bn_kernel._affine_plus_scaled(x, a, b, grad, s)  # noqa: E731

    layers = []
    for c, side in LAYERS:
        inp = torch.randn(n, c, side, side, generator=g).requires_grad_(True)
        weight = torch.rand(c, generator=g).add_(0.5).requires_grad_(True)
        bias = torch.randn(c, generator=g).requires_grad_(True)
        mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g).add_(0.5)
        out = mixed_bn_kernel.MixedBatchNormFunction.apply(inp, weight, bias, mean, var, 0.9, 1e-5)
        layers.append((out, (inp, weight, bias), torch.randn(out.shape, generator=g)))

    def backward_all() -> list[torch.Tensor]:
        grads = []
        for out, inputs, upstream in layers:
            grads += torch.autograd.grad(out, inputs, upstream, retain_graph=True)
        return grads

    pieces = {"elementwise, C kernel": elementwise, "elementwise, PyTorch": without_kernel(elementwise),
              "backward of 19 layers, C kernel": backward_all,
              "backward of 19 layers, PyTorch": without_kernel(backward_all)}
    results = {name: piece() for name, piece in pieces.items()}
    times: dict[str, list[float]] = {name: [] for name in pieces}
    names = list(pieces)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            pieces[name]()
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"{name:34s} {1e3 * statistics.median(t):8.2f} ms")
    largest = max((p - q).abs().max().item() for p, q in zip(results["backward of 19 layers, C kernel"],
                                                             results["backward of 19 layers, PyTorch"]))
    print(f"largest difference between the gradients: {largest:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
