"""ReLU with a one-bit-per-element record of where it passed its input, and the gradient from that record
(``tta/accel/csrc/relu_mask.c``, built and loaded by :mod:`tta.accel.kernels`).

Why: the gradient of a ReLU needs only where its output is positive (or NaN), but autograd saves the whole
float32 output. One bit per element is 1/32 of it; PyTorch has no bit-packed comparison, and its boolean ops
(8 bits per element) are slower on CPU than the float ops they would replace. Used by :mod:`tta.accel.lean_graph`.

Float32 CPU tensors in a dense layout (contiguous, channels-last) only; :func:`applies` says whether a tensor
qualifies. Where the kernels are not built, :func:`applies` is False and callers keep autograd's ReLU.
"""
from __future__ import annotations

import torch

from tta.accel import kernels

#: The layouts in which a tensor's elements are dense in memory (what the kernels walk).
_LAYOUTS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def dense_layout(x: torch.Tensor) -> torch.memory_format | None:
    """The memory format in which ``x`` is dense (elements in memory order without gaps), or None."""
    for layout in _LAYOUTS:
        if (layout is torch.channels_last and x.dim() != 4) or (layout is torch.channels_last_3d and x.dim() != 5):
            continue
        if x.is_contiguous(memory_format=layout):
            return layout
    return None


def applies(x: torch.Tensor) -> bool:
    """Whether the bit kernels handle ``x``: a non-empty float32 CPU tensor in a dense layout, kernels built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0 and dense_layout(x) is not None
            and kernels.active_library() is not None)


def relu_with_bits(x: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), bits)``: bit k of ``bits[k // 8]`` is set where element k (in memory order) passed, i.e.
    ``not x <= 0``. ``inplace`` writes the result into ``x``. Requires :func:`applies`."""
    lib = kernels.active_library()
    out = x if inplace else torch.empty_like(x)  # empty_like keeps x's dense layout
    bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
    lib.tta_relu_bits_f32(x.data_ptr(), out.data_ptr(), bits.data_ptr(), x.numel(), torch.get_num_threads())
    return out, bits


def relu_grad_from_bits(grad: torch.Tensor, bits: torch.Tensor, shape: torch.Size,
                        stride: tuple[int, ...]) -> torch.Tensor:
    """The input gradient of the ReLU whose output had ``shape`` and ``stride``: ``grad`` where the bit is set,
    else 0 (``threshold_backward(grad, out, 0)``). ``grad`` is first laid out as that output was."""
    lib = kernels.active_library()
    if grad.dtype != torch.float32:
        grad = grad.float()
    if tuple(grad.stride()) != tuple(stride) or grad.device.type != "cpu":
        grad = torch.empty_strided(shape, stride, dtype=torch.float32).copy_(grad)
    out = torch.empty_strided(shape, stride, dtype=torch.float32)
    lib.tta_relu_grad_f32(grad.data_ptr(), bits.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads())
    return out
