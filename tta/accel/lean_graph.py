"""A leaner autograd graph for gradient methods that train only normalisation parameters (tent, core, cafa).

Why: the peak memory of a gradient step is the activations autograd keeps for the backward pass. In a ResNet
adapted by tent, each convolution-BatchNorm-ReLU unit keeps two activation maps: the BatchNorm's input, and the
ReLU's output, which is also the next convolution's saved input. Only the first is needed to compute exact
gradients for the BatchNorm parameters:

- a convolution whose weight and bias get no gradient needs only its weight to pass the gradient to its input
  (``convolution_backward`` with only the input's gradient asked, as ``torch.nn.grad.conv2d_input`` does);
- a ReLU needs only where its output is positive, which :mod:`tta.accel.relu_mask` keeps as one bit per element on
  CPU (float32), and a boolean map elsewhere (GPUs).

Inside ``with LeanGraph():`` (a ``TorchFunctionMode``) frozen convolutions and ReLUs are recorded that way; every
other operation is recorded as usual. The gradients are the same, bit for bit, as autograd's
(``tests/test_accel_lean_graph.py``); tent on ResNet-20 at batch 200 keeps 148 MB for the backward pass instead of
288 MB (``benchmarks/lean_graph.py``, docs/performance.md).

Not applied (the operation is recorded as usual): a convolution whose weight or bias is trained, string padding,
autocast (its bfloat16 casts), a ReLU on a leaf or a view, in place; CPU ReLUs that are not float32 or where the
C kernels are off (the ``kernels`` piece of :mod:`tta.accel`, ``TTA_NATIVE=0``, no compiler), in which case only
the convolutions are lean, which saves nothing where the ReLU keeps the same map; ``torch.compile`` (it plans its own
graph).

Cost: each recorded operation is a Python autograd Function (tens of microseconds per call). On CPU that is lost in
the arithmetic (tent on ResNet-20 at batch 200: the same time with and without, docs/performance.md); on a GPU,
where a step takes milliseconds, it may not be, so the ``lean_graph`` piece of :mod:`tta.accel` uses it only for
CPU batches large enough to hide it (``tta.accel.LEAN_GRAPH_MIN_INPUT_ELEMENTS``). Anyone may use it directly:
``with LeanGraph(): loss = objective(model(x))``, on any device.

Memory: the bytes held in tensors fall by about a third (ResNet-20, batch 200: the step's peak 296 -> 182 MB). On
CPU the process's RSS falls with them only under the tensor cache (the ``tensor_cache`` piece): with every tensor
left to glibc's malloc, its placement of the freed maps leaves the heap as large as before (docs/performance.md,
tensor_cache).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from tta.accel import relu_mask as native_relu

#: The convolutions the mode records, with their number of spatial dimensions.
CONVOLUTIONS: dict[Callable, int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
#: Devices whose ReLUs save a boolean mask where the bit kernels (CPU, float32) do not apply.
BOOLEAN_MASK_DEVICES = frozenset({"cuda", "xpu", "mps"})
#: The spellings of ReLU the mode records: True in place, False not, None ``F.relu``'s ``inplace`` argument.
RELUS: dict[Callable, bool | None] = {F.relu: None, torch.relu: False, torch.Tensor.relu: False, torch.relu_: True,
                                      torch.Tensor.relu_: True}


def _expand(value: Any, dims: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * dims


class FrozenConvolution(torch.autograd.Function):
    """A convolution whose weight and bias get no gradient: saves the weight and the input's shape only."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, dims):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.layout = native_relu.dense_layout(x) or torch.contiguous_format
        ctx.arguments = (_expand(stride, dims), _expand(padding, dims), _expand(dilation, dims), [0] * dims, groups)
        return CONVOLUTION_BY_DIMS[dims](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, output_padding, groups = ctx.arguments
        if ctx.layout is not torch.contiguous_format:  # choose the kernel's layout as the real input would
            grad = grad.contiguous(memory_format=ctx.layout)
        # When only the input's gradient is asked, the input is consulted for its shape, strides and dtype (which
        # choose the kernel) but never read. A zero-stride stand-in (as torch.nn.grad.conv2d_input passes) is
        # made contiguous by oneDNN's path first, a full copy; so pass a tensor laid out as the input was: the
        # gradient itself where it has that shape, else uninitialised memory (allocated, never touched).
        if grad.shape == ctx.input_shape and grad.is_contiguous(memory_format=ctx.layout):
            stand_in = grad
        else:
            stand_in = torch.empty(ctx.input_shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        grad_input = torch.ops.aten.convolution_backward(
            grad, stand_in, weight, None, stride, padding, dilation, False, output_padding, groups,
            (True, False, False))[0]
        if not grad_input.is_contiguous(memory_format=ctx.layout):
            grad_input = grad_input.contiguous(memory_format=ctx.layout)
        return grad_input, None, None, None, None, None, None, None


CONVOLUTION_BY_DIMS: dict[int, Callable] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class BitMaskReLU(torch.autograd.Function):
    """ReLU that saves one bit per element (where it passed its input) instead of its float output."""

    @staticmethod
    def forward(ctx, x, inplace):  # type: ignore[override]
        out, bits = native_relu.relu_with_bits(x, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(bits)
        ctx.shape, ctx.stride = out.shape, out.stride()
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        return native_relu.relu_grad_from_bits(grad, bits, ctx.shape, ctx.stride), None


class BoolMaskReLU(torch.autograd.Function):
    """ReLU that saves a boolean map (8 bits per element) of where it passed its input: where the bit kernels do not
    run (GPUs and other devices, other float dtypes there). Not used on CPU, where PyTorch's boolean ops are slower
    than the float ops they replace."""

    @staticmethod
    def forward(ctx, x, inplace):  # type: ignore[override]
        out = torch.relu_(x) if inplace else torch.relu(x)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(torch.logical_not(out <= 0))  # threshold_backward's test, NaN passing
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (passed,) = ctx.saved_tensors
        return torch.where(passed, grad, 0.0), None


def _frozen_convolution(dims: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values: dict[str, Any] = dict(zip(names, (None, None, None, 1, 0, 1, 1)))
    values.update(zip(names, args))
    values.update(kwargs)
    x, weight, bias = values["input"], values["weight"], values["bias"]
    if (not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or not x.requires_grad
            or weight.requires_grad or (isinstance(bias, torch.Tensor) and bias.requires_grad)
            or isinstance(values["padding"], str) or torch.is_autocast_enabled(x.device.type)
            or native_relu.dense_layout(x) is None):
        return None
    return FrozenConvolution.apply(x, weight, bias, values["stride"], values["padding"], values["dilation"],
                                   values["groups"], dims)


def _bit_mask_relu(inplace: bool | None, args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("input")
    if inplace is None:  # F.relu(input, inplace=False)
        inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
    if not isinstance(x, torch.Tensor) or not x.requires_grad or not x.is_floating_point():
        return None
    if inplace and (x.is_leaf or x._is_view()):
        return None
    if native_relu.applies(x):
        return BitMaskReLU.apply(x, inplace)
    if x.device.type in BOOLEAN_MASK_DEVICES:
        return BoolMaskReLU.apply(x, inplace)
    return None


class LeanGraph(TorchFunctionMode):
    """``with LeanGraph(): loss = objective(model(x))``: frozen convolutions and ReLUs save only what their input
    gradient needs. Active only while gradients are recorded."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        # Called for every torch function in the forward pass: the common case (not ours) returns at once.
        kind = _HANDLED.get(func)
        if kind is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            result = (_frozen_convolution(CONVOLUTIONS[func], args, kwargs or {}) if kind == "convolution"
                      else _bit_mask_relu(RELUS[func], args, kwargs or {}))
            if result is not None:
                return result
        return func(*args, **(kwargs or {}))


_HANDLED: dict[Callable, str] = {**{f: "convolution" for f in CONVOLUTIONS}, **{f: "relu" for f in RELUS}}


def outside_lean_graph() -> contextlib.AbstractContextManager:
    """Suspend a :class:`LeanGraph` that is the innermost torch-function mode, for code that records nothing it
    would change (our BatchNorm layers: ~25 tensor calls each, which the mode would otherwise pass through Python
    one by one, about 10 ms per tent step of ResNet-20). Any other mode stays active. Uses
    ``torch.overrides``'s mode-stack helpers; where they are missing, the mode stays (correct, slower)."""
    current = getattr(torch.overrides, "_get_current_function_mode", None)
    pop = getattr(torch.overrides, "_pop_mode_temporarily", None)
    if current is not None and pop is not None and isinstance(current(), LeanGraph):
        return pop()
    return contextlib.nullcontext()

