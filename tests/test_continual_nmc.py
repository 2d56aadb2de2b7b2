"""NMC: streaming class means equal the means at once (any order, any batching); argmin-distance predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from continual.benchmarks import build_benchmark
from continual.nmc import ForwardFeatures, NMCClassifier, NMCStrategy, StreamingClassMeans
from continual.runner import AccuracyPlugin, quiet_evaluator

torch.manual_seed(0)
FEATURES = F.normalize(torch.randn(30, 5, dtype=torch.float64), dim=1)
LABELS = torch.randint(0, 4, (30,))
LABELS[:4] = torch.arange(4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _at_once() -> torch.Tensor:
    return torch.stack([FEATURES[LABELS == c].mean(0) for c in range(4)])


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(30))), st.integers(1, 30))
def test_streaming_means_equal_means_at_once_in_any_order(order, batch):
    means = StreamingClassMeans(4, 5)
    index = torch.tensor(order)
    for start in range(0, 30, batch):
        chunk = index[start:start + batch]
        means.update(FEATURES[chunk], LABELS[chunk])
    assert torch.allclose(means.means, _at_once(), atol=1e-12)
    assert means.counts.tolist() == torch.bincount(LABELS, minlength=4).tolist()


def test_per_sample_recursion_is_the_batch_update():
    means = StreamingClassMeans(4, 5)
    mu = torch.zeros(4, 5, dtype=torch.float64)
    n = torch.zeros(4)
    for f, y in zip(FEATURES, LABELS):
        means.update(f[None], y[None])
        n[y] += 1
        mu[y] = mu[y] + (f - mu[y]) / n[y]  # mu_c <- mu_c + (f - mu_c) / n_c
    assert torch.allclose(means.means, mu, atol=1e-14)


@pytest.mark.parametrize("metric,renormalize", [("euclidean", False), ("euclidean", True), ("cosine", False)])
def test_predictions_are_the_nearest_mean(metric, renormalize):
    model = NMCClassifier(nn.Flatten(), num_classes=5, dim=5, metric=metric, renormalize=renormalize)
    model.update(FEATURES.float(), LABELS)
    queries = torch.randn(12, 5)
    f = F.normalize(queries, dim=1).double().numpy()
    means = _at_once().numpy()
    if renormalize or metric == "cosine":
        means = means / np.linalg.norm(means, axis=1, keepdims=True)
    if metric == "euclidean":
        dist = np.linalg.norm(f[:, None, :] - means[None], axis=2)
    else:
        dist = 1 - f @ means.T
    predicted = model(queries).argmax(1).numpy()
    assert np.array_equal(predicted, dist.argmin(1))
    assert not (predicted == 4).any()  # class 4 was never seen: never predicted
    assert torch.isinf(model(queries)[:, 4]).all()


def test_extractor_stays_frozen_in_eval_mode():
    extractor = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    model = NMCClassifier(extractor, 2, 3).train()
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    before = extractor[2].running_mean.clone()
    model.update(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    assert torch.equal(extractor[2].running_mean, before)


def test_strategy_on_a_task_stream_is_task_free():
    stream = build_benchmark("split-digits", n_train=100, n_test=50, image_size=8, seed=0)
    model = NMCClassifier(ForwardFeatures(_FlatFeatures()), stream.num_classes, 192)
    accuracy = AccuracyPlugin()
    strategy = NMCStrategy(model=model, train_mb_size=7, eval_mb_size=50, plugins=[accuracy],
                           evaluator=quiet_evaluator())
    for experience in stream.train_stream:
        strategy.train(experience)
    x = torch.stack([stream.train_stream[i].dataset[k][0] for i in range(5)
                     for k in range(len(stream.train_stream[i].dataset))])
    y = torch.tensor([stream.train_stream[i].dataset[k][1] for i in range(5)
                      for k in range(len(stream.train_stream[i].dataset))])
    f = F.normalize(x.flatten(1).double(), dim=1)
    expected = torch.stack([f[y == c].mean(0) for c in range(10)])
    assert torch.allclose(model.class_means.means, expected, atol=1e-10)
    strategy.eval(stream.test_stream)
    row = accuracy.row(5)
    assert all(0.0 <= a <= 1.0 for a in row) and np.mean(row) > 0.5  # nearest mean of raw digits works


class _FlatFeatures(nn.Module):
    def forward_features(self, x):
        return x.flatten(1)
