"""AdaB2N: weighted statistics, momentum schedule, BatchNorm equivalence, checkpoint round trip, plugin."""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from continual import adab2n
from continual.adab2n import AdaB2N, eta_schedule, eta_step


def _layer(num_tasks=2, task=1, **kwargs):
    layer = AdaB2N(1, num_tasks, **{"eps": 0.0, **kwargs})
    layer.task.fill_(task)
    return layer.train()


# three samples, one channel, 1x2 pixels; per-sample means 1, 2, 4
X = torch.tensor([[[[0.0, 2.0]]], [[[2.0, 2.0]]], [[[3.0, 5.0]]]])


def test_weighted_statistics_by_hand():
    layer = _layer(eps=0.0)
    layer.set_sample_tasks(torch.tensor([0, 0, 1]))
    y = layer(X)
    # n = (2, 1), w = 0: pi = ((1 + 2) / 5, (1 + 1) / 5) = (0.6, 0.4); s = (0.3, 0.3, 0.4)
    # mu = 0.3*1 + 0.3*2 + 0.4*4 = 2.5
    # var = 0.3*mean((0-2.5)^2, (2-2.5)^2) + 0.3*mean(0.25, 0.25) + 0.4*mean(0.25, 6.25) = 2.35
    assert layer.batch_mean.item() == pytest.approx(2.5)
    assert layer.batch_var.item() == pytest.approx(2.35)
    assert torch.allclose(y, (X - 2.5) / math.sqrt(2.35), atol=1e-6)


def test_learned_log_weights_enter_the_posterior_and_get_gradients():
    layer = _layer()
    with torch.no_grad():
        layer.task_log_weights.copy_(torch.tensor([math.log(3.0), 0.0]))
    layer.set_sample_tasks(torch.tensor([0, 0, 1]))
    layer(X).square().sum().backward()
    # concentration (3 + 2, 1 + 1) -> pi = (5/7, 2/7); s = (5/14, 5/14, 2/7)
    expected = 5 / 14 * 1 + 5 / 14 * 2 + 2 / 7 * 4
    assert layer.batch_mean.item() == pytest.approx(expected)
    assert layer.task_log_weights.grad is not None and layer.task_log_weights.grad.abs().sum() > 0


def test_prior_over_seen_or_present_tasks():
    counts = torch.tensor([1.0, 0.0, 2.0])
    w = torch.zeros(3)
    # seen (tasks 0..2): concentration (2, 1, 3) / 6; the absent task 1 keeps prior mass
    assert adab2n.task_weights(w, counts, 2, "seen").tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    # present: only tasks with samples, weights of the present samples sum to 1
    assert adab2n.task_weights(w, counts, 2, "present").tolist() == pytest.approx([2 / 5, 0.0, 3 / 5])
    # unseen future tasks never take mass
    assert adab2n.task_weights(torch.zeros(5), counts.new_tensor([1, 1, 0, 0, 0]), 1, "seen")[2:].sum() == 0


def test_first_task_uses_plain_batch_statistics():
    layer = _layer(task=0)
    layer.set_sample_tasks(torch.tensor([0, 0, 1]))  # ignored on the first task
    layer(X)
    assert layer.batch_mean.item() == pytest.approx(X.mean().item())
    assert layer.batch_var.item() == pytest.approx(X.var(correction=0).item())


def test_momentum_recursion_by_hand():
    m = 0.1
    # kappa = 0: cumulative average 1/t
    assert [eta_schedule(t, m, 0.0) for t in (1, 2, 3, 10)] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 10])
    # kappa = 1: BatchNorm's momentum
    assert [eta_schedule(t, m, 1.0) for t in (1, 2, 50)] == pytest.approx([m, m, m])
    # kappa = 0.5: eta_1 = sqrt(0.1); eta_2 = eta_1 / (eta_1 + sqrt(0.9)) = 0.25 exactly (sqrt(0.9) = 3 sqrt(0.1))
    eta1 = math.sqrt(0.1)
    assert eta_schedule(1, m, 0.5) == pytest.approx(eta1)
    assert eta_schedule(2, m, 0.5) == pytest.approx(0.25)
    assert eta_schedule(3, m, 0.5) == pytest.approx(0.25 / (0.25 + math.sqrt(0.9)))


@settings(max_examples=60, deadline=None)
@given(st.floats(0.01, 0.9), st.floats(0.0, 1.0), st.integers(1, 60))
@example(0.125, 5.960464477539063e-08, 3)  # c = (1 - m)^kappa within 1e-8 of 1: the closed form's cancellation
def test_closed_form_equals_recursion(m, kappa, t):
    eta = 0.0
    for step in range(1, t + 1):
        eta = eta_step(eta, step, m, kappa)
    assert eta == pytest.approx(eta_schedule(t, m, kappa), rel=1e-9)
    assert 0.0 < eta <= 1.0


def test_layer_running_statistics_follow_the_schedule():
    torch.manual_seed(0)
    layer = AdaB2N(3, 2, kappa=0.4, momentum=0.2).train()
    mean = torch.zeros(3)
    for t in range(1, 6):
        x = torch.randn(4, 3, 2, 2) + t
        layer(x)
        eta = eta_schedule(t, 0.2, 0.4)
        mean = mean + eta * (x.mean((0, 2, 3)) - mean)
        assert float(layer.eta) == pytest.approx(eta)
        assert int(layer.num_batches_tracked) == t
    assert torch.allclose(layer.running_mean, mean, atol=1e-6)


@pytest.mark.parametrize("task", [0, 1])
def test_kappa_one_with_equal_task_counts_is_batchnorm(task):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    layer = AdaB2N.from_batchnorm(bn, num_tasks=3, kappa=1.0, unbiased_running_var=True).train()
    layer.task.fill_(task)
    for _ in range(4):
        x = torch.randn(6, 4, 3, 3) * 2 + 1
        layer.set_sample_tasks(torch.tensor([0, 1, 0, 1, 0, 1]))  # equal counts, equal (zero) log-weights
        assert torch.allclose(layer(x), bn(x), atol=1e-5)
    assert torch.allclose(layer.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(layer.running_var, bn.running_var, atol=1e-6)
    layer.eval(), bn.eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(layer(x), bn(x), atol=1e-6)


def test_default_running_variance_is_the_biased_one():
    bn = nn.BatchNorm2d(2).train()
    layer = AdaB2N.from_batchnorm(bn, 2, kappa=1.0).train()
    x = torch.randn(5, 2, 2, 2)
    bn(x), layer(x)
    n = 5 * 2 * 2
    # BatchNorm2d: 0.9 * 1 + 0.1 * unbiased; AdaB2N (METHODS.md): 0.9 * 1 + 0.1 * biased
    assert torch.allclose(layer.running_var - 0.9, (bn.running_var - 0.9) * (n - 1) / n, atol=1e-6)


def _trained_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    adab2n.convert_model(model, num_tasks=3, kappa=0.4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        if step == 2:
            adab2n.advance_task(model)
        adab2n.set_sample_tasks(model, torch.tensor([0, 1, 1, 0]) if step >= 2 else None)
        loss = model(torch.randn(4, 3, 6, 6)).square().mean() + adab2n.regularizer(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        adab2n.clear_batch_state(model)
    return model


def test_checkpoint_round_trip_keeps_all_state():
    model = _trained_model()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    for key in ("1.eta", "1.task", "1.num_batches_tracked", "1.task_log_weights", "4.running_var"):
        assert key in state
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    adab2n.convert_model(fresh, num_tasks=3, kappa=0.4)
    fresh.load_state_dict(state)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    layer = fresh[1]
    assert int(layer.task) == 1 and int(layer.num_batches_tracked) == 5
    assert float(layer.eta) == pytest.approx(eta_schedule(5, 0.1, 0.4))
    assert layer.eta.dtype == torch.float64
    # both continue identically: the next eta comes from the restored one
    x = torch.randn(4, 3, 6, 6)
    for m in (model, fresh):
        adab2n.set_sample_tasks(m, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(model(x), fresh(x))
    assert float(fresh[1].eta) == float(model[1].eta) == pytest.approx(eta_schedule(6, 0.1, 0.4))


def test_convert_model_copies_batchnorm_state():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
        bn.weight.fill_(1.5)
    bn.num_batches_tracked.fill_(7)
    model = adab2n.convert_model(nn.Sequential(bn), num_tasks=4, kappa=0.5)
    layer = model[0]
    assert isinstance(layer, AdaB2N) and layer.num_tasks == 4
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.weight, bn.weight)
    assert float(layer.eta) == pytest.approx(eta_schedule(7, 0.1, 0.5))  # resumes the schedule at t = 7
    with pytest.raises(ValueError, match="no BatchNorm"):
        adab2n.convert_model(nn.Linear(2, 2), 2)


def test_two_forwards_with_one_task_assignment_raise():
    layer = _layer()
    layer.set_sample_tasks(torch.tensor([0, 0, 1]))
    layer(X)
    with pytest.raises(RuntimeError, match="ONE joint forward"):
        layer(X)
    layer.set_sample_tasks(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one joint forward"):
        layer(X)


def test_plugin_sets_tasks_adds_regulariser_and_advances():
    torch.manual_seed(3)
    model = adab2n.convert_model(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), num_tasks=2)
    plugin = adab2n.AdaB2NPlugin(lambda_reg=2.0, classes_per_task=2)
    strategy = SimpleNamespace(model=model.train(), mb_y=torch.tensor([0, 1, 2, 3]), loss=torch.zeros(()))
    plugin.before_forward(strategy)
    assert model[1].sample_tasks.tolist() == [0, 0, 1, 1]
    model(torch.randn(4, 1, 2, 2))
    plugin.before_backward(strategy)  # task 0 < reg_start_task: nothing added
    assert float(strategy.loss) == 0.0
    plugin.after_training_iteration(strategy)
    assert model[1].sample_tasks is None and model[1].batch_mean is None
    plugin.after_training_exp(strategy)
    assert adab2n.current_task(model) == 1
    plugin.before_forward(strategy)
    model(torch.randn(4, 1, 2, 2))
    expected = 2.0 * float(adab2n.regularizer(model).detach())
    plugin.before_backward(strategy)
    assert float(strategy.loss.detach()) == pytest.approx(expected) and expected > 0
    strategy.mb_y = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="outside"):
        plugin.before_forward(strategy)
