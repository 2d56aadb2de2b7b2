"""rdumb: eta with a full reset to the source every ``reset_every`` steps. By hand: the reset happens after exactly
N steps (skipped ones included) and the adapter then behaves as a fresh one; and the reference's outputs
(tests/golden/rdumb.json, written by benchmarks/golden/rdumb.py from MD at 8b2ed63)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tta
from tests.test_method_eta import recipe_batches, recipe_model
from tests.tta_nets import assert_same_state, conv_net, full_state

GOLDEN = json.loads((Path(__file__).parent / "golden" / "rdumb.json").read_text())
RECIPE = GOLDEN["recipe"]
NORM_PARAMS = {"1.weight", "1.bias", "4.weight", "4.bias"}
OPEN = {"margin_e0": 1.05, "d_margin": 1.5}


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def batches(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_matches_the_reference_outputs(case):
    values = GOLDEN["cases"][case]
    model = recipe_model(RECIPE)
    adapted = tta.adapt(model, "rdumb", **values["options"])
    for x, logits, counts in zip(recipe_batches(RECIPE), values["logits"], values["counts"]):
        torch.testing.assert_close(adapted(x), f64(logits), rtol=0, atol=1e-10)
        assert [adapted.reliable_samples, adapted.selected_samples] == counts
    assert adapted.resets > 0
    for name in NORM_PARAMS:
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), f64(values["params"][name]),
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_reset_after_exactly_n_updates_then_behaves_as_a_fresh_adapter(every):
    xs = batches(2 * every + 1)
    model = conv_net()
    source = full_state(model)
    rdumb = tta.adapt(model, "rdumb", reset_every=every, lr=0.05, **OPEN)
    eta = tta.adapt(conv_net(), "eta", lr=0.05, **OPEN)
    for i, x in enumerate(xs[:every]):  # before the reset: eta exactly
        assert torch.equal(rdumb(x), eta(x))
        if i < every - 1:
            assert rdumb.steps_since_reset == i + 1 and rdumb.resets == 0
            assert not torch.equal(full_state(model)["1.weight"], source["1.weight"])
    # the every-th update was taken, then everything went back to the source
    assert rdumb.resets == 1 and rdumb.steps_since_reset == 0 and rdumb.batches_seen == every
    assert_same_state(full_state(model), source)
    assert rdumb.optimizer.state_dict()["state"] == {} and rdumb.probs_average is None
    assert rdumb.selected_samples == 8 * every  # the run counters go on
    fresh = tta.adapt(conv_net(), "eta", lr=0.05, **OPEN)
    for x in xs[every:2 * every]:
        assert torch.equal(rdumb(x), fresh(x))
    assert rdumb.resets == 2
    assert torch.equal(rdumb(xs[-1]), tta.adapt(conv_net(), "eta", lr=0.05, **OPEN)(xs[-1]))


def test_a_reset_between_the_steps_of_a_batch_lets_the_rest_start_from_the_source():
    xs = batches(3)
    rdumb = tta.adapt(conv_net(), "rdumb", reset_every=3, steps=2, lr=0.05, **OPEN)
    rdumb(xs[0])  # steps 1, 2
    logits = rdumb(xs[1])  # step 3 (then the reset), step 4 from the source
    assert rdumb.resets == 1 and rdumb.steps_since_reset == 1
    fresh = tta.adapt(conv_net(), "eta", steps=1, lr=0.05, **OPEN)
    assert torch.equal(logits, fresh(xs[1]))  # the last forward of the batch is the source's
    assert_same_state(full_state(rdumb.model), full_state(fresh.model))
    assert torch.equal(rdumb.probs_average, fresh.probs_average)


def test_steps_without_an_update_count_towards_the_reset():
    model = conv_net()
    rdumb = tta.adapt(model, "rdumb", reset_every=2, lr=0.05, margin_e0=1e-6)  # nothing is ever selected
    for x in batches(5):
        rdumb(x)
    assert rdumb.skipped_steps == 5 and rdumb.resets == 2 and rdumb.steps_since_reset == 1


def test_reset_restores_everything_and_the_counter_travels_in_the_state_dict():
    xs = batches(6)
    model = conv_net()
    source = full_state(model)
    rdumb = tta.adapt(model, "rdumb", reset_every=4, lr=0.05, **OPEN)
    for x in xs[:5]:
        rdumb(x)
    assert (rdumb.resets, rdumb.steps_since_reset) == (1, 1)
    other = tta.adapt(conv_net(), "rdumb", reset_every=4, lr=0.05, **OPEN)
    other.load_state_dict(rdumb.state_dict())
    assert (other.resets, other.steps_since_reset) == (1, 1)
    assert torch.equal(other.probs_average, rdumb.probs_average)
    for x in xs[5:]:
        assert torch.equal(other(x), rdumb(x))
    rdumb.reset()
    assert_same_state(full_state(model), source)
    assert (rdumb.resets, rdumb.steps_since_reset, rdumb.batches_seen, rdumb.selected_samples) == (0, 0, 0, 0)
    assert rdumb.probs_average is None and rdumb.optimizer.state_dict()["state"] == {}
    fresh = tta.adapt(conv_net(), "rdumb", reset_every=4, lr=0.05, **OPEN)
    for x in xs:
        assert torch.equal(rdumb(x), fresh(x))


def test_one_update_moves_exactly_the_norm_affine_parameters():
    model = conv_net()
    before = full_state(model)
    tta.adapt(model, "rdumb", lr=0.1, **OPEN)(batches(1)[0])
    after = full_state(model)
    assert {k for k in before if not torch.equal(before[k], after[k])} == NORM_PARAMS


def test_declarations_defaults_and_refusals():
    cls = tta.registry.method_class("rdumb")
    assert cls.updates == "norm affine" and cls.may_skip_update and cls.select_all_options == OPEN
    assert cls.source_data is None
    options = tta.method_options("rdumb")()
    assert (options.reset_every, options.margin_e0, options.d_margin, options.lr) == (1000, 0.4, 0.4, 1e-3)
    model = conv_net()
    state = full_state(model)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="reset_every must be a positive number of steps"):
            tta.adapt(model, "rdumb", reset_every=bad)
    assert_same_state(full_state(model), state)
    assert not any(type(m).__name__ == "MixedBatchNorm" for m in model.modules())
