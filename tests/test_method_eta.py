"""eta (EATA without the Fisher term): filters, weights, the moving average, skipped steps, reset, and the
reference's outputs (tests/golden/eta.json, written by benchmarks/golden/eta.py from MD at 8b2ed63)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, tiny_vit

GOLDEN = json.loads((Path(__file__).parent / "golden" / "eta.json").read_text())
NORM_PARAMS = {"1.weight", "1.bias", "4.weight", "4.bias"}


def recipe_model(recipe: dict) -> nn.Module:
    """The golden recipe: a float64 conv_net whose classifier is scaled (bias zeroed) for confident predictions."""
    model = conv_net(num_classes=recipe["num_classes"], seed=recipe["model_seed"]).double()
    with torch.no_grad():
        model[-1].weight.mul_(recipe["logit_scale"])
        model[-1].bias.zero_()
    return model


def recipe_batches(recipe: dict) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(recipe["input_seed"])
    shape = (recipe["batch"], 3, 8, 8)
    return [torch.randn(*shape, generator=g, dtype=torch.float64)
            + recipe["input_shift"] * torch.randn(shape[0], 3, 1, 1, generator=g, dtype=torch.float64)
            for _ in range(recipe["batches"])]


RECIPE = GOLDEN["recipe"]


# -- the reference ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_matches_the_reference_outputs(case):
    values = GOLDEN["cases"][case]
    model = recipe_model(RECIPE)
    adapted = tta.adapt(model, "eta", **values["options"])
    for x, logits, counts in zip(recipe_batches(RECIPE), values["logits"], values["counts"]):
        torch.testing.assert_close(adapted(x), torch.tensor(logits, dtype=torch.float64), rtol=0, atol=1e-10)
        assert [adapted.reliable_samples, adapted.selected_samples] == counts
    assert set(values["params"]) == NORM_PARAMS  # what the reference trains; the rest never changes
    source = dict(recipe_model(RECIPE).named_parameters())
    for name, p in model.named_parameters():
        expected = torch.tensor(values["params"][name], dtype=torch.float64) if name in NORM_PARAMS else source[name]
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=0, atol=1e-10)


def test_the_golden_cases_exercise_both_filters_and_a_skipped_step():
    cases = GOLDEN["cases"].values()
    # the redundancy filter drops reliable samples somewhere (cumulative selected < cumulative reliable) ...
    assert any(c["counts"][-1][1] < c["counts"][-1][0] for c in cases)
    # ... and some batch has no selected sample at all (the sgd case's last batch): no update there
    assert any(b[1] == a[1] for c in cases for a, b in zip(c["counts"], c["counts"][1:]))


# -- the formula by hand ---------------------------------------------------------------------------------------------
def hand_eta_run(model: nn.Module, batches: list[torch.Tensor], lr: float, margin_e0: float = 0.4,
                 d_margin: float = 0.4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """EATA's ETA written out: train-mode BN (batch statistics), BN affine parameters only, Adam; per batch the
    entropy filter E < E0 = margin_e0 ln C, the cosine filter against the moving average m, weights
    exp(-(E - E0)), loss = mean over the selected, m <- 0.9 m + 0.1 mean(selected probabilities)."""
    model.train()
    params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    m = None
    outputs, selections = [], []
    for x in batches:
        logits = model(x)
        p = logits.softmax(1)
        entropy = -(p * torch.log(p)).sum(1)
        e0 = margin_e0 * math.log(logits.shape[1])
        keep = entropy < e0
        if m is not None:
            q = p.detach()
            cosine = (q @ m) / (q.norm(dim=1) * m.norm())
            keep = keep & (cosine.abs() < d_margin)
        selections.append(keep.clone())
        outputs.append(logits.detach())
        if keep.any():
            mean = p.detach()[keep].mean(0)
            m = mean if m is None else 0.9 * m + 0.1 * mean
            weight = torch.exp(-(entropy.detach()[keep] - e0))
            loss = (weight * entropy[keep]).sum() / keep.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return outputs, selections


def test_steps_equal_the_hand_written_formula_with_partial_selection():
    batches = recipe_batches(RECIPE)
    outputs, selections = hand_eta_run(recipe_model(RECIPE), batches, lr=0.05)
    counts = [int(s.sum()) for s in selections]
    assert counts[0] > 0 and any(0 < c for c in counts[1:])  # both filters active, with a selection after the first
    model = recipe_model(RECIPE)
    adapted = tta.adapt(model, "eta", lr=0.05)
    for x, expected, selected in zip(batches, outputs, selections):
        torch.testing.assert_close(adapted(x), expected, rtol=1e-9, atol=1e-9)
        assert torch.equal(adapted.last_selection[1], selected)
    reference = recipe_model(RECIPE)
    hand_eta_run(reference, batches, lr=0.05)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-9, msg=name)


def test_loss_and_masks_equal_the_formula_for_a_given_moving_average():
    torch.manual_seed(0)
    adapted = tta.adapt(conv_net(num_classes=5), "eta", margin_e0=0.6, d_margin=0.9)
    logits = torch.randn(12, 5) * 2
    p = logits.softmax(1)
    entropy = -(p * p.log()).sum(1)
    e0 = 0.6 * math.log(5)
    # no average yet: the reliable samples are all selected
    loss = adapted.loss(None, logits)
    reliable, selected = adapted.last_selection
    assert torch.equal(reliable, entropy < e0) and torch.equal(selected, reliable)
    keep = entropy < e0
    assert 0 < keep.sum() < 12
    torch.testing.assert_close(loss, (torch.exp(e0 - entropy[keep]) * entropy[keep]).mean())
    # with an average m: |cos(p, m)| < d_margin as well
    m = torch.tensor([0.7, 0.1, 0.1, 0.05, 0.05])
    adapted.probs_average = m
    loss = adapted.loss(None, logits)
    cosine = (p @ m) / (p.norm(dim=1) * m.norm())
    keep = (entropy < e0) & (cosine < 0.9)
    assert 0 < keep.sum() < (entropy < e0).sum()
    assert torch.equal(adapted.last_selection[1], keep)
    torch.testing.assert_close(loss, (torch.exp(e0 - entropy[keep]) * entropy[keep]).sum() / keep.sum())


def test_the_moving_average_follows_eq_4():
    torch.manual_seed(1)
    adapted = tta.adapt(conv_net(), "eta", **tta.registry.method_class("eta").select_all_options)
    xs = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    expected = None
    for x in xs:
        logits = adapted(x)  # the logits of the forward that the step's selection and average used
        assert bool(adapted.last_selection[1].all())  # select_all_options keeps every sample
        mean = logits.softmax(1).mean(0)
        expected = mean if expected is None else 0.9 * expected + 0.1 * mean
        torch.testing.assert_close(adapted.probs_average, expected)
    assert adapted.selected_samples == adapted.reliable_samples == 24


def test_select_all_options_keep_every_sample_of_a_random_model():
    cls = tta.registry.method_class("eta")
    assert cls.select_all_options
    torch.manual_seed(2)
    adapted = tta.adapt(conv_net(), "eta", **cls.select_all_options)
    for _ in range(4):
        adapted(torch.rand(16, 3, 8, 8))
    assert adapted.selected_samples == adapted.reliable_samples == 64 and adapted.skipped_steps == 0


def test_no_selected_sample_means_no_update_and_is_counted():
    model = conv_net()
    adapted = tta.adapt(model, "eta", margin_e0=1e-6)  # E0 ~ 0: no sample is reliable
    before = full_state(model)
    logits = adapted(torch.randn(8, 3, 8, 8))
    assert logits.shape == (8, 4)
    assert adapted.skipped_steps == 1 and adapted.selected_samples == 0 and adapted.probs_average is None
    assert_same_state(full_state(model), before)
    assert adapted.optimizer.state_dict()["state"] == {}


def test_a_non_finite_loss_is_skipped_without_touching_the_average():
    adapted = tta.adapt(conv_net(), "eta", **tta.registry.method_class("eta").select_all_options)
    adapted(torch.randn(8, 3, 8, 8))
    average, before = adapted.probs_average.clone(), full_state(adapted.model)
    loss = adapted.loss
    adapted.loss = lambda x, logits: loss(x, logits) * float("nan")
    adapted(torch.randn(8, 3, 8, 8))
    assert adapted.skipped_steps == 1 and torch.equal(adapted.probs_average, average)
    assert_same_state(full_state(adapted.model), before)


# -- what an update changes ------------------------------------------------------------------------------------------
def test_one_update_moves_exactly_the_norm_affine_parameters():
    model = conv_net()
    before = full_state(model)
    adapted = tta.adapt(model, "eta", lr=0.1, **tta.registry.method_class("eta").select_all_options)
    adapted(torch.randn(8, 3, 8, 8))
    after = full_state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == NORM_PARAMS
    assert {n for n, p in model.named_parameters() if p.requires_grad} == NORM_PARAMS


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet], ids=["vit", "gn_resnet"])
def test_layernorm_and_groupnorm_models_adapt_their_affine_parameters(make):
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = tta.adapt(model, "eta", lr=0.05, **tta.registry.method_class("eta").select_all_options)
    adapted(torch.randn(4, 3, 32, 32))
    norm_names = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
                  for k, _ in m.named_parameters(recurse=False)}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert norm_names and changed and changed <= norm_names


# -- state -----------------------------------------------------------------------------------------------------------
def test_reset_restores_everything_bitwise_and_behaves_as_fresh():
    batches = recipe_batches(RECIPE)
    model = recipe_model(RECIPE)
    source = full_state(model)
    adapted = tta.adapt(model, "eta", lr=0.05)
    first = adapted(batches[0])
    for x in batches[1:]:
        adapted(x)
    assert adapted.probs_average is not None and adapted.optimizer.state and adapted.selected_samples > 0
    adapted.reset()
    assert_same_state(full_state(model), source)
    assert adapted.optimizer.state_dict()["state"] == {}
    assert adapted.probs_average is None and adapted.last_selection is None
    assert (adapted.batches_seen, adapted.skipped_steps, adapted.reliable_samples, adapted.selected_samples) == (0,) * 4
    fresh = tta.adapt(recipe_model(RECIPE), "eta", lr=0.05)
    for x in batches:
        assert torch.equal(adapted(x), fresh(x))
    assert torch.equal(adapted(batches[0]), fresh(batches[0]))
    assert torch.equal(adapted.probs_average, fresh.probs_average)
    assert not torch.equal(first, adapted(batches[0]))


def test_two_runs_with_one_seed_are_identical():
    def run():
        adapted = tta.adapt(recipe_model(RECIPE), "eta", lr=0.05)
        return [adapted(x) for x in recipe_batches(RECIPE)], adapted.probs_average

    (a, ma), (b, mb) = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(ma, mb)


def test_state_dict_carries_the_average_and_counters():
    batches = recipe_batches(RECIPE)
    a = tta.adapt(recipe_model(RECIPE), "eta", lr=0.05)
    for x in batches[:2]:
        a(x)
    b = tta.adapt(recipe_model(RECIPE), "eta", lr=0.05)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.probs_average, a.probs_average)
    assert (b.reliable_samples, b.selected_samples) == (a.reliable_samples, a.selected_samples)
    for x in batches[2:]:
        assert torch.equal(a(x), b(x))


# -- declarations and refusals ---------------------------------------------------------------------------------------
def test_declarations():
    cls = tta.registry.method_class("eta")
    assert cls.updates == "norm affine" and cls.may_skip_update and cls.batch_statistics == "always"
    assert cls.source_data is None and not cls.multi_pass and not cls.episodic_by_design
    options = tta.method_options("eta")()
    assert (options.margin_e0, options.d_margin, options.probs_momentum) == (0.4, 0.4, 0.9)
    assert (options.optimizer, options.lr, options.beta1, options.weight_decay, options.steps) == ("adam", 1e-3, 0.9,
                                                                                                   0.0, 1)


def test_refusals():
    with pytest.raises(ValueError, match="batch of 1"):
        tta.adapt(conv_net(), "eta")(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="probs_momentum"):
        tta.adapt(conv_net(), "eta", probs_momentum=1.5)
    adapted = tta.adapt(conv_net(), "eta")
    before = full_state(adapted.model)
    bad = torch.randn(4, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        adapted(bad)
    assert_same_state(full_state(adapted.model), before)
