"""NaP: norm insertion before every nonlinearity, projection to the initial norms, function invariance."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from continual import nap, schedules
from continual.models import mlp, small_cnn
from continual.nap import NONLINEARITIES, ChannelNorm, NaP, NaPPlugin, insert_norms


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.GELU(),
                         nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3))


def _preceded_by_norm(model):
    for seq in (m for m in model.modules() if isinstance(m, nn.Sequential)):
        children = list(seq.children())
        for i, child in enumerate(children):
            if isinstance(child, NONLINEARITIES):
                assert i > 0 and isinstance(children[i - 1], ChannelNorm), f"{child} at {i} has no norm before it"


def test_insertion_places_a_norm_before_every_nonlinearity():
    model = _net()
    assert insert_norms(model) == 3
    _preceded_by_norm(model)
    widths = [m.num_features for m in model.modules() if isinstance(m, ChannelNorm)]
    assert widths == [16, 8, 8]
    assert insert_norms(model) == 0  # idempotent
    cnn = small_cnn(10, 3, width=4, batch_norm=False)
    assert insert_norms(cnn, kind="rms") == 3
    _preceded_by_norm(cnn)
    assert cnn(torch.rand(2, 3, 16, 16)).shape == (2, 10)


def test_nonlinearity_outside_a_sequential_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x))

    with pytest.raises(ValueError, match="outside an nn.Sequential"):
        insert_norms(Block())
    assert insert_norms(Block(), strict=False) == 0


def test_channel_norm_matches_layer_norm_and_rms_norm():
    x = torch.randn(5, 6)
    layer, reference = ChannelNorm(6), nn.LayerNorm(6)
    assert torch.allclose(layer(x), reference(x), atol=1e-6)
    rms = ChannelNorm(6, kind="rms")
    assert torch.allclose(rms(x), x / torch.sqrt(x.square().mean(1, keepdim=True) + 1e-5), atol=1e-6)
    maps = torch.randn(2, 6, 3, 3)  # per position over channels
    assert torch.allclose(layer(maps), reference(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=1e-6)


def _train_steps(model, steps=5, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_projection_restores_every_initial_norm_exactly():
    model = _net()
    insert_norms(model)
    head = model[-1]
    initial = {name: p.detach().norm().item() for name, p in model.named_parameters() if p.dim() > 1}
    projector = NaP(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ChannelNorm):
                m.weight.mul_(1.7).add_(0.1)
                m.bias.add_(0.3)
    _train_steps(model)
    projector.project()
    for name, p in model.named_parameters():
        if p.dim() > 1 and not name.startswith(f"{len(model) - 1}."):
            assert p.norm().item() == pytest.approx(initial[name], rel=1e-6), name
    for m in model.modules():
        if isinstance(m, ChannelNorm):  # (gamma, beta) jointly back to ||(1, ..., 1, 0, ..., 0)|| = sqrt(C)
            joint = torch.cat([m.weight, m.bias]).norm().item()
            assert joint == pytest.approx(m.num_features ** 0.5, rel=1e-6)
    assert head.weight.norm().item() != pytest.approx(initial[f"{len(model) - 1}.weight"], rel=1e-6)
    NaP(model, project_output=True).project()  # the option includes the head (to its norm at that time)


def test_project_output_option_restores_the_head():
    model = _net()
    insert_norms(model)
    head_norm = model[-1].weight.norm().item()
    projector = NaP(model, project_output=True)
    _train_steps(model)
    projector.project()
    assert model[-1].weight.norm().item() == pytest.approx(head_norm, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.2, 5.0), min_size=3, max_size=3))
def test_weight_projection_leaves_the_function_unchanged(scales):
    """Each projected weight feeds a norm layer, which is scale invariant: f(projected) = f(before).

    Exact up to the norm's eps (which breaks scale invariance by ~eps/var): a tiny eps isolates the invariance."""
    model = _net()
    insert_norms(model, eps=1e-12)
    projector = NaP(model)
    with torch.no_grad():
        for pair, scale in zip(projector.pairs, scales):
            pair.layer.weight.mul_(scale)
            pair.layer.bias.mul_(scale)
            pair.layer.weight.add_(0.05 * torch.randn_like(pair.layer.weight))
    x = torch.randn(8, 12)
    before = model(x)
    projector.project_weights()
    assert torch.allclose(model(x), before, atol=1e-5)
    for pair in projector.pairs:
        name = next(n for n, m in model.named_modules() if m is pair.layer)
        assert pair.layer.weight.norm().item() == pytest.approx(projector.targets[f"{name}.weight"], rel=1e-6)


def test_plugin_projects_every_k_steps_and_keeps_its_state():
    model = mlp(3, 12, (16, 16))
    insert_norms(model)
    plugin = NaPPlugin(NaP(model), every=2, lr_schedule=schedules.linear_decay(4))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    strategy = SimpleNamespace(optimizer=opt)
    layer = model.body[1]
    target = plugin.nap.targets["body.1.weight"]
    lrs = []
    for step in range(4):
        plugin.before_update(strategy)
        lrs.append(opt.param_groups[0]["lr"])
        with torch.no_grad():
            layer.weight.mul_(2.0)
        plugin.after_update(strategy)
        projected = layer.weight.norm().item() == pytest.approx(target, rel=1e-6)
        assert projected == (step % 2 == 1)
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])
    state = plugin.state_dict()
    other = NaPPlugin(NaP(model), every=2, lr_schedule=schedules.linear_decay(4))
    other.load_state_dict(state)
    assert other.steps == 4 and other.nap.targets == plugin.nap.targets and other.lr.step == 4


def test_schedules():
    assert [schedules.cosine_decay(4)(s) for s in (0, 2, 4, 9)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert schedules.make_schedule("constant", 10)(7) == 1.0
    per_task = schedules.make_schedule("cosine-per-task", 100, steps_per_task=4)
    assert [per_task(s) for s in (0, 2, 4, 6)] == pytest.approx([1.0, 0.5, 1.0, 0.5])
    with pytest.raises(ValueError):
        schedules.make_schedule("step", 10)


def test_weight_norms_report():
    model = _net()
    norms = nap.weight_norms(model)
    assert set(norms) == {"1", "3", "5.0", "6"}
    assert norms["1"] == pytest.approx(model[1].weight.norm().item())
