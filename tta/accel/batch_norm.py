"""The ``batch_norm`` piece of :mod:`tta.accel`: :class:`tta.norm_layers.MixedBatchNorm`'s arithmetic on CPU, fast.

The plain path (:func:`tta.norm_layers.mixed_batch_norm`) is batch_norm's training mode for batch statistics and
``var_mean`` plus the written-out normalisation for mixed ones, differentiated by autograd. On CPU, ``var_mean`` over
(N, H, W) and the statistics pass of batch_norm's training kernel cost as much as a third of a ResNet-20 forward.
Here:

- statistics: per-channel sums and sums of squares in one pass of a small C kernel
  (:mod:`tta.accel.channel_moments`), or, where it is off, over contiguous rows with PyTorch's float32 sums (about
  5x faster than ``var_mean`` on CPU). ``E[x^2] - E[x]^2`` loses precision when a channel's mean is large against its
  spread, so any layer with ``mean^2 > 1e3 * var`` in some channel (relative error of float32 sums above ~1e-4), or
  with an overflowing sum, is recomputed with PyTorch's (Welford) kernel ``torch.batch_norm_update_stats``. Other
  layouts use that kernel directly.
- normalisation: batch_norm's one-pass eval kernel with the mixed statistics, for every alpha.
- gradient (tent, core, cafa): one autograd Function with a hand-written backward. For alpha = 0 it is
  batch_norm's own training-mode backward; for alpha > 0 it is the eval-mode backward's sums plus the closed-form
  term through the (1 - alpha)-weighted batch mean and variance (derivation in
  :meth:`MixedBatchNormFunction.backward`), its elementwise part one pass of a C kernel, or one eval-kernel pass and
  one in-place pass.

Under ``torch.compile`` the plain formulation is traced instead: Inductor fuses it on its own, and the conditioning
check would break the graph. Only double backward is lost (the backward is ``once_differentiable``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tta.accel import channel_moments, kernels
from tta.accel.lean_graph import outside_lean_graph
from tta.norm_layers import mix_statistics as _mix
from tta.norm_layers import mixed_batch_norm as plain_mixed_batch_norm

#: A channel whose squared mean exceeds this multiple of its variance has its statistics recomputed with the
#: native kernel: float32 ``E[x^2] - E[x]^2`` has a relative error of about 6e-8 * (1 + mean^2 / var).
CONDITION_LIMIT = 1e3


def _statistics_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def native_batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance from batch_norm's own statistics kernel (Welford), any layout."""
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    dtype = _statistics_dtype(x)
    return mean.to(dtype), var.to(dtype)


def _sum_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance from one pass of float32 (or wider) sums over a contiguous (N, C, ...) tensor."""
    n, c = x.shape[:2]
    rows = x.reshape(n, c, -1)
    count = n * rows.shape[-1]
    dtype = _statistics_dtype(x)
    mean = rows.sum(-1, dtype=dtype).sum(0) / count
    mean_square = torch.linalg.vector_norm(rows, dim=-1, dtype=dtype).square().sum(0) / count
    return mean, (mean_square - mean * mean).clamp_min(0.0)


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a (N, C, *) batch (float32 or wider), without gradient.

    On CPU, float32 and bfloat16 maps (contiguous or channels-last) go to the one-pass C kernel of
    :mod:`tta.accel.channel_moments` when the ``kernels`` piece is on. Without it, contiguous float32 and float64
    maps take two passes of float32 (or wider) sums, and bfloat16/float16 maps (autocast) the native kernel, which reads them directly
    where the sums would first widen every element (3.5 ms against 0.9 ms at (200, 16, 32, 32), one thread).
    Ill-conditioned layers (see ``CONDITION_LIMIT``) go to the native kernel.
    """
    moments = channel_moments.channel_moments(x, CONDITION_LIMIT)
    if moments is not None:  # the one-pass C kernel
        mean, var, well_conditioned = moments
        return (mean, var) if well_conditioned else native_batch_statistics(x)
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous() and x.dim() >= 2
            and x.numel() > 0):
        mean, var = _sum_statistics(x)
        well_conditioned = bool(torch.all((mean * mean <= CONDITION_LIMIT * var) & torch.isfinite(var)))
        if well_conditioned:
            return mean, var
    return native_batch_statistics(x)


def _native_affine_plus_scaled(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor,
                               s: torch.Tensor) -> torch.Tensor | None:
    """``a * x + b + s * g`` in one pass of the C kernel (``csrc/affine_plus_scaled.c``): float32 CPU maps x and
    g of one layout, in the layouts the statistics kernel takes (:func:`tta.accel.channel_moments.layout`: rows of at
    least 16 positions, or channels last). None where it does not apply or the kernels are off."""
    lib = kernels.active_library()
    kind = channel_moments.layout(x)
    if lib is None or kind is None or x.dtype != torch.float32 or g.dtype != torch.float32 or g.shape != x.shape \
            or g.stride() != x.stride():
        return None
    n, c = x.shape[:2]
    a, b, s = (v.to(torch.float32).contiguous() for v in (a, b, s))
    out = torch.empty_like(x)
    threads = torch.get_num_threads()
    if kind == "rows":
        lib.tta_affine_plus_scaled_f32(x.data_ptr(), g.data_ptr(), a.data_ptr(), b.data_ptr(), s.data_ptr(),
                                       out.data_ptr(), n, c, x.numel() // (n * c), threads)
    else:  # channels last, or a (N, C) batch: (positions, C) rows
        lib.tta_affine_plus_scaled_cl_f32(x.data_ptr(), g.data_ptr(), a.data_ptr(), b.data_ptr(), s.data_ptr(),
                                          out.data_ptr(), x.numel() // c, c, threads)
    return out


def _affine_plus_scaled(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor,
                        s: torch.Tensor) -> torch.Tensor:
    """``a * x + b + s * g`` with per-channel vectors a, b, s (the x-gradient of the alpha > 0 backward).

    float32 on CPU: one pass of a C kernel (:func:`_native_affine_plus_scaled`). Otherwise on CPU the per-channel
    affine map ``a * x + b`` is batch_norm's eval kernel (mean 0, variance 1, eps 0: its scale is exactly ``a``,
    its shift exactly ``b``), and ``s * g`` is added in place. A broadcast per-channel
    addend makes ``addcmul`` slow on CPU; the whole alpha > 0 backward over ResNet-20's 21 layer shapes at batch
    200 (one thread) took 158 ms with two ``addcmul`` and takes 115 ms so (the training-mode backward: 101 ms),
    with the same values to rounding. Elsewhere the two ``addcmul``.
    """
    out = _native_affine_plus_scaled(x, a, b, g, s)
    if out is not None:
        return out
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dtype = x.dtype
    if x.device.type == "cpu":
        out = F.batch_norm(x, torch.zeros_like(a), torch.ones_like(a), a, b, False, 0.0, 0.0)
        return out.addcmul_(g, s.to(dtype).view(shape))
    return torch.addcmul(torch.addcmul(b.to(dtype).view(shape), x, a.to(dtype).view(shape)), g,
                         s.to(dtype).view(shape))


class MixedBatchNormFunction(torch.autograd.Function):
    """``y = w (x - m) / sqrt(v + eps) + b`` with ``m, v = alpha * source + (1 - alpha) * batch statistics``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, alpha: float, eps: float):  # type: ignore[override]
        batch_mean, batch_var = batch_statistics(x)
        alpha = 0.0 if running_mean is None else alpha
        mean, var = _mix(alpha, running_mean, batch_mean), _mix(alpha, running_var, batch_var)
        ctx.save_for_backward(x, weight, batch_mean, mean, var)
        ctx.alpha, ctx.eps = alpha, eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        """Gradients for x, weight and bias.

        With ``xhat = (x - m) r``, ``r = (v + eps)^(-1/2)``, ``S_g = sum g`` and ``S_gx = sum g xhat`` per channel
        over the n = N*H*W positions: ``dw = S_gx``, ``db = S_g``, and since ``dm/dx_i = (1 - alpha) / n`` and
        ``dv/dx_i = 2 (1 - alpha) (x_i - mean_batch) / n``,
        ``dx_i = w r g_i - (1 - alpha) w r S_g / n - (1 - alpha) w r^2 S_gx (x_i - mean_batch) / n``.
        """
        x, weight, batch_mean, mean, var = ctx.saved_tensors
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        grad = grad.contiguous(memory_format=layout)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.alpha == 0.0:  # batch statistics only: exactly batch_norm's training-mode backward
            invstd = torch.rsqrt(var + ctx.eps)
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, None, None, mean, invstd, True, ctx.eps, [need_x, need_w, need_b])
            return gx, gw if need_w else None, gb if need_b else None, None, None, None, None
        # Eval-mode backward with the mixed statistics gives S_gx and S_g (the weight and bias gradients).
        _, s_gx, s_g = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, mean, var, None, None, False, ctx.eps, [False, True, True])
        gx = None
        if need_x:
            n = x.numel() // x.shape[1]
            r = torch.rsqrt(var + ctx.eps)
            scale = r if weight is None else weight * r
            through_var = -(1.0 - ctx.alpha) * scale * r * s_gx / n
            through_mean = -(1.0 - ctx.alpha) * scale * s_g / n - through_var * batch_mean
            gx = _affine_plus_scaled(x, through_var, through_mean, grad, scale)
        return gx, s_gx if need_w else None, s_g if need_b else None, None, None, None, None


def mixed_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                     alpha: float, eps: float) -> torch.Tensor:
    """Normalise x with ``alpha * source + (1 - alpha) * batch`` statistics (alpha: the weight of the SOURCE); the
    same values as :func:`tta.norm_layers.mixed_batch_norm` to rounding, and its gradients."""
    if torch.compiler.is_compiling():
        return plain_mixed_batch_norm(x, weight, bias, running_mean, running_var, alpha, eps)
    with outside_lean_graph():
        if torch.is_grad_enabled() and (x.requires_grad
                                        or any(t is not None and t.requires_grad for t in (weight, bias))):
            return MixedBatchNormFunction.apply(x, weight, bias, running_mean, running_var, alpha, eps)
        mean, var = batch_statistics(x)
        alpha = 0.0 if running_mean is None else alpha
        mean, var = _mix(alpha, running_mean, mean), _mix(alpha, running_var, var)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
