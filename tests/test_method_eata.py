"""eata: tta.fisher against a hand computation, the Fisher penalty in the loss, the fisher option (object or
path, refusals), reset, and the reference's outputs (tests/golden/eata.json, written by
benchmarks/golden/eata.py from MD at 8b2ed63)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tests.test_method_eta import recipe_batches, recipe_model
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, mlp_bn1d, tiny_vit

GOLDEN = json.loads((Path(__file__).parent / "golden" / "eata.json").read_text())
RECIPE = GOLDEN["recipe"]
NORM_PARAMS = {"1.weight", "1.bias", "4.weight", "4.bias"}
OPEN = {"margin_e0": 1.05, "d_margin": 1.5}


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def source_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    recipe = {**RECIPE, "batches": RECIPE["source_batches"], "input_seed": RECIPE["source_seed"]}
    return [(x, torch.zeros(len(x), dtype=torch.long)) for x in recipe_batches(recipe)]


def small_fisher(model_fn=conv_net, n: int = 3) -> tta.FisherInfo:
    g = torch.Generator().manual_seed(5)
    return tta.fisher(model_fn(), [(torch.randn(8, 3, 8, 8, generator=g), None) for _ in range(n)])


# -- the reference ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_fisher() -> tta.FisherInfo:
    return tta.fisher(recipe_model(RECIPE), source_batches())


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_matches_the_reference_outputs(case, recipe_fisher):
    values = GOLDEN["cases"][case]
    assert set(recipe_fisher.fisher) == set(values["fisher"]) == set(recipe_fisher.anchors) == NORM_PARAMS
    for name in NORM_PARAMS:
        torch.testing.assert_close(recipe_fisher.fisher[name], f64(values["fisher"][name]), rtol=1e-12, atol=0)
        torch.testing.assert_close(recipe_fisher.anchors[name], f64(values["anchors"][name]), rtol=0, atol=0)
    model = recipe_model(RECIPE)
    adapted = tta.adapt(model, "eata", fisher=recipe_fisher, **values["options"])
    for x, logits, counts in zip(recipe_batches(RECIPE), values["logits"], values["counts"]):
        torch.testing.assert_close(adapted(x), f64(logits), rtol=0, atol=1e-10)
        assert [adapted.reliable_samples, adapted.selected_samples] == counts
    source = dict(recipe_model(RECIPE).named_parameters())
    for name, p in model.named_parameters():
        expected = f64(values["params"][name]) if name in NORM_PARAMS else source[name].detach()
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-10)


def test_the_penalty_changes_the_reference_run(recipe_fisher):
    """With beta = 2000 the golden run differs from eta's (so the golden checks the penalty, not eta alone)."""
    values = GOLDEN["cases"]["adam_alpha_2000"]
    options = {k: v for k, v in values["options"].items() if k != "fisher_alpha"}
    eta = tta.adapt(recipe_model(RECIPE), "eta", **options)
    outputs = [eta(x) for x in recipe_batches(RECIPE)]
    assert not torch.allclose(outputs[-1], f64(values["logits"][-1]), atol=1e-6)


# -- tta.fisher by hand ----------------------------------------------------------------------------------------------
def test_fisher_equals_the_mean_of_squared_batch_gradients_with_pseudo_labels():
    g = torch.Generator().manual_seed(9)
    batches = [torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    reference = conv_net().double().train()  # batch statistics
    names = sorted(NORM_PARAMS)
    params = dict(reference.named_parameters())
    sums = {name: torch.zeros_like(params[name]) for name in names}
    for x in batches:
        logits = reference(x)
        y = logits.argmax(1)
        loss = -logits.log_softmax(1)[torch.arange(len(y)), y].mean()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for name, grad in zip(names, grads):
            sums[name] += grad ** 2
    model = conv_net().double().train()
    model[0].weight.requires_grad_(False)
    state, types = full_state(model), [type(m) for m in model.modules()]
    info = tta.fisher(model, [(x, torch.zeros(6)) for x in batches])
    assert set(info.fisher) == NORM_PARAMS and info.num_batches == 3
    for name in names:
        torch.testing.assert_close(info.fisher[name], sums[name] / 3, rtol=1e-12, atol=1e-15)
        assert torch.equal(info.anchors[name], state[name])
    # the model comes back as it was given: values, layers, modes, flags, no gradients
    assert_same_state(full_state(model), state)
    assert [type(m) for m in model.modules()] == types and all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    # bare tensors work as well as (x, y) pairs
    again = tta.fisher(model, batches)
    assert all(torch.equal(again.fisher[n], info.fisher[n]) for n in names)


def test_fisher_refuses_no_batches_and_bad_batches():
    with pytest.raises(ValueError, match="no batches"):
        tta.fisher(conv_net(), [])
    model = conv_net()
    state = full_state(model)
    with pytest.raises(ValueError, match="NaN"):
        tta.fisher(model, [torch.full((4, 3, 8, 8), float("nan"))])
    assert_same_state(full_state(model), state)
    assert not any(type(m).__name__ == "MixedBatchNorm" for m in model.modules())


def test_source_options_return_the_fisher_of_the_source_batches():
    cls = tta.registry.method_class("eata")
    assert cls.source_data
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), None) for _ in range(3)]
    values = cls.source_options(conv_net(), batches, tta.method_options("eata")())
    assert set(values) == {"fisher"} and isinstance(values["fisher"], tta.FisherInfo)
    expected = small_fisher()
    assert all(torch.equal(values["fisher"].fisher[n], expected.fisher[n]) for n in NORM_PARAMS)


# -- the loss by hand ------------------------------------------------------------------------------------------------
def test_loss_is_the_weighted_entropy_plus_the_fisher_penalty():
    info = small_fisher()
    model = conv_net()
    adapted = tta.adapt(model, "eata", fisher=info, fisher_alpha=3.0, lr=0.05, **OPEN)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        adapted(torch.randn(8, 3, 8, 8, generator=g))
    assert any(not torch.equal(p, info.anchors[n]) for n, p in model.named_parameters() if n in NORM_PARAMS)
    x = torch.randn(8, 3, 8, 8, generator=g)
    logits = adapted.model(x)
    loss = adapted.loss(x, logits)
    p = logits.softmax(1)
    entropy = -(p * p.log()).sum(1)
    e0 = 1.05 * math.log(4)
    keep = adapted.last_selection[1]
    assert bool(keep.all())
    entropy_term = (torch.exp(e0 - entropy) * entropy).mean()
    penalty = sum((info.fisher[n] * (q - info.anchors[n]) ** 2).sum() for n, q in model.named_parameters()
                  if n in NORM_PARAMS)
    assert penalty > 0
    torch.testing.assert_close(loss, entropy_term + 3.0 * penalty)


def test_fisher_alpha_zero_is_eta_exactly():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
    eata = tta.adapt(conv_net(), "eata", fisher=small_fisher(), fisher_alpha=0.0, lr=0.05, **OPEN)
    eta = tta.adapt(conv_net(), "eta", lr=0.05, **OPEN)
    for x in batches:
        assert torch.equal(eata(x), eta(x))


def test_one_update_moves_exactly_the_norm_affine_parameters():
    model = conv_net()
    before = full_state(model)
    adapted = tta.adapt(model, "eata", fisher=small_fisher(), lr=0.1, **OPEN)
    adapted(torch.randn(8, 3, 8, 8))
    after = full_state(model)
    assert {k for k in before if not torch.equal(before[k], after[k])} == NORM_PARAMS


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet], ids=["vit", "gn_resnet"])
def test_layernorm_and_groupnorm_models_adapt_with_their_own_fisher(make):
    g = torch.Generator().manual_seed(0)
    info = tta.fisher(make(), [torch.rand(4, 3, 32, 32, generator=g) for _ in range(2)])
    model = make()
    norm_names = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
                  for k, _ in m.named_parameters(recurse=False)}
    assert set(info.fisher) == norm_names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = tta.adapt(model, "eata", fisher=info, fisher_alpha=10.0, lr=0.05, **OPEN)
    adapted(torch.rand(4, 3, 32, 32, generator=g))
    adapted(torch.rand(4, 3, 32, 32, generator=g))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= norm_names


# -- the fisher option -----------------------------------------------------------------------------------------------
def test_a_saved_fisher_loads_by_path_and_gives_the_same_run(tmp_path):
    info = small_fisher()
    path = tmp_path / "fisher.pt"
    info.save(path)
    loaded = tta.FisherInfo.load(path)
    assert loaded.num_batches == 3 and all(torch.equal(loaded.fisher[n], info.fisher[n]) for n in NORM_PARAMS)
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
    a = tta.adapt(conv_net(), "eata", fisher=info, fisher_alpha=50.0, lr=0.05, **OPEN)
    b = tta.adapt(conv_net(), "eata", fisher=str(path), fisher_alpha=50.0, lr=0.05, **OPEN)
    for x in batches:
        assert torch.equal(a(x), b(x))
    with pytest.raises(FileNotFoundError):
        tta.FisherInfo.load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read"):
        tta.FisherInfo.load(tmp_path / "bad.pt")
    torch.save({"means": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a FisherInfo file"):
        tta.FisherInfo.load(tmp_path / "other.pt")


def test_refusals_leave_the_model_as_it_was():
    model = conv_net()
    state, types = full_state(model), [type(m) for m in model.modules()]

    def unchanged():
        assert_same_state(full_state(model), state)
        assert [type(m) for m in model.modules()] == types and all(p.requires_grad for p in model.parameters())

    with pytest.raises(ValueError, match=r"not source-free.*tta\.fisher\(model, source_batches\).*'eta'"):
        tta.adapt(model, "eata")
    unchanged()
    g = torch.Generator().manual_seed(0)
    other = tta.fisher(mlp_bn1d(), [torch.randn(8, 5, generator=g)])  # another architecture
    with pytest.raises(ValueError, match=r"does not match the parameters this adapter trains \(missing: "
                                         r"\['4.weight', '4.bias'\], not trained: \[\]"):
        tta.adapt(model, "eata", fisher=other)
    unchanged()
    info = small_fisher()
    info.fisher["1.weight"] = info.fisher["1.weight"][:3]
    with pytest.raises(ValueError, match="1.weight has shape"):
        tta.adapt(model, "eata", fisher=info)
    unchanged()
    with pytest.raises(ValueError, match="fisher_alpha"):
        tta.adapt(model, "eata", fisher=small_fisher(), fisher_alpha=-1.0)
    unchanged()


def test_anchors_other_than_the_models_values_warn():
    info = small_fisher()
    model = conv_net()
    with torch.no_grad():
        model[1].bias.add_(0.5)
    with pytest.warns(UserWarning, match=r"\['1.bias'\] differ from the anchors"):
        tta.adapt(model, "eata", fisher=info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tta.adapt(conv_net(), "eata", fisher=info)


# -- state -----------------------------------------------------------------------------------------------------------
def test_reset_restores_everything_bitwise_and_behaves_as_fresh():
    info = small_fisher()
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
    model = conv_net()
    source = full_state(model)
    adapted = tta.adapt(model, "eata", fisher=info, fisher_alpha=50.0, lr=0.05, **OPEN)
    penalty = [t.clone() for t in adapted.buffers() if t is not None and not any(t is s for s in model.buffers())]
    for x in batches:
        adapted(x)
    adapted.reset()
    assert_same_state(full_state(model), source)
    assert adapted.optimizer.state_dict()["state"] == {} and adapted.probs_average is None
    assert (adapted.batches_seen, adapted.reliable_samples, adapted.selected_samples, adapted.skipped_steps) == (0,) * 4
    after = [t for t in adapted.buffers() if t is not None and not any(t is s for s in model.buffers())]
    assert len(after) == 2 * len(NORM_PARAMS) and all(torch.equal(a, b) for a, b in zip(after, penalty))
    fresh = tta.adapt(conv_net(), "eata", fisher=info, fisher_alpha=50.0, lr=0.05, **OPEN)
    for x in batches:
        assert torch.equal(adapted(x), fresh(x))


def test_two_runs_with_one_seed_are_identical():
    def run():
        g = torch.Generator().manual_seed(6)
        adapted = tta.adapt(conv_net(), "eata", fisher=small_fisher(), fisher_alpha=50.0, lr=0.05, **OPEN)
        return [adapted(torch.randn(8, 3, 8, 8, generator=g)) for _ in range(3)]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


def test_declarations():
    cls = tta.registry.method_class("eata")
    assert cls.updates == "norm affine" and cls.may_skip_update and cls.select_all_options == OPEN
    options = tta.method_options("eata")()
    assert (options.fisher_alpha, options.margin_e0, options.d_margin, options.lr) == (1.0, 0.4, 0.4, 1e-3)
