"""MixedBatchNorm's fast arithmetic (tta.accel.batch_norm) against float64 hand computations, autograd's gradcheck and
the plain path (tta.norm_layers.mixed_batch_norm)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tta
from tta.accel.batch_norm import (CONDITION_LIMIT, MixedBatchNormFunction, _affine_plus_scaled,
                                  _native_affine_plus_scaled, batch_statistics, mixed_batch_norm,
                                  native_batch_statistics)
from tta.norm_layers import mixed_batch_norm as plain_mixed_batch_norm


@pytest.fixture(autouse=True)
def kernels_on():
    """The kernels and fast BatchNorm of tta.accel on (the tensor cache stays off: it is process-wide)."""
    tta.accel.enable(tensor_cache=False)
    yield
    tta.accel.disable()


def float64_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = x.mean(1)
    return mean, ((x - mean[:, None]) ** 2).mean(1)


def by_hand(x, weight, bias, running_mean, running_var, alpha, eps):
    """The layer's definition in float64, written out."""
    mean_t, var_t = float64_statistics(x)
    mean = alpha * running_mean.double() + (1 - alpha) * mean_t
    var = alpha * running_var.double() + (1 - alpha) * var_t
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x.double() - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    return y * weight.double().view(shape) + bias.double().view(shape)


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (6, 4, 5, 7), (3, 2, 3, 4, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_match_float64(shape, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 2
    if channels_last and len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    mean, var = batch_statistics(x)
    ref_mean, ref_var = float64_statistics(x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)
    assert mean.dtype == var.dtype == torch.float32


def test_large_mean_small_spread_falls_back_to_the_exact_kernel():
    """mean 100, std 0.01: float32 sums of squares lose every digit of the variance; the result must not."""
    torch.manual_seed(0)
    x = torch.randn(64, 4, 8, 8) * 0.01 + 100.0
    _, var = batch_statistics(x)
    _, ref_var = float64_statistics(x)
    assert torch.allclose(var.double(), ref_var, rtol=1e-3)
    # The fast sums alone would be wrong by orders of magnitude here: the check is what saves it.
    from tta.accel.batch_norm import _sum_statistics
    _, fast_var = _sum_statistics(x)
    assert (100.0 ** 2 > CONDITION_LIMIT * ref_var).all()
    assert not torch.allclose(fast_var.double(), ref_var, rtol=1e-1)


def test_constant_and_overflowing_channels():
    x = torch.full((4, 2, 3, 3), 7.0)
    x[:, 1] = 1e20  # x^2 overflows float32; the variance is 0
    mean, var = batch_statistics(x)
    assert torch.equal(var, torch.zeros(2)) and torch.equal(mean, torch.tensor([7.0, 1e20]))


def test_native_statistics_are_biased_variance():
    x = torch.randn(5, 3, 4, 4)
    mean, var = native_batch_statistics(x)
    ref_mean, ref_var = float64_statistics(x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)


def _layer(c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=g, dtype=dtype).requires_grad_()
    running_mean = torch.randn(c, generator=g, dtype=dtype)
    running_var = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return weight, bias, running_mean, running_var


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.999])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(alpha, channels_last):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 3, 5, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight, bias, running_mean, running_var = _layer(3)
    assert torch.autograd.gradcheck(
        lambda x, w, b: MixedBatchNormFunction.apply(x, w, b, running_mean, running_var, alpha, 1e-5),
        (x, weight, bias))


@given(alpha=st.sampled_from([0.0, 0.25, 0.5, 0.9]), n=st.integers(2, 9), c=st.integers(1, 5),
       spatial=st.sampled_from([(), (3,), (2, 3), (2, 2, 2)]), seed=st.integers(0, 2 ** 16))
@settings(max_examples=40, deadline=None)
def test_forward_and_gradients_equal_the_plain_formulation(alpha, n, c, spatial, seed):
    """Outputs and all three gradients of the fast path equal autograd through the written-out formula."""
    torch.manual_seed(seed)
    x = (torch.randn(n, c, *spatial, dtype=torch.float64) * 2 + 1).requires_grad_()
    weight, bias, running_mean, running_var = _layer(c, seed=seed)
    target = torch.randn(n, c, *spatial, dtype=torch.float64)
    grads = []
    for fn in (mixed_batch_norm, plain_mixed_batch_norm):
        y = fn(x, weight, bias, running_mean, running_var, alpha, 1e-5)
        loss = (y * target).sum() + (y ** 2).sum()
        grads.append((y.detach(), *torch.autograd.grad(loss, (x, weight, bias))))
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[0][0], by_hand(x.detach(), weight, bias, running_mean, running_var, alpha, 1e-5),
                               rtol=1e-9, atol=1e-9)


def test_without_gradients_it_is_the_eval_kernel_with_mixed_statistics():
    torch.manual_seed(2)
    x = torch.randn(16, 4, 6, 6)
    weight, bias, running_mean, running_var = (t.detach().float() for t in _layer(4))
    with torch.no_grad():
        y = mixed_batch_norm(x, weight, bias, running_mean, running_var, 0.4, 1e-5)
    mean, var = batch_statistics(x)
    expected = F.batch_norm(x, 0.4 * running_mean + 0.6 * mean, 0.4 * running_var + 0.6 * var, weight, bias,
                            False, 0.0, 1e-5)
    assert torch.equal(y, expected)
    torch.testing.assert_close(y.double(), by_hand(x, weight, bias, running_mean, running_var, 0.4, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_alpha_zero_gradient_is_batch_norms_own_training_gradient():
    torch.manual_seed(3)
    x = torch.randn(8, 3, 5, 5, requires_grad=True)
    weight, bias, running_mean, running_var = (t.detach().float().requires_grad_() for t in _layer(3))
    target = torch.randn(8, 3, 5, 5)
    ours = torch.autograd.grad((mixed_batch_norm(x, weight, bias, running_mean, running_var, 0.0, 1e-5)
                                * target).sum(), (x, weight, bias))
    theirs = torch.autograd.grad((F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5) * target).sum(),
                                 (x, weight, bias))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_affine_parameters():
    torch.manual_seed(4)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    _, _, running_mean, running_var = _layer(3)
    assert torch.autograd.gradcheck(
        lambda x: MixedBatchNormFunction.apply(x, None, None, running_mean, running_var, 0.5, 1e-5), (x,))


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics():
    torch.manual_seed(5)
    x = torch.randn(8, 3, 4, 4).bfloat16().requires_grad_()
    weight, bias, running_mean, running_var = (t.detach().float().requires_grad_() for t in _layer(3))
    y = mixed_batch_norm(x, weight, bias, running_mean, running_var, 0.5, 1e-5)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), by_hand(x.detach().float(), weight, bias, running_mean, running_var, 0.5,
                                                   1e-5), rtol=2e-2, atol=2e-2)


def test_reduced_precision_statistics_are_read_as_they_are():
    """Under autocast the maps are bfloat16/float16: widening them for float32 sums cost 4x the native kernel, which
    reads them as they are. float16, and bfloat16 with short rows, take the native kernel (exactly its statistics);
    bfloat16 with rows of 128 or more the one-pass C kernel where it is built (it widens each element exactly in
    registers), at least as close to float64 as native."""
    for x in ((torch.randn(16, 4, 8, 8) * 3 + 1).to(torch.float16), (torch.randn(16, 4, 8, 8) * 3 + 1).bfloat16()):
        mean, var = batch_statistics(x)
        native_mean, native_var = native_batch_statistics(x)
        assert mean.dtype == var.dtype == torch.float32
        assert torch.equal(mean, native_mean) and torch.equal(var, native_var)
    xb = (torch.randn(16, 4, 8, 16) * 3 + 1).to(torch.bfloat16)
    mean, var = batch_statistics(xb)
    ref_mean, ref_var = float64_statistics(xb)
    native_mean, native_var = native_batch_statistics(xb)
    assert mean.dtype == var.dtype == torch.float32
    assert (var.double() - ref_var).abs().max() <= max((native_var.double() - ref_var).abs().max().item(), 1e-6)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_elementwise_part_is_the_per_channel_formula(dtype, channels_last):
    """``a x + b + s g`` through the eval kernel (mean 0, variance 1, eps 0) and an in-place addcmul: the written-out
    per-channel formula, in the input's dtype and layout (a float32/64 ulp; bfloat16: its own rounding)."""
    torch.manual_seed(0)
    x, g = (torch.randn(5, 3, 4, 6).to(dtype) for _ in range(2))
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    wide = torch.promote_types(dtype, torch.float32)
    a, b, s = (torch.randn(3, dtype=wide) for _ in range(3))
    out = _affine_plus_scaled(x, a, b, g, s)
    view = (1, 3, 1, 1)
    expected = a.view(view) * x.to(wide) + b.view(view) + s.view(view) * g.to(wide)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    tolerance = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.to(wide), expected, rtol=tolerance, atol=tolerance * 4)


@pytest.mark.parametrize("channels_last", [False, True, "2d"])
def test_backward_elementwise_pass_in_c_matches_pytorch_s_two_passes(monkeypatch, channels_last):
    """The one-pass C kernel (float32) against the eval kernel + addcmul path, to a float32 ulp or two; other
    layouts of the gradient (strides unlike x's) take the PyTorch passes."""
    from tta.accel import kernels as native
    if native.library() is None:
        pytest.skip(f"C kernels not built: {native.status()}")
    g = torch.Generator().manual_seed(1)
    shape = (40, 8) if channels_last == "2d" else (4, 8, 5, 7)  # 2d: BatchNorm1d's (N, C)
    x, grad = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    if channels_last is True:
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    a, b, s = (torch.randn(8, generator=g) for _ in range(3))
    fused = _affine_plus_scaled(x, a, b, grad, s)
    assert fused is not None and fused.stride() == x.stride()
    monkeypatch.setattr(native, "library", lambda: None)
    two_passes = _affine_plus_scaled(x, a, b, grad, s)
    torch.testing.assert_close(fused, two_passes, rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    other_strides = grad.t().contiguous().t() if x.dim() == 2 else grad.transpose(2, 3).contiguous().transpose(2, 3)
    assert other_strides.stride() != x.stride() and _native_affine_plus_scaled(x, a, b, other_strides, s) is None


def test_backward_elementwise_pass_leaves_short_rows_to_pytorch():
    """Contiguous maps with rows of fewer than 16 positions (a call per row would be slow) take PyTorch's passes."""
    x, g = torch.randn(4, 8, 3, 5), torch.randn(4, 8, 3, 5)
    a, b, s = torch.randn(8), torch.randn(8), torch.randn(8)
    assert _native_affine_plus_scaled(x, a, b, g, s) is None
    torch.testing.assert_close(_affine_plus_scaled(x, a, b, g, s),
                               a.view(1, 8, 1, 1) * x + b.view(1, 8, 1, 1) + s.view(1, 8, 1, 1) * g)
