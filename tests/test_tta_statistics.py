"""norm and alpha_bn against hand computations; every BatchNorm flavour."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import tta
from tests.tta_nets import conv3d_net, conv_net, mlp_bn1d


def _source_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_alpha_one_is_exactly_the_source_model():
    model = conv_net()
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    expected = _source_logits(model, x)
    adapted = tta.adapt(model, "alpha_bn", alpha=1.0)
    assert torch.equal(adapted(x), expected)
    assert torch.equal(tta.adapt(adapted.release(), "source")(x), expected)


def test_alpha_zero_is_exactly_norm():
    model = conv_net()
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    with_norm = tta.adapt(model, "norm")
    expected = with_norm(x)
    alpha_zero = tta.adapt(with_norm.release(), "alpha_bn", alpha=0.0)
    assert torch.equal(alpha_zero(x), expected)


def test_norm_equals_train_mode_batchnorm():
    """Test-time BN = BatchNorm in training mode (biased batch variance), without touching running stats."""
    model = conv_net()
    x = torch.randn(10, 3, 8, 8)
    reference = conv_net().train()
    with torch.no_grad():
        expected = reference(x)
    running_before = model[1].running_mean.clone()
    got = tta.adapt(model, "norm")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(model[1].running_mean, running_before)


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.0, 1.0), batch=st.integers(2, 6), seed=st.integers(0, 1000))
def test_alpha_bn_matches_hand_computation_on_one_layer(alpha, batch, seed):
    bn = nn.BatchNorm2d(3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, generator=g))
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.2)
        bn.weight.copy_(torch.randn(3, generator=g))
        bn.bias.copy_(torch.randn(3, generator=g))
    x = torch.randn(batch, 3, 4, 5, generator=g) * 3 + 1
    xs = x.double().numpy()
    mu_t = xs.mean(axis=(0, 2, 3))
    var_t = xs.var(axis=(0, 2, 3))  # biased
    mu = alpha * bn.running_mean.double().numpy() + (1 - alpha) * mu_t
    var = alpha * bn.running_var.double().numpy() + (1 - alpha) * var_t
    c = (slice(None), None, None)
    expected = (xs - mu[c]) / np.sqrt(var[c] + bn.eps) * bn.weight.detach().double().numpy()[c] \
        + bn.bias.detach().double().numpy()[c]
    got = tta.adapt(nn.Sequential(bn), "alpha_bn", alpha=alpha, check_inputs=False)(x)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make, shape", [(mlp_bn1d, (6, 5)), (conv3d_net, (4, 2, 3, 4, 4))])
def test_batchnorm_1d_and_3d(make, shape):
    x = torch.randn(*shape)
    model = make()
    expected_source = _source_logits(model, x)
    assert torch.equal(tta.adapt(model, "alpha_bn", alpha=1.0)(x), expected_source)
    model = make()
    reference = make().train()
    with torch.no_grad():
        expected_norm = reference(x)
    torch.testing.assert_close(tta.adapt(model, "norm")(x), expected_norm, rtol=1e-5, atol=1e-6)


def test_batch_of_one_alpha_bn_works_and_matches_the_mixture():
    model = conv_net()
    x = torch.randn(1, 3, 8, 8)
    out = tta.adapt(model, "alpha_bn", alpha=0.5)(x)
    assert out.shape == (1, 4) and torch.isfinite(out).all()


def test_forward_only_methods_build_no_graph():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    for method in ("source", "norm", "alpha_bn"):
        model = conv_net()
        out = tta.adapt(model, method)(x)
        assert out.grad_fn is None and not out.requires_grad


def test_state_dict_keys_are_unchanged_while_adapted():
    model = conv_net()
    keys = list(model.state_dict())
    adapted = tta.adapt(model, "tent")
    assert list(adapted.model.state_dict()) == keys
    assert [k.removeprefix("model.") for k in adapted.state_dict() if k != "_extra_state"] == keys


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("with_grad", [False, True])
def test_the_plain_mixed_batch_norm_matches_float64_with_and_without_gradients(alpha, with_grad):
    """tta.norm_layers.mixed_batch_norm (the default path): each branch against the layer's definition in float64,
    and its gradients against autograd through that definition."""
    from tta.norm_layers import mixed_batch_norm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, 5, 5, generator=g) * 2 + 1
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    running_mean, running_var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5

    def definition(x, weight, bias):
        dims = [0, 2, 3]
        mean = alpha * running_mean.double() + (1 - alpha) * x.mean(dims)
        var = alpha * running_var.double() + (1 - alpha) * x.var(dims, correction=0)
        shape = (1, -1, 1, 1)
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * weight.view(shape) + bias.view(shape)

    inputs = [t.clone().requires_grad_(with_grad) for t in (x, weight, bias)]
    expected_inputs = [t.double().requires_grad_(with_grad) for t in (x, weight, bias)]
    with torch.set_grad_enabled(with_grad):
        y = mixed_batch_norm(inputs[0], inputs[1], inputs[2], running_mean, running_var, alpha, 1e-5)
        expected = definition(*expected_inputs)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    if with_grad:
        target = torch.randn(y.shape, generator=g)
        ours = torch.autograd.grad((y * target).sum(), inputs)
        theirs = torch.autograd.grad((expected * target.double()).sum(), expected_inputs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_the_plain_mixed_batch_norm_keeps_a_bfloat16_input_s_dtype():
    from tta.norm_layers import mixed_batch_norm

    x = torch.randn(8, 3, 4, 4).bfloat16().requires_grad_()
    weight = torch.ones(3, requires_grad=True)
    for alpha in (0.0, 0.5):
        y = mixed_batch_norm(x, weight, torch.zeros(3), torch.zeros(3), torch.ones(3), alpha, 1e-5)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert x.grad.dtype == torch.bfloat16
