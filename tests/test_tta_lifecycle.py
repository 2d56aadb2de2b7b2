"""reset(), release(), state_dict, frozen non-norm parameters, and bad input: behaviour against exact values."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import tta
from tests.method_cases import adapt_case, declared_parameters, method_class, trains
from tests.tta_nets import assert_same_state, conv_net, full_state, no_norm_net


def _adapt(method, model, **kw):
    """Adapt with the given options (those the method takes), its filters opened and its source data computed."""
    return adapt_case(method, model, **kw)


GRADIENT_METHODS = [m for m in tta.methods() if trains(m)]
ALL_METHODS = tta.methods()
BUILT_IN = ["source", "norm", "alpha_bn", "core", "cafa", "tent", "bn_ema", "eta", "eata", "sar", "cotta", "rotta",
            "lame", "roid", "deyo", "rdumb", "t3a", "shot_im", "memo"]


def test_registry_lists_the_built_in_methods_in_table_order():
    assert tta.methods() == BUILT_IN


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(GRADIENT_METHODS), updates=st.integers(1, 4), optimizer=st.sampled_from(["adam", "sgd"]),
       seed=st.integers(0, 50))
def test_reset_restores_parameters_buffers_and_optimizer_bitwise(method, updates, optimizer, seed):
    model = conv_net()
    source_state = full_state(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 8, 8, generator=g)
    adapted = _adapt(method, model, optimizer=optimizer, lr=0.05)
    assert adapted.optimizer.state_dict()["state"] == {}
    first = adapted(x)
    for _ in range(updates):
        adapted(torch.randn(8, 3, 8, 8, generator=g))
    moved = any(not torch.equal(value, source_state[key]) for key, value in full_state(model).items())
    assert moved or method_class(method).episodic_by_design
    adapted.reset()
    assert_same_state(full_state(model), source_state)
    assert adapted.optimizer.state_dict()["state"] == {}
    assert adapted.batches_seen == 0
    # after reset, the adapter behaves exactly as a fresh one: same first output
    assert torch.equal(adapted(x), first)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_an_update_moves_only_the_declared_parameters(method):
    model = conv_net()
    declared = declared_parameters(method, model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    adapted = _adapt(method, model, lr=0.1)
    for _ in range(3):
        adapted(torch.randn(8, 3, 8, 8))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed, f"{method} changed no parameter"
    assert changed <= declared, f"{method} changed {sorted(changed - declared)}, not declared ({adapted.updates})"
    if adapted.updates == "norm affine":
        assert changed == declared


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_no_gradient_is_left_on_the_parameters_after_a_batch(method):
    model = conv_net()
    adapted = _adapt(method, model, lr=0.1)
    adapted(torch.randn(8, 3, 8, 8))
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []


@pytest.mark.parametrize("method", ALL_METHODS)
def test_release_gives_back_the_model_exactly(method):
    model = conv_net().train()
    model[0].weight.requires_grad_(True)
    model[-1].bias.requires_grad_(False)
    state = full_state(model)
    types = [type(m) for m in model.modules()]
    adapted = _adapt(method, model)
    adapted(torch.randn(8, 3, 8, 8))
    returned = adapted.release()
    assert returned is model
    assert [type(m) for m in model.modules()] == types
    assert_same_state(full_state(model), state)
    assert model.training and all(m.training for m in model.modules())
    assert model[0].weight.requires_grad and not model[-1].bias.requires_grad
    with pytest.raises(RuntimeError, match="released"):
        adapted(torch.randn(8, 3, 8, 8))


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(4)]
    a = tta.adapt(conv_net(), "tent", lr=0.05)
    for x in batches[:2]:
        a(x)
    saved = a.state_dict()
    b = tta.adapt(conv_net(), "tent", lr=0.05)
    b.load_state_dict(saved)
    assert b.batches_seen == 2
    for x in batches[2:]:
        assert torch.equal(a(x), b(x))


def test_adapt_errors_name_the_method_and_what_it_needs():
    with pytest.raises(ValueError, match="'tent' trains norm affine parameters, but this model has none.*no normalisation layers"):
        tta.adapt(no_norm_net(), "tent")
    with pytest.raises(ValueError, match="'norm'"):
        tta.adapt(no_norm_net(), "norm")
    assert tta.adapt(no_norm_net(), "source")(torch.randn(2, 3, 8, 8)).shape == (2, 2)
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        tta.adapt(conv_net(), "foo")
    with pytest.raises(TypeError, match="no option.*learning_rate"):
        tta.adapt(conv_net(), "tent", learning_rate=1)
    with pytest.raises(ValueError, match="not source-free"):
        tta.adapt(conv_net(), "cafa")
    with pytest.raises(ValueError, match="alpha"):
        tta.adapt(conv_net(), "alpha_bn", alpha=1.5)
    model = conv_net()
    tta.adapt(model, "norm")
    with pytest.raises(ValueError, match="already adapted"):
        tta.adapt(model, "tent")
    bn_no_affine = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False))
    with pytest.raises(ValueError, match="affine=False"):
        tta.adapt(bn_no_affine, "tent")


BAD_BATCHES = [
    (torch.full((4, 3, 8, 8), float("nan")), "NaN or Inf"),
    (torch.tensor([[[[float("inf")]]]]).expand(4, 3, 8, 8).clone(), "NaN or Inf"),
    (torch.empty(0, 3, 8, 8), "empty"),
    (torch.randn(3, 8, 8), "4 dimensions.*unsqueeze"),
    (torch.randn(2, 4, 3, 8, 8), "4 dimensions"),
    (torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), "floating-point"),
    (torch.randn(4, 3, 8, 8, dtype=torch.float64), "float32"),
]


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("batch, message", BAD_BATCHES)
def test_bad_batches_raise_before_anything_changes(method, batch, message):
    model = conv_net()
    adapted = _adapt(method, model, lr=0.05)
    adapted(torch.randn(8, 3, 8, 8))  # some adaptation has happened
    state = full_state(model)
    optimizer_state = repr(adapted.optimizer.state_dict()) if hasattr(adapted, "optimizer") else None
    seen = adapted.batches_seen
    with pytest.raises(ValueError, match=message):
        adapted(batch)
    assert_same_state(full_state(model), state)
    assert adapted.batches_seen == seen
    if optimizer_state is not None:
        assert repr(adapted.optimizer.state_dict()) == optimizer_state


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_batch_of_one_is_refused_exactly_where_batch_statistics_are_always_used(method):
    adapted = _adapt(method, conv_net(), alpha=0.5)
    if method_class(method).batch_statistics == "always":
        with pytest.raises(ValueError, match="batch of 1"):
            adapted(torch.randn(1, 3, 8, 8))
        assert adapted.batches_seen == 0
    else:
        out = adapted(torch.randn(1, 3, 8, 8))
        assert out.shape == (1, 4) and torch.isfinite(out).all()


def test_the_batch_of_one_error_points_to_alpha_bn():
    with pytest.raises(ValueError, match="batch of 1.*alpha_bn"):
        tta.adapt(conv_net(), "tent")(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="batch of 1"):
        tta.adapt(conv_net(), "alpha_bn", alpha=0.0)(torch.randn(1, 3, 8, 8))


def test_episodic_resets_before_every_batch():
    x, other = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    episodic = tta.adapt(conv_net(), "tent", episodic=True, lr=0.1)
    first = episodic(x)
    episodic(other)
    assert torch.equal(episodic(x), first)


def test_gradient_methods_refuse_inference_mode_but_work_under_no_grad():
    adapted = tta.adapt(conv_net(), "tent")
    with torch.no_grad():
        before = adapted.model[1].weight.clone()
        adapted(torch.randn(8, 3, 8, 8))
        assert not torch.equal(before, adapted.model[1].weight)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        adapted(torch.randn(8, 3, 8, 8))


def test_finite_values_whose_sum_overflows_are_accepted():
    x = torch.full((4, 3, 8, 8), 60000.0, dtype=torch.float16)  # each value finite, their float16 sum is inf
    assert not torch.isfinite(x.sum())
    from tta.validation import check_batch

    check_batch(x, method="norm", ndim=4, dtype=torch.float16, needs_batch_statistics=True)  # no error
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_batch(x, method="norm", ndim=4, dtype=torch.float16, needs_batch_statistics=True)
