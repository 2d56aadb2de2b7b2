"""What the lean autograd graph (tta.lean_graph) saves and costs on tent's step: ResNet-20, 32 px, CPU.

    python benchmarks/lean_graph.py --weights ../shared/data/models/akamaster-resnet-cifar10/resnet20-12fca82f.th

Each mode runs in a fresh process (``--mode`` runs one and prints JSON): ``default`` is autograd's graph,
``lean`` the library's default (frozen convolutions keep only their weight, ReLUs one bit per element). Per
mode: the bytes saved for the backward pass (``saved_tensors_hooks``), the peak bytes in tensors over a step
(the profiler's allocation records, as ``tta bench``'s tensor column), the peak RSS of each step (heap trimmed
and VmHWM reset before it, as ``tta bench``'s memory column), the median step time (forward, entropy, backward;
the trims make every step fault its pages in, so it is slower than in ``tta bench``), and whether the BatchNorm
gradients equal autograd's bit for bit.

An earlier version of this script (commit 21a9839) also measured two lean graphs written in PyTorch ops alone
(boolean ReLU masks; ReLUs recomputed from the BatchNorm input): docs/performance.md, Memory.
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
    from eval.bench import _reset_peak_rss, _status_kb, peak_tensor_bytes
    from eval.models import load_model
    from tta.cpu_memory import return_free_memory
    from tta.lean_graph import LeanGraph
    from tta.methods.tent import softmax_entropy

    tta.retain_freed_memory()
    torch.set_num_threads(1)
    model = load_model("cifar10_resnet20", weights)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapted = tta.adapt(model, "tent", lean_graph="off")  # the graph is chosen here, around the forward
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
    return {"mode": mode, "saved_mb": saved, "peak_tensor_mb": None if tensors is None else tensors / 2**20,
            "step_ms": 1e3 * statistics.median(r[0] for r in rows), "peak_rss_mb": [round(r[1]) for r in rows],
            "grads": [g.tolist() for g in grads]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="ResNet-20 checkpoint (random initialisation without)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process (JSON out)")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.weights, args.batch_size, args.steps)))
        return 0
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--batch-size", str(args.batch_size), "--steps",
                   str(args.steps)] + (["--weights", args.weights] if args.weights else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    for mode, r in results.items():
        print(f"{mode:8s} saved {r['saved_mb']:6.1f} MB | peak in tensors {r['peak_tensor_mb']:6.1f} MB | "
              f"step {r['step_ms']:6.0f} ms | peak RSS per step {r['peak_rss_mb']} MB")
    same = all(results["default"]["grads"] == r["grads"] for r in results.values())
    print(f"BatchNorm gradients bitwise equal to autograd's in every mode: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
