"""Joint-forward replay: one forward per step holding current + replay samples; reservoir buffer; ER-ACE loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from avalanche.training.supervised import ER_ACE

from continual import adab2n
from continual.benchmarks import build_benchmark
from continual.models import build_model
from continual.replay import JointReplay, ReservoirBuffer, ace_loss
from continual.runner import quiet_evaluator


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def stream():
    return build_benchmark("split-digits", n_train=80, n_test=20, tasks=2, image_size=8, seed=0)


def _model(stream, adab=True):
    torch.manual_seed(0)
    model = build_model("cnn", stream.num_classes, 3, 8, width=4)
    if adab:
        adab2n.convert_model(model, stream.num_tasks, kappa=0.5)
    return model


def _record_forwards(model):
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])) if module.training else None)
    return sizes


@pytest.mark.parametrize("loss", ["er", "er_ace"])
def test_one_joint_forward_per_step(stream, loss):
    model = _model(stream)
    sizes = _record_forwards(model)
    steps = []
    plugin = adab2n.AdaB2NPlugin(lambda_reg=1.0, classes_per_task=stream.classes_per_task)
    strategy = JointReplay(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), mem_size=30,
                           loss=loss, train_mb_size=8, eval_mb_size=64, plugins=[plugin],
                           evaluator=quiet_evaluator())
    original_step = strategy.optimizer_step

    def counted_step():
        steps.append(len(strategy.mb_y))
        original_step()

    strategy.optimizer_step = counted_step
    strategy.train(stream.train_stream[0])
    first = list(sizes)
    strategy.train(stream.train_stream[1])
    second = sizes[len(first):]
    assert len(sizes) == len(steps)  # exactly one forward per optimiser step
    assert sizes == steps  # and it holds the whole joint batch the loss sees
    n_first = len(stream.train_stream[0].dataset)
    if loss == "er":  # ER replays from the first step the buffer is non-empty
        assert first[0] == 8 and all(s > 8 for s in first[1:-1])
    else:  # ER-ACE replays from the second experience on
        assert sum(first) == n_first
    assert all(s == min(8, rest) + min(8, 30) for s, rest in
               zip(second, range(len(stream.train_stream[1].dataset), 0, -8)))
    assert adab2n.current_task(model) == 2


def test_avalanche_er_ace_two_forwards_are_refused_by_adab2n(stream):
    """Avalanche's ER_ACE normalises current and replay samples in two forwards: AdaB2N refuses that."""
    model = _model(stream)
    plugin = adab2n.AdaB2NPlugin(lambda_reg=1.0, classes_per_task=stream.classes_per_task)
    strategy = ER_ACE(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), mem_size=30,
                      batch_size_mem=8, train_mb_size=8, eval_mb_size=64, plugins=[plugin],
                      evaluator=quiet_evaluator())
    strategy.train(stream.train_stream[0])
    with pytest.raises(RuntimeError, match="ONE joint forward"):
        strategy.train(stream.train_stream[1])


def test_reservoir_keeps_the_first_samples_then_replaces_uniformly():
    buffer = ReservoirBuffer(4, seed=0)
    x = torch.arange(10.0).view(10, 1)
    y = torch.arange(10)
    buffer.add(x[:3], y[:3], torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert len(buffer) == 3 and buffer.y.tolist() == [0, 1, 2]
    buffer.add(x[3:], y[3:], torch.zeros(7, dtype=torch.long), torch.ones(7, dtype=torch.long))
    assert len(buffer) == 4 and buffer.n_seen == 10
    assert torch.equal(buffer.x[:4].view(-1).long(), buffer.y)  # images and labels stay paired
    sx, sy, st, se = buffer.sample(3)
    assert len(sy) == 3 and len(set(sy.tolist())) == 3
    assert all(int(e) == (0 if int(v) < 3 else 1) for v, e in zip(sy, se))


def test_reservoir_is_uniform_over_the_stream():
    counts = torch.zeros(20)
    for seed in range(400):
        buffer = ReservoirBuffer(5, seed=seed)
        buffer.add(torch.zeros(20, 1), torch.arange(20), torch.zeros(20, dtype=torch.long),
                   torch.zeros(20, dtype=torch.long))
        counts[buffer.y] += 1
    # each item kept with probability 5/20: 100 of 400 expected; binomial sd ~ 8.7
    assert counts.min() > 60 and counts.max() < 140


def test_buffer_state_round_trip():
    buffer = ReservoirBuffer(5, seed=3)
    buffer.add(torch.randn(12, 2), torch.arange(12), torch.zeros(12, dtype=torch.long),
               torch.arange(12) // 6)
    copy = ReservoirBuffer(5, seed=99)
    copy.load_state_dict(buffer.state_dict())
    assert copy.n_seen == 12 and torch.equal(copy.y, buffer.y) and torch.equal(copy.x, buffer.x)
    a, b = buffer.sample(3), copy.sample(3)  # the generator state travels too
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    more = (torch.randn(4, 2), torch.arange(12, 16), torch.zeros(4, dtype=torch.long), torch.full((4,), 2))
    buffer.add(*more), copy.add(*more)
    assert torch.equal(copy.y, buffer.y)


def test_ace_loss_masks_old_classes_for_current_samples():
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0]])
    labels = torch.tensor([2])
    replay_logits = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    replay_labels = torch.tensor([0])
    # seen classes 0..2, current batch holds class 2: current loss over classes {2} plus unseen {2, 3, 4}
    loss = ace_loss(logits, labels, replay_logits, replay_labels, seen_max=2)
    current = -torch.log_softmax(torch.tensor([1.0, -1.0, 0.0]), 0)[0]
    expected = current + F.cross_entropy(replay_logits, replay_labels)
    assert float(loss) == pytest.approx(float(expected))
