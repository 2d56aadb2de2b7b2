"""sar: the step equals a hand computation of the paper's formulas (reliable entropy, SAM perturbation, second
filtering, SGD with momentum at the perturbed gradient, model recovery); it moves exactly the norm affine
parameters; reset and recovery are bitwise; it matches the reference's golden outputs."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import tta
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, tiny_vit

GOLDEN = json.loads((Path(__file__).parent / "golden" / "sar.json").read_text())
TRAINED = GOLDEN["trained"]  # the BatchNorm affine parameters of conv_net


def scaled_net() -> torch.nn.Module:
    """conv_net in float64 with a scaled classifier: entropies spread across the margin (as the golden)."""
    net = conv_net(4, seed=0).double()
    with torch.no_grad():
        net[8].weight.mul_(GOLDEN["classifier_scale"])
        net[8].bias.mul_(GOLDEN["classifier_scale"])
    return net


def golden_batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(GOLDEN["input_seed"])
    return [torch.rand(GOLDEN["batch_shape"], generator=g, dtype=torch.float64) for _ in range(n)]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    return -(p * torch.log(p)).sum(1)


def hand_forward(net: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The network with batch statistics in every BatchNorm (train mode on a throwaway copy) and given params."""
    return functional_call(copy.deepcopy(net).train(), params, (x,))


def hand_sar_step(net, x, *, margin_e0=0.4, rho=0.05, lr=1e-3):
    """One SAR step from a fresh optimizer, written out: returns (logits, new params, second loss, masks)."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters() if k in TRAINED}
    e0 = margin_e0 * math.log(4)
    logits = hand_forward(net, params, x)
    first = entropy(logits) < e0  # Eqn. (2)
    grads = torch.autograd.grad(entropy(logits)[first].mean(), list(params.values()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    perturbed = {k: (v + rho * g / (norm + 1e-12)).detach().requires_grad_(True)  # Eqn. (4)
                 for (k, v), g in zip(params.items(), grads)}
    at_eps = entropy(hand_forward(net, perturbed, x))[first]
    second = at_eps < e0
    loss = at_eps[second].mean()
    sharp_grads = torch.autograd.grad(loss, list(perturbed.values()))  # Eqn. (5)
    # SGD with momentum 0.9 from an empty state: the first buffer is the gradient itself.
    new = {k: (v - lr * g).detach() for (k, v), g in zip(params.items(), sharp_grads)}
    return logits.detach(), new, loss.item(), first, second


def test_one_step_equals_the_hand_computation_with_both_filters_active():
    net = scaled_net()
    x = golden_batches(1)[0]
    logits, new, loss, first, second = hand_sar_step(net, x, margin_e0=0.3, lr=0.05)
    assert 0 < first.sum() < len(first) and 0 < second.sum() < len(second)  # both filters drop something
    adapted = tta.adapt(net, "sar", margin_e0=0.3, lr=0.05)
    assert torch.allclose(adapted(x), logits, atol=1e-12, rtol=0)
    params = dict(net.named_parameters())
    for k in TRAINED:
        assert torch.allclose(params[k], new[k], atol=1e-12, rtol=0), k
    assert adapted.ema == pytest.approx(loss, abs=1e-12)  # the moving average starts at the first loss
    assert adapted.filtered_steps == 0 and adapted.recoveries == 0


def test_the_moving_average_and_sgd_momentum_follow_their_formulas():
    net = scaled_net()
    xs = golden_batches(2)
    adapted = tta.adapt(net, "sar", lr=0.05)
    adapted(xs[0])
    first_ema = adapted.ema
    before = {k: p.detach().clone() for k, p in net.named_parameters() if k in TRAINED}
    buffers = {k: adapted.optimizer.state[p]["momentum_buffer"].clone() for k, p in net.named_parameters()
               if k in TRAINED}
    # The second step by hand, from the adapted parameters and the optimizer's momentum buffers.
    params = {k: v.clone().requires_grad_(True) for k, v in before.items()}
    e0 = 0.4 * math.log(4)
    logits = hand_forward(net, params, xs[1])
    keep = entropy(logits) < e0
    grads = torch.autograd.grad(entropy(logits)[keep].mean(), list(params.values()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    perturbed = {k: (v + 0.05 * g / (norm + 1e-12)).detach().requires_grad_(True)
                 for (k, v), g in zip(params.items(), grads)}
    at_eps = entropy(hand_forward(net, perturbed, xs[1]))[keep]
    loss = at_eps[at_eps < e0].mean()
    sharp = dict(zip(perturbed, torch.autograd.grad(loss, list(perturbed.values()))))
    adapted(xs[1])
    for k, p in net.named_parameters():
        if k in TRAINED:
            buffer = 0.9 * buffers[k] + sharp[k]
            assert torch.allclose(p, before[k] - 0.05 * buffer, atol=1e-12, rtol=0), k
    assert adapted.ema == pytest.approx(0.9 * first_ema + 0.1 * loss.item(), abs=1e-12)


def test_one_update_moves_exactly_the_batchnorm_affine_parameters():
    net = scaled_net()
    before = full_state(net)
    adapted = tta.adapt(net, "sar", **tta.registry.method_class("sar").select_all_options)
    adapted(golden_batches(1)[0])
    after = full_state(net)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(TRAINED)


def test_no_sample_passing_means_no_update_at_all():
    # A margin no entropy is below: the first filter keeps nothing.
    net = scaled_net()
    before = full_state(net)
    adapted = tta.adapt(net, "sar", margin_e0=1e-9)
    x = golden_batches(1)[0]
    with torch.no_grad():
        expected = hand_forward(net, {}, x)
    assert torch.allclose(adapted(x), expected, atol=1e-12, rtol=0)
    assert_same_state(before, full_state(net))
    assert adapted.filtered_steps == 1 and adapted.ema is None and not adapted.optimizer.state
    # rho 0.5 at margin 0.3: four samples pass the first filter, none is still reliable at T + eps (by hand).
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters() if k in TRAINED}
    e0 = 0.3 * math.log(4)
    ent = entropy(hand_forward(net, params, x))
    first = ent < e0
    grads = torch.autograd.grad(ent[first].mean(), list(params.values()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    perturbed = {k: v.detach() + 0.5 * g / (norm + 1e-12) for (k, v), g in zip(params.items(), grads)}
    with torch.no_grad():
        second = entropy(hand_forward(net, perturbed, x))[first] < e0
    assert first.sum() == 4 and not second.any()
    adapted = tta.adapt(adapted.release(), "sar", margin_e0=0.3, rho=0.5)
    adapted(x)
    assert_same_state(before, full_state(net))
    assert adapted.filtered_steps == 1 and adapted.ema is None and not adapted.optimizer.state


def test_model_recovery_returns_to_the_source_and_clears_the_momentum():
    net = scaled_net()
    source = full_state(net)
    xs = golden_batches(2)
    fresh = tta.adapt(copy.deepcopy(net), "sar")
    expected = [fresh(x) for x in xs[:1]]
    adapted = tta.adapt(net, "sar", reset_constant=10.0)  # any moving average is below: recover every step
    assert torch.equal(adapted(xs[0]), expected[0])  # the logits are those before the update
    assert_same_state(source, full_state(net))
    assert adapted.recoveries == 1 and adapted.ema is None and not adapted.optimizer.state
    # The next step starts from the source exactly as a fresh adapter does.
    again = tta.adapt(copy.deepcopy(scaled_net()), "sar", reset_constant=10.0)
    assert torch.equal(adapted(xs[1]), again(xs[1]))
    assert adapted.recoveries == 2


def test_reset_is_bitwise_and_the_next_output_equals_a_fresh_adapters():
    net = scaled_net()
    source = full_state(net)
    xs = golden_batches(3)
    adapted = tta.adapt(net, "sar", lr=0.05)
    optimizer_state = copy.deepcopy(adapted.optimizer.state_dict())
    for x in xs[:2]:
        adapted(x)
    assert adapted.ema is not None and adapted.optimizer.state
    adapted.reset()
    assert_same_state(source, full_state(net))
    assert adapted.ema is None and adapted.recoveries == 0 and adapted.filtered_steps == 0
    assert adapted.batches_seen == 0 and adapted.optimizer.state_dict() == optimizer_state
    fresh = tta.adapt(scaled_net(), "sar", lr=0.05)
    assert torch.equal(adapted(xs[2]), fresh(xs[2]))
    assert torch.equal(adapted(xs[0]), fresh(xs[0]))
    assert adapted.ema == fresh.ema


def test_two_runs_are_identical_and_the_state_dict_carries_the_moving_average():
    xs = golden_batches(3)
    runs = []
    for _ in range(2):
        net = scaled_net()
        adapted = tta.adapt(net, "sar", lr=0.05)
        runs.append(([adapted(x) for x in xs], full_state(net), adapted.ema))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    assert_same_state(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]
    # Resume: a second adapter loaded from the first's state dict continues identically.
    first = tta.adapt(scaled_net(), "sar", lr=0.05)
    first(xs[0])
    second = tta.adapt(scaled_net(), "sar", lr=0.05)
    second.load_state_dict(first.state_dict())
    assert second.ema == first.ema
    assert torch.equal(first(xs[1]), second(xs[1]))
    assert torch.equal(first(xs[2]), second(xs[2]))


@pytest.mark.parametrize("name", list(GOLDEN["scenarios"]))
def test_matches_the_reference_golden_outputs(name):
    scenario = GOLDEN["scenarios"][name]
    net = scaled_net()
    adapted = tta.adapt(net, "sar", **scenario["options"])
    for x, logits, ema in zip(golden_batches(scenario["batches"]), scenario["logits"], scenario["ema"]):
        assert torch.allclose(adapted(x), torch.tensor(logits, dtype=torch.float64), atol=1e-12, rtol=0)
        assert (adapted.ema is None) == (ema is None)
        if ema is not None:
            assert adapted.ema == pytest.approx(ema, abs=1e-12)
    params = dict(net.named_parameters())
    for k, value in scenario["params"].items():
        assert torch.allclose(params[k], torch.tensor(value, dtype=torch.float64), atol=1e-12, rtol=0), k


def _norm_params(model, top: bool | None = None) -> set[str]:
    from tta.methods.sar import is_top_layer

    return {f"{n}.{k}" for n, m in model.named_modules()
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and (top is None or is_top_layer(n) == top)
            for k, _ in m.named_parameters(recurse=False)}


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet], ids=["vit", "gn_resnet"])
@pytest.mark.parametrize("freeze_top", [False, True])
def test_layernorm_and_groupnorm_models_adapt_their_norm_layers(make, freeze_top):
    model = make()
    before = full_state(model)
    options = {**tta.registry.method_class("sar").select_all_options, "lr": 0.05, "freeze_top": freeze_top}
    adapted = tta.adapt(model, "sar", **options)
    g = torch.Generator().manual_seed(0)
    adapted(torch.rand(4, 3, 32, 32, generator=g))
    adapted(torch.rand(1, 3, 32, 32, generator=g))  # batch 1: per-sample norms need no batch
    after = full_state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = _norm_params(model, top=False) if freeze_top else _norm_params(model)
    assert changed == expected
    if freeze_top:
        assert _norm_params(model, top=True)  # the rule froze something here (ViT: the final norm; ResNet: layer4)
    adapted.reset()
    assert_same_state(before, full_state(model))


def test_refusals_leave_everything_unchanged():
    net = scaled_net()
    before = full_state(net)
    adapted = tta.adapt(net, "sar")
    bad = golden_batches(1)[0]
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapted(bad)
    with pytest.raises(ValueError, match="batch of 1"):
        adapted(golden_batches(1)[0][:1])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        adapted(golden_batches(1)[0])
    assert_same_state(before, full_state(net))
    assert adapted.batches_seen == 0 and not adapted.optimizer.state
    for bad_option in ({"margin_e0": 0.0}, {"rho": -1.0}, {"ema_momentum": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad_option))):
            tta.adapt(scaled_net(), "sar", **bad_option)


def test_declarations():
    cls = tta.registry.method_class("sar")
    assert cls.updates == "norm affine" and cls.multi_pass and cls.may_skip_update
    assert cls.layers == tta.base.NORM_LAYERS and cls.inputs == "any"
    options = cls.Options()
    assert (options.optimizer, options.lr, options.momentum, options.nesterov) == ("sgd", 1e-3, 0.9, False)
    assert (options.margin_e0, options.rho, options.reset_constant, options.ema_momentum) == (0.4, 0.05, 0.2, 0.9)
