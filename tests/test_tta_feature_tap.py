"""cafa's feature tap: state_dict unchanged while installed, removed cleanly, and correct under torch.compile."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import tta
from tests.test_tta_losses import _labelled_batches
from tests.tta_nets import conv_net
from tta.source_stats import FeatureTap


def test_tap_records_the_classifier_input_and_keeps_state_dict_keys():
    model = conv_net()
    before = model.state_dict()
    tap = FeatureTap.install(model, "8")
    assert isinstance(model[8], FeatureTap)
    after = model.state_dict()
    assert list(after) == list(before) and all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(5, 3, 8, 8)
    logits = model(x)
    torch.testing.assert_close(logits, model[8].layer(tap.features))
    torch.testing.assert_close(tap.features, model[:8](x))
    tap.remove()
    assert type(model[8]) is nn.Linear and model[8] is tap.layer
    assert len(list(model.modules())) == len(list(conv_net().modules()))


def test_cafa_release_gives_the_original_layers_back():
    model = conv_net()
    linear = model[8]
    adapted = tta.adapt(model, "cafa", source_stats=tta.source_stats(conv_net(), _labelled_batches()))
    assert isinstance(model[8], FeatureTap)
    assert "_recorder.weight" not in adapted.state_dict()
    assert adapted.release() is model and model[8] is linear


class HeadNet(nn.Module):
    """Conv-BN-ReLU, pooled, then ``self.linear``: a forward that calls its classifier by attribute, as ResNets do
    (with a Sequential, dynamo happened to retrace and the old hook-based recorder worked)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.linear = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def test_compiled_cafa_next_to_another_compiled_copy():
    """Regression: with a forward pre-hook, a compiled cafa reused the graph of a compiled tent copy of the same
    architecture (torch.compile does not guard on hooks) and never saw its features."""
    stats = tta.source_stats(HeadNet(), _labelled_batches())
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    other = tta.adapt(HeadNet(), "tent", optimizer="sgd", lr=1e-2)
    other.model.compile()
    with torch.no_grad():
        other(x)
    eager = tta.adapt(HeadNet(), "cafa", source_stats=stats, optimizer="sgd", lr=1e-2)
    compiled = tta.adapt(HeadNet(), "cafa", source_stats=stats, optimizer="sgd", lr=1e-2)
    compiled.model.compile()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert not torch.equal(eager.model.bn.weight, HeadNet().bn.weight)  # it did adapt
