"""deyo: the step equals a hand computation of the paper's selection (entropy, PLPD under patch shuffling) and
weighting; it moves exactly the norm affine parameters; its random draws come from its own generator, which
reset() restores; non-image batches are refused; it matches the reference's golden outputs."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, mlp_bn1d, tiny_vit

GOLDEN = json.loads((Path(__file__).parent / "golden" / "deyo.json").read_text())
TRAINED = GOLDEN["trained"]  # the BatchNorm affine parameters
SELECT_ALL = tta.registry.method_class("deyo").select_all_options


def spatial_net() -> nn.Module:
    """The golden model: conv_net with a 2 x 2 pool and Linear(32, 4) head (position matters), scaled, float64."""
    net = conv_net(4, seed=0)
    torch.manual_seed(1)
    net[6], net[8] = nn.AdaptiveAvgPool2d(2), nn.Linear(32, 4)
    net = net.double()
    with torch.no_grad():
        net[8].weight.mul_(GOLDEN["classifier_scale"])
        net[8].bias.mul_(GOLDEN["classifier_scale"])
    return net


def golden_batches(n: int, side: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(GOLDEN["input_seed"])
    return [torch.rand(GOLDEN["batch_size"], 3, side, side, generator=g, dtype=torch.float64) for _ in range(n)]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    return -(p * torch.log(p)).sum(1)


def hand_shuffle(x: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """Patch shuffling written out: slot j of image i (row j // grid, column j % grid) receives the patch from
    slot order[i, j], order = argsort of uniform draws."""
    order = torch.rand(x.shape[0], grid * grid, generator=generator).argsort(dim=-1)
    h, w = x.shape[2] // grid, x.shape[3] // grid
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(grid * grid):
            src = int(order[i, j])
            out[i, :, (j // grid) * h:(j // grid + 1) * h, (j % grid) * w:(j % grid + 1) * w] = \
                x[i, :, (src // grid) * h:(src // grid + 1) * h, (src % grid) * w:(src % grid + 1) * w]
    return out


def batch_stat_net(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).train()  # BatchNorm with the statistics of each batch


def test_one_step_equals_the_hand_computation():
    net = spatial_net()
    x = golden_batches(1)[0]
    reference = batch_stat_net(net)
    params = [p for name, p in reference.named_parameters() if name in TRAINED]
    logits = reference(x)
    ent = entropy(logits)
    keep = ent < 0.5 * math.log(4)  # tau_Ent
    with torch.no_grad():
        shuffled = hand_shuffle(x[keep], 4, torch.Generator().manual_seed(3))
        probs, probs_shuffled = logits[keep].softmax(1), batch_stat_net(net)(shuffled).softmax(1)
        pseudo = probs.argmax(1)
        plpd = probs[torch.arange(len(pseudo)), pseudo] - probs_shuffled[torch.arange(len(pseudo)), pseudo]
    reliable = plpd > 0.1  # tau_PLPD
    assert 0 < keep.sum() < len(keep) and 0 < reliable.sum() < len(reliable)  # both selections drop samples
    kept_ent = ent[keep][reliable]
    weight = torch.exp(-(kept_ent.detach() - 0.4 * math.log(4))) + torch.exp(plpd[reliable])
    loss = (weight * kept_ent).mean()
    grads = torch.autograd.grad(loss, params)
    # Adam's first step: m_hat = g, v_hat = g^2, so p <- p - lr * g / (|g| + eps).
    expected = {name: (p - 0.01 * g / (g.abs() + 1e-8)).detach()
                for name, p, g in zip(TRAINED, params, grads)}

    adapted = tta.adapt(net, "deyo", plpd_threshold=0.1, lr=0.01, seed=3)
    assert torch.allclose(adapted(x), logits.detach(), atol=1e-12, rtol=0)
    new = dict(net.named_parameters())
    for name in TRAINED:
        assert torch.allclose(new[name], expected[name], atol=1e-12, rtol=0), name
    assert adapted.filtered_steps == 0


@pytest.mark.parametrize("reweight_ent,reweight_plpd", [(False, True), (True, False), (False, False)])
def test_each_weight_can_be_switched_off(reweight_ent, reweight_plpd):
    net = spatial_net()
    x = golden_batches(1)[0]
    reference = batch_stat_net(net)
    params = [p for name, p in reference.named_parameters() if name in TRAINED]
    logits = reference(x)
    ent = entropy(logits)
    with torch.no_grad():  # select everything: the PLPD only enters the weight
        shuffled = hand_shuffle(x, 4, torch.Generator().manual_seed(0))
        probs, probs_shuffled = logits.softmax(1), batch_stat_net(net)(shuffled).softmax(1)
        rows, pseudo = torch.arange(len(x)), probs.argmax(1)
        plpd = probs[rows, pseudo] - probs_shuffled[rows, pseudo]
    weight = torch.zeros_like(ent)
    if reweight_ent:
        weight = weight + torch.exp(-(ent.detach() - 0.4 * math.log(4)))
    if reweight_plpd:
        weight = weight + torch.exp(plpd)
    loss = (weight * ent).mean() if (reweight_ent or reweight_plpd) else ent.mean()
    grads = torch.autograd.grad(loss, params)
    adapted = tta.adapt(net, "deyo", reweight_ent=reweight_ent, reweight_plpd=reweight_plpd, lr=0.01, **SELECT_ALL)
    adapted(x)
    new = dict(net.named_parameters())
    for name, p, g in zip(TRAINED, params, grads):
        assert torch.allclose(new[name], p - 0.01 * g / (g.abs() + 1e-8), atol=1e-12, rtol=0), name


def test_pixel_shuffle_and_occlusion_are_the_papers_transformations():
    from tta.methods.deyo import occlude, shuffle_pixels

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 6, generator=g)
    permutation = torch.randperm(30, generator=torch.Generator().manual_seed(4))
    out = shuffle_pixels(x, torch.Generator().manual_seed(4))
    for k in range(30):  # position k receives pixel permutation[k], all channels together
        assert torch.equal(out[:, :, k // 6, k % 6], x[:, :, int(permutation[k]) // 6, int(permutation[k]) % 6])
    occluded = occlude(x, 2, 1, 3)
    mean = x.mean(dim=(2, 3))
    assert torch.equal(occluded[:, :, 1:3, 3:5], mean[:, :, None, None].expand(2, 3, 2, 2))
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[1:3, 3:5] = False
    assert torch.equal(occluded[:, :, mask], x[:, :, mask])


def test_patch_shuffle_equals_the_written_out_one_and_keeps_every_patch():
    from tta.methods.deyo import shuffle_patches

    x = torch.rand(3, 2, 12, 8, generator=torch.Generator().manual_seed(1))
    ours = shuffle_patches(x, 4, torch.Generator().manual_seed(9))
    assert torch.equal(ours, hand_shuffle(x, 4, torch.Generator().manual_seed(9)))
    assert torch.equal(ours.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_one_update_moves_exactly_the_batchnorm_affine_parameters():
    net = spatial_net()
    before = full_state(net)
    adapted = tta.adapt(net, "deyo", **SELECT_ALL)
    adapted(golden_batches(1)[0])
    after = full_state(net)
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(TRAINED)


def test_nothing_selected_means_no_update():
    net = spatial_net()
    before = full_state(net)
    x = golden_batches(1)[0]
    # No entropy below the margin: no update, and no random draw.
    adapted = tta.adapt(net, "deyo", margin=1e-9)
    adapted(x)
    assert_same_state(before, full_state(net))
    assert adapted.filtered_steps == 1 and not adapted.optimizer.state
    assert torch.equal(adapted.generator.get_state(), torch.Generator().manual_seed(0).get_state())
    # PLPD is at most 1: a threshold of 1 keeps nothing after the shuffled forward (which drew its orders).
    adapted = tta.adapt(adapted.release(), "deyo", plpd_threshold=1.0)
    adapted(x)
    assert_same_state(before, full_state(net))
    assert adapted.filtered_steps == 1 and not adapted.optimizer.state
    assert not torch.equal(adapted.generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_reset_restores_parameters_optimizer_and_generator_bitwise():
    net = spatial_net()
    source = full_state(net)
    xs = golden_batches(3)
    adapted = tta.adapt(net, "deyo", lr=0.01, seed=7, **SELECT_ALL)
    for x in xs[:2]:
        adapted(x)
    assert adapted.optimizer.state
    adapted.reset()
    assert_same_state(source, full_state(net))
    assert not adapted.optimizer.state and adapted.batches_seen == 0 and adapted.filtered_steps == 0
    assert torch.equal(adapted.generator.get_state(), torch.Generator().manual_seed(7).get_state())
    fresh_net = spatial_net()
    fresh = tta.adapt(fresh_net, "deyo", lr=0.01, seed=7, **SELECT_ALL)
    for x in (xs[2], xs[0]):
        assert torch.equal(adapted(x), fresh(x))
    assert_same_state(full_state(net), full_state(fresh_net))


def test_one_seed_gives_identical_runs_and_another_seed_other_shuffles():
    xs = golden_batches(3)
    states, outputs = [], []
    for seed in (1, 1, 2):
        net = spatial_net()
        adapted = tta.adapt(net, "deyo", lr=0.01, seed=seed, **SELECT_ALL)
        outputs.append([adapted(x) for x in xs])
        states.append(full_state(net))
    for a, b in zip(outputs[0], outputs[1]):
        assert torch.equal(a, b)
    assert_same_state(states[0], states[1])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in TRAINED)
    # The state dict carries the generator: a loaded adapter continues exactly as the original.
    first = tta.adapt(spatial_net(), "deyo", lr=0.01, **SELECT_ALL)
    first(xs[0])
    second = tta.adapt(spatial_net(), "deyo", lr=0.01, **SELECT_ALL)
    second.load_state_dict(first.state_dict())
    for x in xs[1:]:
        assert torch.equal(first(x), second(x))


@pytest.mark.parametrize("name", list(GOLDEN["scenarios"]))
def test_matches_the_reference_golden_outputs(name):
    scenario = GOLDEN["scenarios"][name]
    net = spatial_net()
    adapted = tta.adapt(net, "deyo", **scenario["options"])
    for x, logits in zip(golden_batches(scenario["batches"], scenario["side"]), scenario["logits"]):
        assert torch.allclose(adapted(x), torch.tensor(logits, dtype=torch.float64), atol=1e-12, rtol=0)
    params = dict(net.named_parameters())
    for k, value in scenario["params"].items():
        assert torch.allclose(params[k], torch.tensor(value, dtype=torch.float64), atol=1e-12, rtol=0), k


def test_non_image_batches_and_misfit_transformations_are_refused_before_anything_changes():
    model = mlp_bn1d()
    before = full_state(model)
    adapted = tta.adapt(model, "deyo")
    with pytest.raises(ValueError, match=r"needs \(N, C, H, W\) image batches, got \(4, 5\)"):
        adapted(torch.rand(4, 5))
    assert_same_state(before, full_state(model))
    adapted.release()
    net = spatial_net()
    before = full_state(net)
    x = golden_batches(1)[0]
    for options, message in (({"aug_type": "occ"}, "does not fit in 16 x 16 images"),
                             ({"patch_len": 32}, "cannot be cut into 32 x 32 patches"),
                             ({"episodic": True, "aug_type": "occ", "occlusion_size": 17, "row_start": 0,
                               "column_start": 0}, "does not fit")):
        adapted = tta.adapt(net, "deyo", **options)
        with pytest.raises(ValueError, match=message):
            adapted(x)
        adapted.release()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    adapted = tta.adapt(net, "deyo")
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapted(bad)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        adapted(x)
    assert_same_state(before, full_state(net))
    assert not adapted.optimizer.state
    assert torch.equal(adapted.generator.get_state(), torch.Generator().manual_seed(0).get_state())
    for options in ({"aug_type": "blur"}, {"patch_len": 0}, {"aug_type": "occ", "occlusion_size": 0}):
        with pytest.raises(ValueError, match=list(options)[-1]):
            tta.adapt(spatial_net(), "deyo", **options)


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet], ids=["vit", "gn_resnet"])
def test_layernorm_and_groupnorm_models_adapt_their_norm_layers(make):
    model = make()
    before = full_state(model)
    adapted = tta.adapt(model, "deyo", lr=0.01, **SELECT_ALL)
    g = torch.Generator().manual_seed(0)
    adapted(torch.rand(4, 3, 32, 32, generator=g))
    adapted(torch.rand(1, 3, 32, 32, generator=g))  # batch 1: per-sample norms need no batch
    after = full_state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    norm = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
            for k, _ in m.named_parameters(recurse=False)}
    assert changed == norm
    adapted.reset()
    assert_same_state(before, full_state(model))
    assert adapted.release() is model


def test_declarations_and_defaults():
    cls = tta.registry.method_class("deyo")
    assert cls.updates == "norm affine" and cls.inputs == "images" and cls.multi_pass and cls.may_skip_update
    assert cls.layers == tta.base.NORM_LAYERS
    o = cls.Options()
    assert (o.optimizer, o.lr, o.beta1) == ("adam", 1e-3, 0.9)
    assert (o.margin, o.margin_e0, o.plpd_threshold, o.aug_type, o.patch_len) == (0.5, 0.4, 0.2, "patch", 4)
    assert o.reweight_ent and o.reweight_plpd
