"""Exact gradients with fewer saved activations, for adapters that train only normalisation-layer parameters.

A gradient method (tent, core, cafa) needs the gradient of its loss with respect to the BatchNorm affine
parameters only; every convolution weight is frozen. Autograd still saves, per convolution, its whole input (a
convolution saves input and weight whatever it will differentiate), and per ReLU its whole output, although:

- a convolution with a frozen weight needs only that weight to pass the gradient to its input (its input is used
  only for the weight gradient);
- a ReLU needs only the sign of its output (``threshold_backward`` zeroes where ``out <= 0``).

In a ResNet every ReLU output is the next convolution's input, so between them they hold two of the four maps of
each block. :class:`LeanGraph` is a ``TorchFunctionMode`` under which ``conv1d/2d/3d`` with frozen weight and bias
save only the weight, and ``relu`` (functional, method or module, in place or not) saves a boolean map of
``out <= 0`` (a quarter of a float32 map). The gradients are the same kernels on the same values as autograd's
(tests compare them bitwise). Everything else runs untouched.

Not applied: a convolution whose weight or bias trains, string padding ('same'), autocast (the cast copies it
inserts would have to be replayed; autocast already halves the saved bytes), a ReLU in place on a view or a leaf,
and code compiled by ``torch.compile`` (its partitioner decides what to save).
"""
from __future__ import annotations

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


def _sign_relu(inplace: bool | None, args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("input")
    if inplace is None:  # F.relu(input, inplace=False)
        inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
    if not isinstance(x, torch.Tensor) or not x.requires_grad or not x.is_floating_point():
        return None
    if inplace and (x.is_leaf or x._is_view()):
        return None
    return SignReLU.apply(x, inplace)


class LeanGraph(TorchFunctionMode):
    """``with LeanGraph(): loss = f(model(x))``: frozen convolutions and ReLUs save only what their gradient needs.

    Enter it around the forward only (it is consulted on every torch call inside). Under ``torch.compile``
    tracing it steps aside.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            result = None
            if func in _CONVOLUTIONS:
                result = _frozen_convolution(func, _CONVOLUTIONS[func], args, kwargs)
            elif func in _RELUS:
                result = _sign_relu(_RELUS[func], args, kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)
