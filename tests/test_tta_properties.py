"""Property-based checks for every method: any batch either works or raises a documented ValueError, and after
any sequence of calls and errors reset() restores the source state bitwise."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import tta
from tests.method_cases import adapt_case, methods_where
from tests.tta_nets import assert_same_state, conv_net, full_state

METHODS = tta.methods()
DOCUMENTED = ("NaN or Inf", "empty", "dimensions", "floating-point", "cast with", "batch of 1")
# Methods whose step minimises ``loss(x, logits)`` and that declare they may leave a batch without an update
# (rotta's loss is on its memory bank; its own tests cover it).
SKIPPING = methods_where(lambda cls: cls.may_skip_update and issubclass(cls, tta.GradientAdapter)
                         and cls.loss is not tta.GradientAdapter.loss)


def _adapt(method):
    return adapt_case(method, conv_net(), lr=0.05)


@st.composite
def batches(draw):
    n = draw(st.integers(0, 64))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.float64, torch.uint8]))
    kind = draw(st.sampled_from(["normal", "constant", "huge", "tiny", "nan", "inf", "wrong_dims"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    x = torch.rand(n, 3, 8, 8, generator=g)
    if kind == "constant":
        x = torch.full_like(x, draw(st.floats(-1e3, 1e3, allow_nan=False)))
    elif kind == "huge":
        x = x * 1e30
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "nan" and n:
        x[draw(st.integers(0, n - 1))] = float("nan")
    elif kind == "inf" and n:
        x[draw(st.integers(0, n - 1)), 0, 0, 0] = float("inf")
    elif kind == "wrong_dims":
        x = x.flatten(1)
    x = (x * 255).to(dtype) if dtype == torch.uint8 else x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "view"]))
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "view" and x.dim() == 4 and x.shape[-1] > 1:
        x = torch.cat([x, x], dim=3)[..., ::2]  # a non-contiguous strided view with the same values
    return x


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS), sequence=st.lists(batches(), min_size=1, max_size=5))
def test_any_batch_works_or_raises_a_documented_error_and_reset_restores(method, sequence):
    adapted = _adapt(method)
    source = full_state(adapted.model)
    for x in sequence:
        before = full_state(adapted.model)
        try:
            logits = adapted(x)
        except ValueError as error:
            assert any(text in str(error) for text in DOCUMENTED), str(error)
            assert_same_state(full_state(adapted.model), before)  # an error changes nothing
            continue
        assert logits.shape == (x.shape[0], 4)
        for name, value in full_state(adapted.model).items():
            assert torch.isfinite(value).all(), f"{name} became non-finite"
    adapted.reset()
    assert_same_state(full_state(adapted.model), source)


@pytest.mark.parametrize("method", SKIPPING)
def test_a_step_with_a_non_finite_loss_is_skipped(method):
    adapted = _adapt(method)
    before = full_state(adapted.model)
    loss = adapted.loss
    adapted.loss = lambda x, logits: loss(x, logits) * float("nan")  # e.g. a batch that overflows the network
    logits = adapted(torch.rand(8, 3, 8, 8))
    assert logits.shape == (8, 4)
    assert adapted.skipped_steps in (1, 8)  # one step per batch, or one per image (memo)
    assert_same_state(full_state(adapted.model), before)
    assert adapted.optimizer.state_dict()["state"] == {}
