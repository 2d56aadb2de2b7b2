"""lame: Laplacian-regularised adjustment of the predictions (output only); against hand computations of the
affinities and the fixed-point update, the reference's golden outputs, and the rule that the model never changes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, tiny_vit
from tta.source_stats import FeatureTap

GOLDEN = Path(__file__).parent / "golden" / "lame.json"


def _model(scale: float = 3.0) -> nn.Module:
    model = conv_net().double()
    with torch.no_grad():
        model[-1].weight.mul_(scale)
    return model


def _batch(n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _features_and_log_probs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        f = model[:8](x)
        p = model[8](f).softmax(1)
    f = f / f.norm(dim=1, keepdim=True)
    return f, torch.log(p + 1e-10)


def _distances(f: torch.Tensor) -> torch.Tensor:
    n = f.shape[0]
    return torch.tensor([[float(((f[i] - f[j]) ** 2).sum().sqrt()) for j in range(n)] for i in range(n)],
                        dtype=f.dtype)


def _rbf_by_hand(f: torch.Tensor, k: int) -> torch.Tensor:
    d = _distances(f)
    sigma = torch.stack([row.sort().values[k - 1] for row in d]).mean()  # k-th smallest, counting the point itself
    return torch.exp(-d ** 2 / (2 * sigma ** 2))


def _knn_by_hand(f: torch.Tensor, k: int) -> torch.Tensor:
    d = _distances(f)
    w = torch.zeros_like(d)
    for i in range(len(d)):
        others = [j for j in d[i].argsort().tolist() if j != i][:k]
        w[i, others] = 1.0
    return w


@pytest.mark.parametrize("affinity, knn, symmetric", [("rbf", 5, False), ("knn", 3, False), ("knn", 3, True),
                                                      ("linear", 5, False)])
def test_one_step_is_the_fixed_point_update_with_the_hand_computed_affinity(affinity, knn, symmetric):
    """max_steps = 1: logits = log(p + 1e-10) + W z0 with z0 = softmax(log(p + 1e-10))."""
    model, x = _model(), _batch()
    f, log_p = _features_and_log_probs(model, x)
    by_hand = {"rbf": lambda: _rbf_by_hand(f, knn), "knn": lambda: _knn_by_hand(f, knn), "linear": lambda: f @ f.T}
    w = by_hand[affinity]()
    if symmetric:
        w = (w + w.T) / 2
    expected = log_p + w @ log_p.softmax(1)
    adapted = tta.adapt(model, "lame", affinity=affinity, knn=knn, force_symmetry=symmetric, max_steps=1)
    torch.testing.assert_close(adapted(x), expected, atol=1e-12, rtol=0)


def _objective(z: torch.Tensor, log_p: torch.Tensor, w: torch.Tensor) -> float:
    """The LAME objective sum_i KL(z_i || p_i) - sum_ij w_ij z_i . z_j."""
    return float((z * (torch.log(z) - log_p)).sum() - (w * (z @ z.T)).sum())


def test_the_iterations_reach_a_fixed_point_that_lowers_the_objective():
    model, x = _model(), _batch(14)
    f, log_p = _features_and_log_probs(model, x)
    w = _rbf_by_hand(f, 5)
    adapted = tta.adapt(model, "lame", max_steps=500, tolerance=0.0)
    z = adapted(x).softmax(1)
    torch.testing.assert_close((log_p + w @ z).softmax(1), z, atol=1e-10, rtol=0)  # z = softmax(log p + W z)
    assert _objective(z, log_p, w) < _objective(log_p.softmax(1), log_p, w) - 1e-3
    assert adapted.last_steps > 2


def test_the_energy_criterion_stops_early():
    """Stop when |E_n - E_(n-1)| <= 1e-8 |E_(n-1)| (checked from the third iteration), E_n the bound's energy."""
    model, x = _model(), _batch(12)
    f, log_p = _features_and_log_probs(model, x)
    w = _rbf_by_hand(f, 5)
    z, energies = log_p.softmax(1), []
    for step in range(100):
        pairwise = w @ z
        z = (log_p + pairwise).softmax(1)
        energies.append(float((-log_p * z - pairwise * z + z * torch.log(z.clamp_min(1e-20))).sum()))
        if step > 1 and abs(energies[-1] - energies[-2]) <= 1e-8 * abs(energies[-2]):
            break
    adapted = tta.adapt(model, "lame")
    torch.testing.assert_close(adapted(x).softmax(1), z, atol=1e-12, rtol=0)
    assert adapted.last_steps == len(energies) < 100


def test_the_reference_golden_outputs():
    golden = json.loads(GOLDEN.read_text())
    recipe = golden["recipe"]
    for name, case in golden["cases"].items():
        model = _model(recipe["logit_scale"])
        adapted = tta.adapt(model, "lame", **case["options"])
        g = torch.Generator().manual_seed(recipe["input_seed"])
        for step, expected in enumerate(case["probabilities"]):
            x = torch.randn(case["batch"], 3, 8, 8, generator=g, dtype=torch.float64)
            torch.testing.assert_close(adapted(x).softmax(1), torch.tensor(expected, dtype=torch.float64),
                                       atol=1e-12, rtol=0, msg=lambda m: f"{name}, step {step + 1}: {m}")


def test_the_model_never_changes_and_the_snapshot_is_empty():
    model = _model()
    before = full_state(model)
    adapted = tta.adapt(model, "lame")
    first = adapted(_batch())
    for seed in range(1, 4):
        adapted(_batch(seed=seed))
    assert_same_state(before, full_state(model))
    assert adapted._snapshot._tensors == []
    assert torch.equal(adapted(_batch()), first)  # no state: the same batch, the same output
    adapted.reset()
    assert adapted.batches_seen == 0 and torch.equal(adapted(_batch()), first)
    assert torch.equal(tta.adapt(_model(), "lame")(_batch()), first)


@pytest.mark.parametrize("affinity", ["knn", "rbf", "linear"])
def test_points_predicted_against_their_cluster_follow_their_neighbours(affinity):
    """Two clusters of 2-d features (angles near 0 and 90 degrees); the linear head's boundary at 10 degrees puts
    the cluster's two points at 11 and 13 degrees in the other class. LAME gives them their neighbours' class."""
    angles = torch.tensor([0, 2, 4, 6, 8, 11, 13, 80, 85, 90, 95, 100], dtype=torch.float64) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], 1)
    boundary = 10 * math.pi / 180
    head = nn.Linear(2, 2).double()
    with torch.no_grad():
        normal = torch.tensor([math.sin(boundary), -math.cos(boundary)], dtype=torch.float64)
        head.weight.copy_(torch.stack([normal, -normal]) * 2)
        head.bias.zero_()
    model = nn.Sequential(nn.Flatten(), head)
    with torch.no_grad():
        assert model(x).argmax(1).tolist() == [0] * 5 + [1] * 7
    assert tta.adapt(model, "lame", affinity=affinity, knn=3)(x).argmax(1).tolist() == [0] * 7 + [1] * 5


def test_a_batch_of_one_returns_the_model_s_logits():
    model, x = _model(), _batch(1)
    with torch.no_grad():
        expected = _model()(x)
    assert torch.equal(tta.adapt(model, "lame")(x), expected)


def test_identical_samples_give_finite_outputs():
    x = _batch(1).expand(6, -1, -1, -1).contiguous()  # every k-th distance is 0: sigma would be 0
    out = tta.adapt(_model(), "lame")(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.softmax(1), out[:1].softmax(1).expand(6, -1))


@pytest.mark.parametrize("builder", [tiny_vit, gn_resnet])
def test_models_without_batchnorm_are_adjusted_and_left_unchanged(builder):
    pytest.importorskip("timm")
    model = builder()
    before = full_state(model)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
    out = tta.adapt(model, "lame", affinity="knn")(x)
    assert out.shape == plain.shape and not torch.allclose(out.softmax(1), plain.softmax(1))
    assert_same_state(before, full_state(model))


def test_release_gives_the_model_back_exactly():
    model = conv_net().train()
    linear, state = model[8], full_state(model)
    adapted = tta.adapt(model, "lame")
    assert isinstance(model[8], FeatureTap)
    adapted(torch.randn(6, 3, 8, 8))
    assert adapted.release() is model
    assert model[8] is linear and model.training
    assert_same_state(state, full_state(model))


def test_nan_input_is_refused():
    x = _batch()
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tta.adapt(_model(), "lame")(x)


def test_a_model_adapted_by_lame_cannot_be_adapted_again_before_release():
    model = conv_net()
    adapted = tta.adapt(model, "lame")
    with pytest.raises(ValueError, match="already adapted"):
        tta.adapt(model, "lame")
    adapted.release()
    tta.adapt(model, "lame")


def test_options_are_checked():
    with pytest.raises(ValueError, match="affinity"):
        tta.adapt(conv_net(), "lame", affinity="cosine")
    with pytest.raises(ValueError, match="knn"):
        tta.adapt(conv_net(), "lame", knn=0)
    with pytest.raises(ValueError, match="no submodule"):
        tta.adapt(conv_net(), "lame", feature_layer="head")
