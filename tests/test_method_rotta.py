"""rotta: robust BatchNorm, the category-balanced memory, the timeliness-weighted update and the teacher, against
hand computations; reset, determinism, other norm layers, refusals; golden outputs of the reference
(tests/golden/rotta.json)."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, no_norm_net, tiny_vit
from tta.methods.rotta import CategoryBalancedMemory, RobustBatchNorm

ROOT = Path(__file__).resolve().parents[1]


def _golden_script():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks" / "golden"))  # rotta.py imports its helpers from cotta.py
    try:
        spec = importlib.util.spec_from_file_location("golden_rotta", ROOT / "benchmarks" / "golden" / "rotta.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "golden"))
    return module


def _images(n, seed=0, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_robust_batch_norm_predicts_with_its_statistics_and_trains_with_the_moving_average():
    bn = nn.BatchNorm2d(3).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    source_mean, source_var = bn.running_mean.clone(), bn.running_var.clone()
    rbn = RobustBatchNorm(bn, 0.2).eval()
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1

    def normalise(x, mean, var):
        return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) \
            * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)

    torch.testing.assert_close(rbn(x), normalise(x, source_mean, source_var), rtol=0, atol=1e-12)
    assert torch.equal(rbn.mean, source_mean)  # predicting changes nothing
    rbn.train()
    mean = 0.8 * source_mean + 0.2 * x.mean(dim=(0, 2, 3))
    var = 0.8 * source_var + 0.2 * x.var(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(rbn(x), normalise(x, mean, var), rtol=0, atol=1e-12)
    torch.testing.assert_close(rbn.mean, mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(rbn.var, var, rtol=0, atol=1e-14)
    assert torch.equal(bn.running_mean, source_mean) and torch.equal(bn.running_var, source_var)


def test_the_memory_keeps_classes_balanced_and_replaces_by_the_timeliness_uncertainty_score():
    """Capacity 4, 3 classes (room for 4/3 per class): hand-computed scores H = 1/(1 + exp(-age/4)) + U/ln 3."""
    memory = CategoryBalancedMemory(capacity=4, num_classes=3, lambda_t=1.0, lambda_u=1.0)
    for row, (label, u) in enumerate([(0, 0.1), (0, 0.2), (1, 0.3), (1, 0.4)]):
        memory.offer(row, label, u)  # classes 0 and 1 take two each (fewer than 4/3 when offered); full
    assert [[item[1] for item in items] for items in memory.classes] == [[0.1, 0.2], [0.3, 0.4], []]
    # Class 2 is below its share and the bank is full: the highest score in the majority classes (0 and 1, two each)
    # goes: ages 4, 3, 2, 1 give H = 0.8221, 0.8612, 0.8956, 0.9263 > 0.5 (the newcomer's, U = 0).
    scores = [1 / (1 + math.exp(-age / 4)) + u / math.log(3) for age, u in [(4, 0.1), (3, 0.2), (2, 0.3), (1, 0.4)]]
    assert max(scores) == scores[3] and scores[3] > 0.5
    memory.offer(4, 2, 0.0)
    assert [[item[1] for item in items] for items in memory.classes] == [[0.1, 0.2], [0.3], [0.0]]
    # Class 2 below its share again, majority class 0 (two): its best H (age 4, U 0.2: 0.9131) is below the
    # newcomer's 0.5 + 5 / ln 3 = 5.05, so the newcomer is turned away.
    memory.offer(5, 2, 5.0)
    assert [[item[1] for item in items] for items in memory.classes] == [[0.1, 0.2], [0.3], [0.0]]
    # Class 1 is below its share (one item): full bank, majority class 0 (two items, H 0.9086 and 0.9593 at ages 6
    # and 5) -> the second goes (above the newcomer's 0.5 + 0.05 / ln 3).
    memory.offer(6, 1, 0.05)
    assert [[item[1] for item in items] for items in memory.classes] == [[0.1], [0.3, 0.05], [0.0]]
    # A class at its share (two in class 1 >= 4/3) replaces within itself: ages 5 and 1 -> H 0.7773 + 0.2731 and
    # 0.5622 + 0.0455; the first goes (above the newcomer's 0.5 + 0.0091).
    memory.offer(7, 1, 0.01)
    assert [[item[1] for item in items] for items in memory.classes] == [[0.1], [0.05, 0.01], [0.0]]
    assert memory.clock == 8 and len(memory) == 4
    memory.flush(torch.arange(8, dtype=torch.float64).view(8, 1, 1, 1).expand(8, 3, 4, 4))
    images, ages = memory.contents()  # class by class, oldest first; ages = clock - entry, over the capacity
    assert images[:, 0, 0, 0].tolist() == [0.0, 6.0, 7.0, 4.0]
    assert ages == [8 / 4, 2 / 4, 1 / 4, 4 / 4]


def _hand_forward(model, x, stats, alpha, weights):
    """conv_net's forward with robust BatchNorm in training behaviour, written out; returns logits, new stats."""
    new_stats = []
    h = x
    for conv, (mean, var), (w, b) in zip((model[0], model[3]), stats, weights):
        h = F.conv2d(h, conv.weight, conv.bias, padding=1)
        mean = (1 - alpha) * mean + alpha * h.mean(dim=(0, 2, 3))
        var = (1 - alpha) * var + alpha * h.var(dim=(0, 2, 3), correction=0)
        new_stats.append((mean.detach(), var.detach()))
        h = torch.relu((h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5) * w.view(1, -1, 1, 1)
                       + b.view(1, -1, 1, 1))
    return F.linear(h.mean(dim=(2, 3)), model[8].weight, model[8].bias), new_stats


def test_an_update_is_a_step_on_the_timeliness_weighted_cross_entropy_and_the_teacher_follows():
    script = _golden_script()
    model = script.make_rotta_model()
    source = copy.deepcopy(model)
    x = _images(4, seed=2)
    with torch.no_grad():
        labels = source(x).argmax(1)
    assert torch.bincount(labels, minlength=4).max() <= 2  # all four enter a memory of 8 (two per class)
    order = sorted(range(4), key=lambda r: (labels[r].item(), r))  # class by class, oldest first
    memory_images = x[order]
    ages = torch.tensor([(4 - r) / 8 for r in order], dtype=torch.float32)
    stats = [(bn.running_mean, bn.running_var) for bn in (source[1], source[4])]
    affine = [(bn.weight.detach().clone().requires_grad_(True), bn.bias.detach().clone().requires_grad_(True))
              for bn in (source[1], source[4])]
    frozen = [(bn.weight.detach(), bn.bias.detach()) for bn in (source[1], source[4])]
    with torch.no_grad():
        teacher, teacher_stats = _hand_forward(source, memory_images, stats, 0.05, frozen)
    student, student_stats = _hand_forward(source, memory_images * 0.5, stats, 0.05, affine)
    weight = torch.exp(-ages) / (1 + torch.exp(-ages))
    loss = (-(teacher.softmax(1) * student.log_softmax(1)).sum(1) * weight).mean()
    loss.backward()
    stepped = [(w - 0.1 * w.grad, b - 0.1 * b.grad) for w, b in affine]

    adapted = tta.adapt(model, "rotta", optimizer="sgd", momentum=0.0, lr=0.1, memory_size=8, update_frequency=4,
                        nu=0.25)
    adapted.augment = lambda images: images * 0.5
    with torch.no_grad():
        expected_prediction = source(x)
    torch.testing.assert_close(adapted(x), expected_prediction, rtol=0, atol=1e-12)  # before the update
    for layer, (w, b), (mean, var) in zip(adapted.robust_layers, stepped, student_stats):
        torch.testing.assert_close(layer.weight.detach(), w, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.bias.detach(), b, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.mean, mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.var, var, rtol=0, atol=1e-12)
    teacher_layers = [m for m in adapted.teacher.modules() if isinstance(m, RobustBatchNorm)]
    for layer, (w0, b0), (w, b), (mean, var) in zip(teacher_layers, frozen, stepped, teacher_stats):
        torch.testing.assert_close(layer.weight, 0.75 * w0 + 0.25 * w, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.bias, 0.75 * b0 + 0.25 * b, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.mean, mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.var, var, rtol=0, atol=1e-12)


def test_updates_come_every_update_frequency_samples_across_batches():
    adapted = tta.adapt(conv_net().double(), "rotta", update_frequency=5, memory_size=4)
    steps = []
    for seed in range(5):
        adapted(_images(3, seed=seed))
        state = adapted.optimizer.state_dict()["state"]
        steps.append(int(state[0]["step"]) if state else 0)
    assert steps == [0, 1, 1, 2, 3]  # samples 3, 6, 9, 12, 15


def test_an_update_moves_only_the_norm_affine_parameters_and_robust_statistics():
    model = conv_net()
    before = full_state(model)
    adapted = tta.adapt(model, "rotta", update_frequency=4, memory_size=8)
    stats = [t.clone() for layer in adapted.robust_layers for t in (layer.mean, layer.var)]
    adapted(_images(4).float())
    changed = {k for k in before if not torch.equal(before[k], full_state(model)[k])}
    assert changed == {"1.weight", "1.bias", "4.weight", "4.bias"}  # running statistics untouched
    assert all(not torch.equal(a, b) for a, b in zip(stats, [t for layer in adapted.robust_layers
                                                              for t in (layer.mean, layer.var)]))


def _everything(adapted):
    tensors = {f"student.{k}": v for k, v in full_state(adapted.model).items()}
    tensors.update({f"teacher.{k}": v for k, v in full_state(adapted.teacher).items()})
    for prefix, module in (("student", adapted.model), ("teacher", adapted.teacher)):
        for name, m in module.named_modules():
            if isinstance(m, RobustBatchNorm):
                tensors[f"{prefix}.{name}.mean"], tensors[f"{prefix}.{name}.var"] = m.mean.clone(), m.var.clone()
    return tensors


def test_reset_restores_parameters_statistics_teacher_optimizer_memory_and_generators_bitwise():
    batches = [_images(6, seed=s).float() for s in range(3)]
    adapted = tta.adapt(conv_net(), "rotta", update_frequency=4, memory_size=6, seed=3)
    source = _everything(adapted)
    outputs = [adapted(x) for x in batches]
    assert adapted.optimizer.state and len(adapted.memory) > 0 and adapted.samples_seen == 18
    adapted.reset()
    assert_same_state(_everything(adapted), source)
    assert adapted.optimizer.state_dict()["state"] == {}
    assert adapted.memory is None and adapted.samples_seen == 0 and adapted.batches_seen == 0
    again = [adapted(x) for x in batches]
    fresh = tta.adapt(conv_net(), "rotta", update_frequency=4, memory_size=6, seed=3)
    for a, b, c in zip(outputs, again, [fresh(x) for x in batches]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_runs_with_one_seed_are_identical_and_the_seed_matters():
    batches = [_images(6, seed=s).float() for s in range(3)]

    def run(seed):
        adapted = tta.adapt(conv_net(), "rotta", update_frequency=3, memory_size=6, lr=0.05, seed=seed)
        return [adapted(x) for x in batches]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[-1], c[-1])  # different strong augmentations


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet])
def test_layernorm_and_groupnorm_models_adapt_their_norm_affine_parameters_and_reset(make):
    model = make()
    before = full_state(model)
    norm_params = {n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
                   for n in (f"{n}.weight", f"{n}.bias")}
    adapted = tta.adapt(model, "rotta", update_frequency=4, memory_size=4, lr=0.01)
    adapted(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    changed = {k for k in before if not torch.equal(before[k], full_state(model)[k])}
    assert changed and changed <= norm_params
    adapted.reset()
    assert_same_state(full_state(model), before)


def test_a_batch_of_one_works():
    adapted = tta.adapt(conv_net(), "rotta", update_frequency=2, memory_size=4)
    outputs = [adapted(_images(1, seed=s).float()) for s in range(4)]
    assert all(o.shape == (1, 4) for o in outputs) and adapted.optimizer.state


def test_refusals_name_the_problem_and_change_nothing():
    model = conv_net()
    model[1] = nn.BatchNorm2d(6, track_running_stats=False)
    state = full_state(model)
    with pytest.raises(ValueError, match="without them"):
        tta.adapt(model, "rotta")
    assert_same_state(full_state(model), state) and isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="steps must be 1"):
        tta.adapt(conv_net(), "rotta", steps=2)
    with pytest.raises(ValueError, match="none"):
        tta.adapt(no_norm_net(), "rotta")
    adapted = tta.adapt(conv_net(), "rotta", episodic=True)
    with pytest.raises(ValueError, match="rotta: .*1 or 3 channels"):
        adapted(torch.rand(4, 2, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        adapted(torch.full((4, 3, 8, 8), float("nan")))
    assert adapted.memory is None and adapted.samples_seen == 0


def test_release_gives_back_the_model_exactly():
    model = conv_net()
    state, types = full_state(model), [type(m) for m in model.modules()]
    adapted = tta.adapt(model, "rotta", update_frequency=2, memory_size=4)
    adapted(_images(4).float())
    assert adapted.release() is model
    assert_same_state(full_state(model), state)
    assert [type(m) for m in model.modules()] == types
    assert all(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("scenario", ["small_memory", "weights", "defaults"])
def test_matches_the_reference_implementation(scenario):
    """Golden outputs of MD's rotta (benchmarks/golden/rotta.py), float64, the strong augmentation injected."""
    script = _golden_script()
    golden = json.loads((ROOT / "tests" / "golden" / "rotta.json").read_text())["scenarios"][scenario]
    o = golden["options"]
    adapted = tta.adapt(script.make_rotta_model(), "rotta", memory_size=o["memory_size"],
                        update_frequency=o["update_frequency"], nu=o["nu"], rbn_momentum=o["alpha"],
                        lambda_t=o["lambda_t"], lambda_u=o["lambda_u"])
    adapted.augment = script.FixedAugment()
    for x, expected in zip(script.make_batches(o["batches"]), golden["outputs"], strict=True):
        torch.testing.assert_close(adapted(x), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert [len(items) for items in adapted.memory.classes] == golden["memory_per_class"]
    assert adapted.optimizer.state[adapted.params[0]]["step"] == golden["updates"]
    for prefix, module in (("student", adapted.model), ("teacher", adapted.teacher)):
        params = dict(module.named_parameters())
        for name, value in golden[prefix].items():
            torch.testing.assert_close(params[name], torch.tensor(value, dtype=torch.float64), rtol=0, atol=1e-12)
        for name, (mean, var) in golden[f"{prefix}_statistics"].items():
            layer = module.get_submodule(name)
            torch.testing.assert_close(layer.mean, torch.tensor(mean, dtype=torch.float64), rtol=0, atol=1e-12)
            torch.testing.assert_close(layer.var, torch.tensor(var, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_saved_state_dict_resumes_exactly():
    """Teacher, robust statistics, memory, counters, optimizer and generators travel in the adapter's state_dict."""
    import io

    batches = [_images(6, seed=s).float() for s in range(5)]
    first = tta.adapt(conv_net(), "rotta", update_frequency=4, memory_size=6, seed=3)
    for x in batches[:2]:
        first(x)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    second = tta.adapt(conv_net(), "rotta", update_frequency=4, memory_size=6, seed=3)
    second.load_state_dict(torch.load(saved, weights_only=False))
    assert second.samples_seen == 12 and len(second.memory) == len(first.memory)
    assert all(torch.equal(first(x), second(x)) for x in batches[2:])
