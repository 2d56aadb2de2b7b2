"""tent, core and cafa against hand-written computations; source_stats against a direct computation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from torch import nn

import tta
from tests.tta_nets import conv_net
from tta.methods.cafa import TiedMahalanobis, cafa_loss, mahalanobis_squared, regularised_inverse
from tta.methods.core import class_correlation_loss
from tta.methods.tent import softmax_entropy


def _hand_tent_step(model: nn.Module, x: torch.Tensor, make_opt) -> torch.Tensor:
    """The textbook tent step: train-mode BN, only BN affine params trainable, entropy loss, one update."""
    model.train()
    params = []
    for m in model.modules():
        for p in m.parameters(recurse=False):
            p.requires_grad_(isinstance(m, nn.BatchNorm2d))
            if isinstance(m, nn.BatchNorm2d):
                params.append(p)
    opt = make_opt(params)
    logits = model(x)
    p = torch.softmax(logits, 1)
    loss = -(p * torch.log(p)).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return logits.detach()


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.999)),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
}


def assert_step_close(adapted: nn.Module, reference: nn.Module, optimizer: str, lr: float = 1e-2) -> None:
    """Parameters after one step of ours equal those after the hand-written step.

    Adam's first step is ``lr * g / (|g| + 1e-8)``: where a gradient is at float32 rounding level (|g| < 1e-6,
    e.g. 9e-9), two correct float32 computations of g give different steps, so there the parameter is only
    required to have moved by at most 2 lr; elsewhere the float32 noise in g moves Adam's step by under 1e-6.
    SGD's step is linear in g and matches tightly.
    """
    for p, q in zip(adapted.parameters(), reference.parameters()):
        if optimizer == "adam" and q.grad is not None:
            tiny = q.grad.abs() < 1e-6
            torch.testing.assert_close(p[~tiny], q[~tiny], rtol=1e-4, atol=1e-6)
            assert ((p[tiny] - q[tiny]).abs() <= 2 * lr).all()
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer, make_opt", [
    ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.999))),
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True)),
])
def test_one_tent_step_equals_a_hand_written_entropy_step(optimizer, make_opt):
    x = torch.randn(12, 3, 8, 8)
    reference = conv_net()
    expected_logits = _hand_tent_step(reference, x, make_opt)
    model = conv_net()
    logits = tta.adapt(model, "tent", optimizer=optimizer, lr=1e-2)(x)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    # the BN affine parameters really moved
    assert not torch.equal(model[1].weight, conv_net()[1].weight)


def test_two_tent_steps_equal_two_hand_written_steps():
    x1, x2 = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    reference = conv_net()
    reference.train()
    params = [p for m in reference.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    for p in reference.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=1e-3)
    for x in (x1, x2):
        loss = softmax_entropy(reference(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted = tta.adapt(conv_net(), "tent")
    adapted(x1)
    adapted(x2)
    for p, q in zip(adapted.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_softmax_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [np.log(3.0), 0.0]], dtype=torch.float32)
    expected = torch.tensor([np.log(2.0), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))], dtype=torch.float32)
    torch.testing.assert_close(softmax_entropy(logits), expected)


def test_class_correlation_loss_by_hand():
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert class_correlation_loss(one_hot).item() == 0.0  # M = diag(.5, .5): no off-diagonal mass
    uniform = torch.full((3, 2), 0.5)
    assert class_correlation_loss(uniform).item() == pytest.approx(0.5)  # M = 0.25 everywhere
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    m = np.zeros((3, 3))
    for row in p.numpy():
        m += np.outer(row, row) / 2
    expected = (m.sum() - np.trace(m)) / m.sum()
    assert class_correlation_loss(p).item() == pytest.approx(expected, rel=1e-6)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(2, 5), d=st.integers(1, 4), tied=st.booleans(), seed=st.integers(0, 99))
def test_cafa_loss_by_hand(b, c, d, tied, seed):
    g = np.random.default_rng(seed)
    features = g.normal(size=(b, d))
    means = g.normal(size=(c, d))
    logits = g.normal(size=(b, c))
    a = g.normal(size=(c, d, d))
    precision = a @ np.transpose(a, (0, 2, 1)) + np.eye(d)
    if tied:
        precision = precision[0]
    expected = 0.0
    for i in range(b):
        dist = []
        for k in range(c):
            diff = features[i] - means[k]
            s_inv = precision if tied else precision[k]
            dist.append(diff @ s_inv @ diff)
        expected += np.log(dist[int(np.argmax(logits[i]))] / np.sum(dist))
    expected /= b
    got = cafa_loss(*(torch.tensor(v) for v in (features, logits, means, precision)))
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_regularised_inverse_is_the_inverse_of_the_ridged_covariance():
    a = torch.randn(5, 5, dtype=torch.float64)
    s = a @ a.T
    ridge = 0.1
    expected = torch.linalg.inv(s + ridge * torch.trace(s) / 5 * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(regularised_inverse(s, ridge), expected)
    d = mahalanobis_squared(torch.zeros(1, 5, dtype=torch.float64), torch.ones(1, 5, dtype=torch.float64), expected)
    assert d.item() == pytest.approx(float(torch.ones(5, dtype=torch.float64) @ expected @ torch.ones(5, dtype=torch.float64)))


def _labelled_batches(n_batches=5, batch=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.arange(batch) % classes) for _ in range(n_batches)]


def test_source_stats_equal_a_direct_computation(tmp_path):
    model = conv_net()
    batches = _labelled_batches()
    stats = tta.source_stats(model, batches)
    feats, labels = [], []
    with torch.no_grad():
        for x, y in batches:
            feats.append(model[:-1](x).double())
            labels.append(y)
    f, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    pooled = np.zeros((f.shape[1], f.shape[1]))
    for c in range(4):
        fc = f[y == c]
        np.testing.assert_allclose(stats.means[c].numpy(), fc.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.class_covariances[c].numpy(), np.cov(fc, rowvar=False), rtol=1e-8, atol=1e-10)
        pooled += (fc - fc.mean(0)).T @ (fc - fc.mean(0))
    np.testing.assert_allclose(stats.tied_covariance.numpy(), pooled / (len(f) - 4), rtol=1e-8, atol=1e-10)
    assert stats.counts.tolist() == [25.0] * 4 and stats.feature_layer == "8"
    stats.save(tmp_path / "stats.pt")
    loaded = tta.SourceStats.load(tmp_path / "stats.pt")
    assert torch.equal(loaded.tied_covariance, stats.tied_covariance) and loaded.feature_layer == "8"


def test_source_stats_errors(tmp_path):
    with pytest.raises(ValueError, match="no samples of class"):
        tta.source_stats(conv_net(), [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))])
    with pytest.raises(FileNotFoundError):
        tta.SourceStats.load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read"):
        tta.SourceStats.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("covariance", ["tied", "class"])
def test_cafa_step_equals_hand_written_step(covariance, optimizer):
    stats = tta.source_stats(conv_net(), _labelled_batches())
    x = torch.randn(10, 3, 8, 8)
    reference = conv_net().train()
    params = [p for m in reference.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    for p in reference.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = OPTIMIZERS[optimizer](params)
    features = reference[:-1](x)
    logits = reference[-1](features)
    cov = stats.tied_covariance if covariance == "tied" else stats.class_covariances
    precision = regularised_inverse(cov, 1e-3).float()
    loss = cafa_loss(features, logits, stats.means.float(), precision)
    opt.zero_grad()
    loss.backward()
    opt.step()
    adapted = tta.adapt(conv_net(), "cafa", source_stats=stats, covariance=covariance, lr=1e-2, optimizer=optimizer)
    torch.testing.assert_close(adapted(x), logits.detach(), rtol=1e-5, atol=1e-6)
    assert_step_close(adapted.model, reference, optimizer)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_core_step_equals_hand_written_step(optimizer):
    alpha = 0.3
    x = torch.randn(10, 3, 8, 8)
    reference = conv_net()
    bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]

    def mixed_forward(module, inputs):
        (h,) = inputs
        mu_t, var_t = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        mu = alpha * module.running_mean + (1 - alpha) * mu_t
        var = alpha * module.running_var + (1 - alpha) * var_t
        return ((h - mu[:, None, None]) / torch.sqrt(var[:, None, None] + module.eps)) * module.weight[:, None, None] \
            + module.bias[:, None, None]

    handles = [bn.register_forward_hook(lambda m, i, o: mixed_forward(m, i)) for bn in bns]
    params = [p for bn in bns for p in bn.parameters()]
    for p in reference.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = OPTIMIZERS[optimizer](params)
    logits = reference(x)
    loss = class_correlation_loss(logits.softmax(1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    for h in handles:
        h.remove()
    adapted = tta.adapt(conv_net(), "core", alpha=alpha, lr=1e-2, optimizer=optimizer)
    torch.testing.assert_close(adapted(x), logits.detach(), rtol=1e-5, atol=1e-6)
    assert_step_close(adapted.model, reference, optimizer)


@given(b=st.integers(1, 6), c=st.integers(2, 5), d=st.integers(1, 6), offset=st.sampled_from([0.0, 10.0, 1e3]),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=40, deadline=None)
@example(b=1, c=2, d=1, offset=1e3, seed=0)  # found by CI: distances of 0.004 around 1000
def test_tied_expanded_form_equals_the_direct_form_in_float32(b, c, d, offset, seed):
    """The expanded quadratic form, in float32, against the direct (f - mu) P (f - mu) in float64, including
    features far from the origin (offset) and features lying exactly on a class mean (distance 0, never < 0)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(c, d)) + offset
    a = rng.normal(size=(d, d))
    precision = np.linalg.inv(a @ a.T + d * np.eye(d))
    features = np.concatenate([rng.normal(size=(b, d)) * 0.5 + offset, means[:1]])
    features = features.astype(np.float32).astype(np.float64)  # the float32 input the layer actually sees
    direct = np.einsum("bcd,de,bce->bc", features[:, None] - means[None], precision, features[:, None] - means[None])
    got = TiedMahalanobis(torch.tensor(means), torch.tensor(precision), torch.float32)(
        torch.tensor(features, dtype=torch.float32))
    assert (got >= 0).all() and got.dtype == torch.float32
    scale = direct.max()
    np.testing.assert_allclose(got.double().numpy(), direct, rtol=1e-4, atol=1e-5 * scale)
