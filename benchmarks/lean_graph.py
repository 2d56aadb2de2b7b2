"""A negative result kept reproducible: tent with a leaner autograd graph (frozen convolutions save no input,
ReLUs save a boolean sign map), entered as a ``TorchFunctionMode`` around the forward.

    python benchmarks/lean_graph.py --weights ../shared/data/models/akamaster-resnet-cifar10/resnet20-12fca82f.th

Tried for the memory goal of the performance issue and not kept in the library (docs/performance.md, Memory).
The gradients are bitwise autograd's and the saved bytes fall by a third, but on CPU the step is much slower
(PyTorch's boolean comparison and boolean-masked backward are 2-7x slower than ``threshold_backward``), and the
peak RSS does not fall: the forward's freed temporaries and the quarter-size masks fragment the heap, so the RSS
after the forward stays where it was unless the heap is trimmed. Each mode runs in a fresh process (``--mode``
runs one): saved bytes (``saved_tensors_hooks``), live bytes after the forward (RSS after ``malloc_trim``), RSS
after the forward and peak RSS of the step (VmHWM reset before each step), the median step time, and whether the
BatchNorm gradients equal autograd's bitwise.

What it does, and why it is exact: a convolution whose weight and bias get no gradient needs only the weight to
pass the gradient to its input (as ``torch.nn.grad.conv2d_input``); a ReLU needs only where ``out <= 0``
(``threshold_backward``). In a ResNet every ReLU output is the next convolution's input, so the two together
hold two of the four maps of each block. Not applied: trainable convolutions, string padding, autocast, in-place
ReLU on a view or a leaf, ``torch.compile``.
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
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_RELUS = {F.relu: None, torch.relu: False, torch.Tensor.relu: False, torch.relu_: True, torch.Tensor.relu_: True}


def _tuple(value: Any, dims: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * dims


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class FrozenConvolution(torch.autograd.Function):
    """A convolution whose weight and bias get no gradient: saves the weight and the input's shape only."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, dims):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.memory_format = _memory_format(x)
        ctx.args = (_tuple(stride, dims), _tuple(padding, dims), _tuple(dilation, dims), [0] * dims, groups)
        convolution = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
        return convolution(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, output_padding, groups = ctx.args
        # As torch.nn.grad.conv2d_input: the input is only consulted for its shape when only its gradient is asked.
        shape_only = grad.new_empty(1).expand(ctx.input_shape)
        grad_input = torch.ops.aten.convolution_backward(
            grad, shape_only, weight, None, stride, padding, dilation, False, output_padding, groups,
            (True, False, False))[0]
        if ctx.memory_format is not torch.contiguous_format and not grad_input.is_contiguous(
                memory_format=ctx.memory_format):
            grad_input = grad_input.contiguous(memory_format=ctx.memory_format)
        return grad_input, None, None, None, None, None, None, None


class SignReLU(torch.autograd.Function):
    """ReLU that saves ``out <= 0`` as booleans; its backward is ``threshold_backward``'s ``where(out <= 0, 0, g)``."""

    @staticmethod
    def forward(ctx, x, inplace):  # type: ignore[override]
        if inplace:
            out = torch.relu_(x)
            ctx.mark_dirty(x)
        else:
            out = torch.relu(x)
        ctx.save_for_backward(out <= 0)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (nonpositive,) = ctx.saved_tensors
        return grad.masked_fill(nonpositive, 0), None


class RecomputedReLU(torch.autograd.Function):
    """ReLU of a BatchNorm output that saves nothing new: its backward recomputes the BatchNorm output from the
    BatchNorm's own saved input and statistics (the same eval-kernel call, so the same values bitwise)."""

    @staticmethod
    def forward(ctx, y, inplace, norm):  # type: ignore[override]
        ctx.norm = norm  # (input, mean, var, weight, bias, eps) in a tuple: no graph edges to them
        if inplace:
            ctx.mark_dirty(y)
            return torch.relu_(y)
        return torch.relu(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        norm_input, mean, var, weight, bias, eps = ctx.norm
        y = F.batch_norm(norm_input, mean, var, weight, bias, False, 0.0, eps)
        return torch.ops.aten.threshold_backward(grad, y, 0), None, None


def _frozen_convolution(func: Callable, dims: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = dict(zip(names, (None, None, None, 1, 0, 1, 1)))
    values.update(zip(names, args))
    values.update(kwargs)
    x, weight, bias = values["input"], values["weight"], values["bias"]
    if (not isinstance(x, torch.Tensor) or not x.requires_grad or weight.requires_grad
            or (bias is not None and bias.requires_grad) or isinstance(values["padding"], str)
            or torch.is_autocast_enabled(x.device.type)):
        return None
    return FrozenConvolution.apply(x, weight, bias, values["stride"], values["padding"], values["dilation"],
                                   values["groups"], dims)


def _relu_arguments(inplace: bool | None, args: tuple, kwargs: dict) -> tuple[Any, bool]:
    """(input, inplace) of any of the ReLU spellings in ``_RELUS``."""
    x = args[0] if args else kwargs.get("input")
    if inplace is None:  # F.relu(input, inplace=False)
        inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
    return x, inplace


def _sign_relu(inplace: bool | None, args: tuple, kwargs: dict) -> torch.Tensor | None:
    x, inplace = _relu_arguments(inplace, args, kwargs)
    if not isinstance(x, torch.Tensor) or not x.requires_grad or not x.is_floating_point():
        return None
    if inplace and (x.is_leaf or x._is_view()):
        return None
    return SignReLU.apply(x, inplace)


def _recomputed_relu(inplace: bool | None, args: tuple, kwargs: dict, biases: dict[int, Any]) -> torch.Tensor | None:
    """A ReLU straight after a MixedBatchNorm (alpha = 0, as tent's): saves nothing, recomputes in backward."""
    y, inplace = _relu_arguments(inplace, args, kwargs)
    node = getattr(y, "grad_fn", None)
    if node is None or type(node).__name__ != "MixedBatchNormFunctionBackward" or node.alpha != 0.0:
        return None
    norm_input, weight, _, mean, var = node.saved_tensors
    return RecomputedReLU.apply(y, inplace, (norm_input.detach(), mean, var, weight, biases[weight.data_ptr()], node.eps))


class LeanGraph(TorchFunctionMode):
    """``with LeanGraph(): logits = model(x)``: frozen convolutions and ReLUs save only what their gradient needs.

    ``recompute_from=model``: ReLUs after a BatchNorm save nothing and recompute (other ReLUs keep autograd's
    saved output); otherwise every ReLU saves a boolean sign map.
    """

    def __init__(self, recompute_from: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.biases = None if recompute_from is None else {
            m.weight.data_ptr(): m.bias for m in recompute_from.modules() if type(m).__name__ == "MixedBatchNorm"}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            result = None
            if func in _CONVOLUTIONS:
                result = _frozen_convolution(func, _CONVOLUTIONS[func], args, kwargs)
            elif func in _RELUS:
                result = (_sign_relu(_RELUS[func], args, kwargs) if self.biases is None
                          else _recomputed_relu(_RELUS[func], args, kwargs, self.biases))
            if result is not None:
                return result
        return func(*args, **kwargs)


#: autograd's graph; frozen convolutions + boolean ReLU signs; frozen convolutions + ReLUs after a BatchNorm
#: recomputed in backward.
MODES = ("default", "lean", "recompute")


def _saved_mb(model: torch.nn.Module, x: torch.Tensor, graph: Callable) -> float:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with graph():
            model(x)
    return sum(storages.values()) / 2**20


def measure(mode: str, weights: str | None, batch: int, steps: int) -> dict[str, Any]:
    """One mode in this process: tent's step (forward, entropy, backward) on ResNet-20 at 32 px."""
    import tta
    from eval.bench import _reset_peak_rss, _status_kb
    from eval.models import load_model
    from tta.cpu_memory import return_free_memory
    from tta.methods.tent import softmax_entropy

    tta.retain_freed_memory()
    torch.set_num_threads(1)
    lean = mode != "default"
    model = load_model("cifar10_resnet20", weights)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapted = tta.adapt(model, "tent")
    graph = (lambda: LeanGraph(model if mode == "recompute" else None)) if lean else contextlib.nullcontext
    saved = _saved_mb(model, x, graph)
    rows = []
    for _ in range(steps):
        gc.collect()
        return_free_memory()
        base = _status_kb("VmRSS") / 1024
        _reset_peak_rss()
        start = time.perf_counter()
        with torch.enable_grad():
            with graph():
                logits = model(x)
            after_forward = _status_kb("VmRSS") / 1024 - base
            return_free_memory()
            live = _status_kb("VmRSS") / 1024 - base
            softmax_entropy(logits).mean().backward()
        rows.append((time.perf_counter() - start, after_forward, live, _status_kb("VmHWM") / 1024 - base))
        grads = [p.grad.clone() for p in adapted.params]
        adapted.optimizer.zero_grad(set_to_none=True)  # no step: every step sees the same parameters
        del logits
    return {"mode": mode, "saved_mb": saved, "step_ms": 1e3 * statistics.median(r[0] for r in rows),
            "rss_after_forward_mb": [round(r[1]) for r in rows], "live_after_forward_mb": [round(r[2]) for r in rows],
            "peak_rss_mb": [round(r[3]) for r in rows], "grads": [g.tolist() for g in grads]}


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
        print(f"{mode:8s} saved {r['saved_mb']:6.1f} MB | step {r['step_ms']:6.0f} ms | RSS after forward "
              f"{r['rss_after_forward_mb']} MB | live after forward {r['live_after_forward_mb']} MB | "
              f"peak RSS {r['peak_rss_mb']} MB")
    same = all(results["default"]["grads"] == r["grads"] for r in results.values())
    print(f"BatchNorm gradients bitwise equal to autograd's in every mode: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
