"""A negative result kept reproducible: tent with its saved activations stored in bfloat16 (saved_tensors_hooks).

    python benchmarks/bf16_saved_activations.py --weights ../shared/data/models/akamaster-resnet-cifar10/resnet20-12fca82f.th

Tried for the memory goal of the performance issue and not kept in the library:
the saved bytes halve, but the peak RSS of a step falls much less (10-20 %). Each mode runs in a fresh
process (``--mode`` runs one): RSS after the forward pass and peak RSS over forward and backward (VmHWM
reset before each step, malloc_trim before), the median step time, and the gradient of the BatchNorm affine
parameters against the exact one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch

#: Tensors below this size are saved as they are.
MIN_BYTES = 1 << 20


class _Compressed:
    """A saved tensor in a narrower dtype, and the dtype to give back."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: torch.Tensor, dtype: torch.dtype) -> None:
        self.data, self.dtype = data, dtype


class CompressedSavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, large floating tensors saved for backward are kept in ``dtype`` (bfloat16).

    Use one context per forward pass (its cache of already compressed tensors lives as long as the context).
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, min_bytes: int = MIN_BYTES) -> None:
        self.dtype, self.min_bytes = dtype, min_bytes
        self._cache: dict[tuple, tuple[weakref.ref, _Compressed]] = {}
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if (tensor.dtype not in (torch.float32, torch.float64) or tensor.layout != torch.strided
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
               tensor._version, tensor.dtype, tensor.device)
        # An entry counts only while the tensor it was made from is alive: once that is freed, a new tensor can
        # take its address, shape and version, and must not receive its data.
        original, packed = self._cache.get(key, (None, None))
        if packed is None or original() is None:
            packed = _Compressed(tensor.detach().to(self.dtype), tensor.dtype)
            self._cache[key] = (weakref.ref(tensor), packed)
        return packed

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _Compressed):
            return packed.data.to(packed.dtype)
        return packed

    def __exit__(self, *exc: Any) -> None:
        self._cache.clear()  # the graph keeps what it needs; the cache must not keep it longer
        super().__exit__(*exc)


def run_mode(mode: str, weights: str | None, steps: int) -> dict[str, Any]:
    import tta
    from eval.bench import BenchConfig, _release_free_memory, _reset_peak_rss, _status_kb, build_model, make_inputs
    from tta.methods.tent import softmax_entropy

    tta.accel.enable()
    torch.set_num_threads(1)
    config = BenchConfig(weights=weights)
    model, _ = build_model(config)
    inputs = make_inputs(config)
    adapted = tta.adapt(model, "tent")
    rss_forward, rss_peak, times, grads = [], [], [], None
    for i in range(steps):
        _release_free_memory()
        base = _status_kb("VmRSS")
        _reset_peak_rss()
        start = time.perf_counter()
        with torch.enable_grad():
            with CompressedSavedTensors() if mode == "bfloat16" else contextlib.nullcontext():
                loss = softmax_entropy(adapted.model(inputs[0])).mean()
            rss_forward.append((_status_kb("VmRSS") - base) / 1024)
            loss.backward()
        times.append(time.perf_counter() - start)
        rss_peak.append((_status_kb("VmHWM") - base) / 1024)
        grads = torch.cat([p.grad.flatten() for p in adapted.params]).tolist()
        adapted.optimizer.zero_grad(set_to_none=True)  # no step: every repeat computes the same gradient
        del loss
    return {"mode": mode, "rss_after_forward_mb": rss_forward, "peak_rss_mb": rss_peak,
            "median_step_ms": statistics.median(times[1:]) * 1e3, "grad": grads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mode", choices=["exact", "bfloat16"], default=None, help="run one mode in this process")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.weights, args.steps)))
        return 0
    root = Path(__file__).resolve().parents[1]
    results = {}
    for mode in ("exact", "bfloat16"):
        command = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)]
        command += ["--weights", args.weights] if args.weights else []
        done = subprocess.run(command, capture_output=True, text=True, cwd=root, check=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    exact, rounded = torch.tensor(results["exact"]["grad"]), torch.tensor(results["bfloat16"]["grad"])
    error = float((exact - rounded).norm() / exact.norm())
    for mode, r in results.items():
        print(f"{mode:9s} RSS after forward {min(r['rss_after_forward_mb']):.0f}-{max(r['rss_after_forward_mb']):.0f} MB, "
              f"peak {min(r['peak_rss_mb']):.0f}-{max(r['peak_rss_mb']):.0f} MB, step {r['median_step_ms']:.0f} ms")
    print(f"gradient relative error (bfloat16 against exact): {error:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
