"""What the lean autograd graph (tta.accel.lean_graph) saves and costs on tent's step: ResNet-20, 32 px, CPU.

    python benchmarks/lean_graph.py --weights ../shared/data/models/akamaster-resnet-cifar10/resnet20-12fca82f.th

Each mode runs in a fresh process (``--mode`` runs one and prints JSON): ``default`` is autograd's graph,
``lean`` the library's default (frozen convolutions keep only their weight, ReLUs one bit per element). Per
mode: the bytes saved for the backward pass (``saved_tensors_hooks``), the peak bytes in tensors over a step
(the profiler's allocation records, as ``tta bench``'s tensor column), the peak RSS of each step (heap trimmed
and VmHWM reset before it, as ``tta bench``'s memory column), the median step time (forward, entropy, backward;
the trims make every step fault its pages in, so it is slower than in ``tta bench``), then the peak RSS of as many
steps more without trims (the allocator keeping what it freed, as the ``tta`` commands run) above the
RSS before the first step, and whether the BatchNorm gradients equal autograd's bit for bit.

``--ab-rounds N`` then times the adapters themselves (``tta.adapt(model, method)`` under ``tta.accel.enable()``, the
forward under LeanGraph or autograd's graph; forward, backward and Adam's update), interleaved in one process with
plain inference, N rounds each of tent, core and cafa, and prints the paired ratios: the median over rounds of (lean / autograd) and of each over plain.

``--kernels N`` first times the pieces at ResNet-20's first-stage shape (200, 16, 32, 32), one thread, N
interleaved rounds: PyTorch's ReLU and its backward (``threshold_backward``) against the bit-mask kernels, and a
frozen convolution's input gradient through autograd's node against :class:`tta.accel.lean_graph.FrozenConvolution`
(median ms; the order of the pieces rotates each round).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

MODES = ("default", "lean")


def _saved_mb(model: torch.nn.Module, x: torch.Tensor, graph: Callable) -> float:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with graph():
            model(x)
    return sum(storages.values()) / 2**20


def measure(mode: str, weights: str | None, batch: int, steps: int) -> dict[str, Any]:
    """One mode in this process: tent's step (forward, entropy, backward, no update) on ResNet-20 at 32 px."""
    import tta
    from eval.bench import BenchConfig, _reset_peak_rss, _status_kb, build_model, peak_tensor_bytes
    from tta.accel.allocator import release_free_memory as return_free_memory
    from tta.accel.lean_graph import LeanGraph
    from tta.methods.tent import softmax_entropy

    tta.accel.enable()
    torch.set_num_threads(1)
    model, _ = build_model(BenchConfig(weights=weights))
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapted = tta.adapt(model, "tent")  # its step is not called: the graph is chosen here, around the forward
    graph = LeanGraph if mode == "lean" else contextlib.nullcontext
    saved = _saved_mb(model, x, graph)

    def step() -> None:
        with torch.enable_grad():
            with graph():
                logits = model(x)
            softmax_entropy(logits).mean().backward()

    tensors = peak_tensor_bytes(step)
    adapted.optimizer.zero_grad(set_to_none=True)
    rows = []
    gc.collect()
    return_free_memory()
    start_rss = _status_kb("VmRSS") / 1024
    for _ in range(steps):
        gc.collect()
        return_free_memory()
        base = _status_kb("VmRSS") / 1024
        _reset_peak_rss()
        start = time.perf_counter()
        step()
        rows.append((time.perf_counter() - start, _status_kb("VmHWM") / 1024 - base))
        grads = [p.grad.clone() for p in adapted.params]
        adapted.optimizer.zero_grad(set_to_none=True)  # no update: every step sees the same parameters
    retained = []  # as the tta commands run: no trims, the allocator keeps what it freed
    for _ in range(steps):
        _reset_peak_rss()
        step()
        adapted.optimizer.zero_grad(set_to_none=True)
        retained.append(round(_status_kb("VmHWM") / 1024 - start_rss))
    return {"mode": mode, "saved_mb": saved, "peak_tensor_mb": None if tensors is None else tensors / 2**20,
            "step_ms": 1e3 * statistics.median(r[0] for r in rows), "peak_rss_mb": [round(r[1]) for r in rows],
            "retained_rss_mb": retained, "grads": [g.tolist() for g in grads]}


def time_kernels(rounds: int) -> dict[str, float]:
    """Median ms of each piece at (200, 16, 32, 32), one thread, interleaved rounds."""
    import torch.nn.functional as F

    import tta
    from tta.accel import relu_mask as native_relu
    from tta.accel.lean_graph import FrozenConvolution

    tta.accel.enable()  # as the tta commands run: freed maps reused, not page-faulted in again
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, 32, 32, generator=g)
    grad = torch.randn(200, 16, 32, 32, generator=g)
    weight = torch.randn(16, 16, 3, 3, generator=g)
    out, bits = native_relu.relu_with_bits(x)
    leaf = x.clone().requires_grad_(True)
    autograd_conv = F.conv2d(leaf, weight, None, 1, 1)
    frozen_conv = FrozenConvolution.apply(leaf, weight, None, 1, 1, 1, 1, 2)
    pieces: dict[str, Callable[[], Any]] = {
        "relu (PyTorch)": lambda: torch.relu(x),
        "relu + bits (kernel)": lambda: native_relu.relu_with_bits(x),
        "relu backward (threshold_backward)": lambda: torch.ops.aten.threshold_backward(grad, out, 0),
        "relu backward from bits (kernel)": lambda: native_relu.relu_grad_from_bits(grad, bits, out.shape,
                                                                                    out.stride()),
        "conv input gradient (autograd)": lambda: torch.autograd.grad(autograd_conv, leaf, grad, retain_graph=True),
        "conv input gradient (FrozenConvolution)": lambda: torch.autograd.grad(frozen_conv, leaf, grad,
                                                                               retain_graph=True),
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for name, piece in pieces.items():
        piece()
    names = list(pieces)
    for r in range(rounds):  # the order rotates each round, so no piece always follows the same one
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            pieces[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def time_adapters(weights: str | None, batch: int, rounds: int, methods: tuple[str, ...]) -> dict[str, Any]:
    """Paired timing of each method's adapter with the lean graph on and off, and plain inference, in this process."""
    import copy

    import tta
    from eval.bench import BenchConfig, build_model, random_source_options

    from tta.accel.lean_graph import LeanGraph

    tta.accel.enable()
    torch.set_num_threads(1)
    model, _ = build_model(BenchConfig(weights=weights))
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(model).eval()

    def infer() -> None:
        with torch.inference_mode():
            plain(x)

    rows: dict[str, Callable[[], Any]] = {"plain": infer}
    for method in methods:
        options = random_source_options(method, model, BenchConfig(batch_size=batch))
        for graph in ("on", "off"):
            adapted = tta.adapt(copy.deepcopy(model), method, **options)
            lean = graph == "on"  # the forward under LeanGraph or autograd's graph, whatever the batch size
            adapted._graph_mode = (lambda on: lambda x: LeanGraph() if on else contextlib.nullcontext())(lean)
            rows[f"{method} {graph}"] = (lambda a: lambda: a(x))(adapted)
    for run in rows.values():  # warm-up
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(rounds):
        order = list(rows) if r % 2 == 0 else list(rows)[::-1]
        for name in order:
            start = time.perf_counter()
            rows[name]()
            times[name].append(time.perf_counter() - start)

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    return {"median_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
            "on_over_off": {m: paired(f"{m} on", f"{m} off") for m in methods},
            "over_plain": {f"{m} {g}": paired(f"{m} {g}", "plain") for m in methods for g in ("on", "off")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="ResNet-20 checkpoint (random initialisation without)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process (JSON out)")
    parser.add_argument("--kernels", type=int, default=0, help="first time the pieces, this many rounds")
    parser.add_argument("--ab-rounds", type=int, default=0,
                        help="then time the adapters with the lean graph on and off, interleaved, this many rounds")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.weights, args.batch_size, args.steps)))
        return 0
    if args.kernels:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        for name, ms in time_kernels(args.kernels).items():
            print(f"{name:42s} {ms:6.2f} ms")
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--batch-size", str(args.batch_size), "--steps",
                   str(args.steps)] + (["--weights", args.weights] if args.weights else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    for mode, r in results.items():
        print(f"{mode:8s} saved {r['saved_mb']:6.1f} MB | peak in tensors {r['peak_tensor_mb']:6.1f} MB | "
              f"step {r['step_ms']:6.0f} ms | peak RSS per step {r['peak_rss_mb']} MB | then without trims, "
              f"peak RSS above the start {r['retained_rss_mb']} MB")
    same = all(results["default"]["grads"] == r["grads"] for r in results.values())
    print(f"BatchNorm gradients bitwise equal to autograd's in every mode: {same}")
    if args.ab_rounds:
        timed = time_adapters(args.weights, args.batch_size, args.ab_rounds, ("tent", "core", "cafa"))
        print(f"adapters, {args.ab_rounds} interleaved rounds, median ms: "
              + ", ".join(f"{k} {v:.0f}" for k, v in timed["median_ms"].items()))
        print("paired, lean graph on / off: " + ", ".join(f"{k} {v:.3f}" for k, v in timed["on_over_off"].items()))
        print("paired, over plain: " + ", ".join(f"{k} {v:.2f}" for k, v in timed["over_plain"].items()))
    return 0 if same else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
