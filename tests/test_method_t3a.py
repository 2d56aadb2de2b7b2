"""t3a: prototype classifier from per-class support sets (head weights + pseudo-labelled test features, the
filter_k lowest-entropy per class); against a hand computation on hand-made features, the official code's golden
outputs, and the lifecycle rules (model unchanged, state restored by reset, saved in state_dict)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, mlp_bn1d, tiny_vit
from tta.source_stats import FeatureTap

GOLDEN = Path(__file__).parent / "golden" / "t3a.json"


def _head_model() -> nn.Sequential:
    """Features are the input itself (3-d); a hand-set linear head with 3 classes."""
    head = nn.Linear(3, 3).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.5, 0.5], [0.0, -0.5, 1.0]]))
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    return nn.Sequential(nn.Flatten(), head)


FEATURES = [
    torch.tensor([[1.0, 0.1, 0.0], [0.8, 0.3, 0.1], [0.2, 1.0, 0.4], [0.9, -0.2, 0.3], [0.1, 0.2, 1.2]],
                 dtype=torch.float64),
    torch.tensor([[1.5, 0.0, 0.2], [0.0, 0.9, 0.2], [0.3, 0.1, 0.9], [0.6, 0.5, 0.0]], dtype=torch.float64),
    torch.tensor([[0.4, 0.4, 0.4]], dtype=torch.float64),  # a batch of one
]


def _entropy(logits: torch.Tensor) -> float:
    p = logits.softmax(0)
    return float(-(p * p.log()).sum())


def _by_hand(model: nn.Sequential, batches: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Supports as a Python list of (feature, label, entropy); the formulas of the module docstring, one by one."""
    head = model[1]
    with torch.no_grad():
        supports = [(w.clone(), int(head(w).argmax()), _entropy(head(w))) for w in head.weight]
        outputs = []
        for x in batches:
            for z in x:
                supports.append((z.clone(), int(head(z).argmax()), _entropy(head(z))))
            kept = []
            for c in range(3):
                members = sorted((s for s in supports if s[1] == c), key=lambda s: s[2])
                kept += members[:k] if k > 0 else members
            supports = kept
            rows = []
            for z in x:
                row = []
                for c in range(3):
                    centroid = sum((s[0] / s[0].norm() for s in supports if s[1] == c), torch.zeros(3, dtype=z.dtype))
                    norm = float(centroid.norm())
                    row.append(float(z @ centroid) / norm if norm > 0 else 0.0)
                rows.append(row)
            outputs.append(torch.tensor(rows, dtype=torch.float64))
    return outputs


@pytest.mark.parametrize("k", [100, 2, 1, -1])
def test_the_prototype_classifier_by_hand(k):
    model = _head_model()
    adapted = tta.adapt(model, "t3a", filter_k=k)
    for step, (out, expected) in enumerate(zip((adapted(x) for x in FEATURES), _by_hand(_head_model(), FEATURES, k))):
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0, msg=lambda m: f"step {step + 1}: {m}")


def test_the_filter_keeps_exactly_the_lowest_entropy_supports_of_each_class():
    model = _head_model()
    adapted = tta.adapt(model, "t3a", filter_k=2)
    adapted(FEATURES[0])
    adapted(FEATURES[1])
    head = model[1].layer
    with torch.no_grad():
        candidates = torch.cat([head.weight, FEATURES[0], FEATURES[1]])
        logits = head(candidates)
    labels = logits.argmax(1)
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    expected = []
    for c in range(3):
        members = [i for i in range(len(candidates)) if labels[i] == c]
        expected += sorted(members, key=lambda i: float(entropy[i]))[:2]
    assert torch.equal(adapted.supports, candidates[expected])
    assert adapted.labels.tolist() == labels[expected].tolist()
    torch.testing.assert_close(adapted.entropies, entropy[expected], atol=1e-15, rtol=0)


def test_the_supports_start_from_the_head_weights():
    model = mlp_bn1d(seed=1).double()
    head = model[3]
    adapted = tta.adapt(model, "t3a")
    with torch.no_grad():
        warm = head(head.weight)
    assert torch.equal(adapted.supports, head.weight)
    assert adapted.labels.tolist() == warm.argmax(1).tolist() == [0, 0, 0]  # the head's rows all say class 0
    x = torch.zeros(1, 5, dtype=torch.float64)
    with torch.no_grad():
        predicted = int(model(x).argmax())
    out = adapted(x)
    for c in range(3):  # a class without supports has logit 0
        assert (out[0, c] == 0) == (c not in (0, predicted))


def test_the_official_code_s_golden_outputs():
    golden = json.loads(GOLDEN.read_text())
    recipe = golden["recipe"]
    for name, case in golden["cases"].items():
        model = (mlp_bn1d(seed=recipe["mlp_bn1d_seed"]) if case["model"] == "mlp_bn1d" else conv_net()).double()
        adapted = tta.adapt(model, "t3a", **case["options"])
        g = torch.Generator().manual_seed(recipe["input_seed"])
        for step, (expected, sizes) in enumerate(zip(case["logits"], case["supports_per_class"])):
            x = torch.randn(recipe["batch"], *case["shape"], generator=g, dtype=torch.float64)
            torch.testing.assert_close(adapted(x), torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0,
                                       msg=lambda m: f"{name}, step {step + 1}: {m}")
            assert adapted.labels.bincount(minlength=len(sizes)).tolist() == sizes


def test_one_forward_per_batch_and_the_model_never_changes():
    model = conv_net()
    before = full_state(model)
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    adapted = tta.adapt(model, "t3a")
    for seed in range(3):
        adapted(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))
    assert len(calls) == 3
    assert_same_state(before, full_state(model))
    assert adapted._snapshot._tensors == []


def test_reset_restores_the_supports_bitwise_and_behaves_as_fresh():
    model = _head_model()
    adapted = tta.adapt(model, "t3a", filter_k=2)
    initial = (adapted.supports.clone(), adapted.labels.clone(), adapted.entropies.clone())
    first = adapted(FEATURES[0])
    adapted(FEATURES[1])
    assert adapted.supports.shape != initial[0].shape or not torch.equal(adapted.supports, initial[0])
    adapted.reset()
    for now, then in zip((adapted.supports, adapted.labels, adapted.entropies), initial):
        assert torch.equal(now, then)
    assert adapted.batches_seen == 0
    assert torch.equal(adapted(FEATURES[0]), first)
    assert torch.equal(tta.adapt(_head_model(), "t3a", filter_k=2)(FEATURES[0]), first)


def test_episodic_classifies_every_batch_from_the_head_weights_alone():
    episodic = tta.adapt(_head_model(), "t3a", episodic=True)
    episodic(FEATURES[0])
    torch.testing.assert_close(episodic(FEATURES[1]), _by_hand(_head_model(), FEATURES[1:2], 100)[0], atol=1e-12,
                               rtol=0)


def test_state_dict_round_trip_continues_identically():
    a = tta.adapt(_head_model(), "t3a", filter_k=2)
    a(FEATURES[0])
    b = tta.adapt(_head_model(), "t3a", filter_k=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.supports, b.supports) and b.batches_seen == 1
    assert torch.equal(a(FEATURES[1]), b(FEATURES[1]))


def test_two_runs_give_identical_results():
    runs = []
    for _ in range(2):
        adapted = tta.adapt(conv_net(), "t3a", filter_k=3)
        g = torch.Generator().manual_seed(4)
        runs.append([adapted(torch.randn(8, 3, 8, 8, generator=g)) for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_nan_input_is_refused_before_anything_changes():
    adapted = tta.adapt(_head_model(), "t3a")
    before = adapted.supports.clone()
    x = FEATURES[0].clone()
    x[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        adapted(x)
    assert torch.equal(adapted.supports, before)


@pytest.mark.parametrize("builder", [tiny_vit, gn_resnet])
def test_models_without_batchnorm_work_and_are_left_unchanged(builder):
    pytest.importorskip("timm")
    model = builder()
    before = full_state(model)
    adapted = tta.adapt(model, "t3a")
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert adapted(x).shape == (6, 4)
    assert adapted.supports.shape[0] == 4 + 6  # the head's 4 rows and the batch (no class over 100)
    assert_same_state(before, full_state(model))


def test_a_classifier_that_is_not_linear_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="linear classifier"):
        tta.adapt(model, "t3a", feature_layer="0")


def test_release_gives_the_model_back_exactly():
    model = conv_net().train()
    linear, state = model[8], full_state(model)
    adapted = tta.adapt(model, "t3a")
    assert isinstance(model[8], FeatureTap)
    adapted(torch.randn(6, 3, 8, 8))
    assert adapted.release() is model
    assert model[8] is linear and model.training
    assert_same_state(state, full_state(model))


def test_options_are_checked():
    for bad in (0, -2):
        with pytest.raises(ValueError, match="filter_k"):
            tta.adapt(_head_model(), "t3a", filter_k=bad)
