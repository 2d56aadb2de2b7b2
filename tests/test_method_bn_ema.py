"""bn_ema: BatchNorm running statistics as an EMA of the test batches (momentum 0.1), predicting with the updated
statistics; against a hand computation, the reference's golden outputs, and the lifecycle rules."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tests.tta_nets import assert_same_state, conv3d_net, conv_net, full_state, gn_resnet, mlp_bn1d, tiny_vit

GOLDEN = Path(__file__).parent / "golden" / "bn_ema.json"
STATS = {"1.running_mean", "1.running_var", "1.num_batches_tracked",
         "4.running_mean", "4.running_var", "4.num_batches_tracked"}


def _batches(n: int = 3, size: int = 8, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=g, dtype=dtype) * 1.5 + 0.3 for _ in range(n)]


def _ema_bn(h: torch.Tensor, bn: nn.BatchNorm2d, m: float) -> torch.Tensor:
    """By hand: update bn's running statistics in place with the batch's (unbiased variance), normalise with them."""
    dims = [0, *range(2, h.dim())]
    mean, var = h.mean(dims), h.var(dims, correction=1)
    bn.running_mean.copy_((1 - m) * bn.running_mean + m * mean)
    bn.running_var.copy_((1 - m) * bn.running_var + m * var)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    normed = (h - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return normed * bn.weight.view(shape) + bn.bias.view(shape)


def _by_hand(net: nn.Sequential, x: torch.Tensor, m: float = 0.1) -> torch.Tensor:
    h = x
    with torch.no_grad():
        for layer in net:
            h = _ema_bn(h, layer, m) if isinstance(layer, nn.BatchNorm2d) else layer(h)
    return h


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_each_layer_updates_its_running_statistics_and_normalises_with_the_updated_ones(momentum):
    reference, model = conv_net().double(), conv_net().double()
    adapted = tta.adapt(model, "bn_ema", momentum=momentum)
    for step, x in enumerate(_batches()):
        expected = _by_hand(reference, x, momentum)
        torch.testing.assert_close(adapted(x), expected, atol=1e-12, rtol=0)
        for key in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
            torch.testing.assert_close(model.state_dict()[key], reference.state_dict()[key], atol=1e-12, rtol=0)
        assert int(model[1].num_batches_tracked) == int(model[4].num_batches_tracked) == step + 1


def test_momentum_zero_is_the_source_model_and_one_is_the_unbiased_batch():
    x = _batches(1)[0]
    with torch.no_grad():
        expected = conv_net().double()(x)
    assert torch.equal(tta.adapt(conv_net().double(), "bn_ema", momentum=0.0)(x), expected)
    net = conv_net().double()
    with torch.no_grad():
        h = net[0](x)
    out = tta.adapt(net, "bn_ema", momentum=1.0)(x)
    torch.testing.assert_close(net[1].running_mean, h.mean([0, 2, 3]), atol=1e-12, rtol=0)
    torch.testing.assert_close(net[1].running_var, h.var([0, 2, 3], correction=1), atol=1e-12, rtol=0)
    assert not torch.allclose(out, expected)


def test_one_update_moves_exactly_the_running_statistics():
    model = conv_net()
    before = full_state(model)
    adapted = tta.adapt(model, "bn_ema")
    adapted(_batches(1, dtype=torch.float32)[0])
    after = full_state(model)
    assert {k for k in before if not torch.equal(before[k], after[k])} == STATS


def test_one_forward_per_batch_and_two_with_two_pass():
    for options, calls in (({}, 1), ({"two_pass": True}, 2)):
        model = conv_net()
        count = []
        model[0].register_forward_hook(lambda *a: count.append(1))
        adapted = tta.adapt(model, "bn_ema", **options)
        adapted(_batches(1, dtype=torch.float32)[0])
        assert len(count) == calls


def test_the_reference_golden_outputs():
    golden = json.loads(GOLDEN.read_text())
    builders = {"conv_net": conv_net, "mlp_bn1d": mlp_bn1d, "conv3d_net": conv3d_net}
    recipe = golden["recipe"]
    for name, case in golden["cases"].items():
        model = builders[case["model"]]().double()
        adapted = tta.adapt(model, "bn_ema", **case["options"])
        g = torch.Generator().manual_seed(recipe["input_seed"])
        for step, expected in enumerate(case["logits"]):
            x = torch.randn(recipe["batch"], *case["shape"], generator=g, dtype=torch.float64) * 1.5 + 0.3
            torch.testing.assert_close(adapted(x), torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0,
                                       msg=lambda m: f"{name}, step {step + 1}: {m}")
        for key, value in case["buffers"].items():
            ours = model.state_dict()[key]
            torch.testing.assert_close(ours, torch.tensor(value, dtype=ours.dtype), atol=1e-12, rtol=0,
                                       msg=lambda m: f"{name}: {key}: {m}")


def test_one_pass_differs_from_the_reference_s_two_passes_only_beyond_the_first_layer():
    """On conv_net the first BatchNorm's statistics agree between the passes, the second's do not (its input
    comes from a layer normalised with batch statistics in the reference's first pass)."""
    one, two = conv_net().double(), conv_net().double()
    a, b = tta.adapt(one, "bn_ema"), tta.adapt(two, "bn_ema", two_pass=True)
    x = _batches(1)[0]
    out_one, out_two = a(x), b(x)
    assert torch.equal(one[1].running_mean, two[1].running_mean)
    assert not torch.allclose(one[4].running_mean, two[4].running_mean)
    assert not torch.allclose(out_one, out_two)


def test_reset_is_bitwise_and_then_behaves_as_a_fresh_adapter():
    model = conv_net()
    source = full_state(model)
    adapted = tta.adapt(model, "bn_ema")
    batches = _batches(4, dtype=torch.float32)
    first = adapted(batches[0])
    for x in batches[1:]:
        adapted(x)
    adapted.reset()
    assert_same_state(full_state(model), source)
    assert adapted.batches_seen == 0
    assert torch.equal(adapted(batches[0]), first)
    fresh = tta.adapt(conv_net(), "bn_ema")
    assert torch.equal(fresh(batches[0]), first)


def test_the_snapshot_covers_only_the_running_statistics():
    adapted = tta.adapt(conv_net(), "bn_ema")
    names = {id(t): k for k, t in adapted.model.state_dict(keep_vars=True).items()}
    assert {names[id(t)] for t in adapted._snapshot._tensors} == STATS


def test_two_runs_give_identical_results():
    runs = []
    for _ in range(2):
        adapted = tta.adapt(conv_net(), "bn_ema")
        runs.append([adapted(x) for x in _batches(3, dtype=torch.float32)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_episodic_predicts_every_batch_from_the_source_statistics():
    x = _batches(2)
    episodic = tta.adapt(conv_net().double(), "bn_ema", episodic=True)
    episodic(x[0])
    torch.testing.assert_close(episodic(x[1]), _by_hand(conv_net().double(), x[1]), atol=1e-12, rtol=0)


def test_a_batch_of_one_image_works():
    reference, model = conv_net().double(), conv_net().double()
    x = _batches(1, size=1)[0]
    torch.testing.assert_close(tta.adapt(model, "bn_ema")(x), _by_hand(reference, x), atol=1e-12, rtol=0)


class _Bn2dThenBn1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn2d = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.bn1d, self.head = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.bn2d(self.conv(x)), 1).flatten(1)
        return self.head(self.bn1d(self.fc(h)))


def test_one_value_per_channel_is_refused_before_anything_changes():
    model = _Bn2dThenBn1d().eval()
    before = full_state(model)
    adapted = tta.adapt(model, "bn_ema")
    with pytest.raises(ValueError, match="one value per channel"):
        adapted(torch.randn(1, 3, 6, 6))  # the BatchNorm2d's update was pending when the BatchNorm1d refused
    assert_same_state(before, full_state(model))
    assert all(layer.pending is None for layer in adapted.norm_layers)
    adapted(torch.randn(2, 3, 6, 6))
    assert int(model.bn2d.num_batches_tracked) == int(model.bn1d.num_batches_tracked) == 1


def test_nan_input_is_refused_before_anything_changes():
    model = conv_net()
    before = full_state(model)
    adapted = tta.adapt(model, "bn_ema")
    x = _batches(1, dtype=torch.float32)[0]
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        adapted(x)
    assert_same_state(before, full_state(model))


@pytest.mark.parametrize("builder", [tiny_vit, gn_resnet])
def test_models_without_batchnorm_are_refused_naming_their_layers(builder):
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"'bn_ema' adapts BatchNorm layers, but this model has none \(found "
                                         r"(LayerNorm|GroupNorm) x \d+"):
        tta.adapt(builder(), "bn_ema")


def test_release_gives_the_model_back_exactly():
    model = conv_net().train()
    state, types = full_state(model), [type(m) for m in model.modules()]
    adapted = tta.adapt(model, "bn_ema")
    adapted(_batches(1, dtype=torch.float32)[0])
    assert adapted.release() is model
    assert_same_state(state, full_state(model))
    assert [type(m) for m in model.modules()] == types and model.training


def test_state_dict_round_trip_continues_identically():
    batches = _batches(3, dtype=torch.float32)
    a = tta.adapt(conv_net(), "bn_ema")
    a(batches[0])
    b = tta.adapt(conv_net(), "bn_ema")
    b.load_state_dict(a.state_dict())
    assert b.batches_seen == 1
    assert torch.equal(a(batches[1]), b(batches[1]))


def test_options_are_checked():
    with pytest.raises(ValueError, match="momentum"):
        tta.adapt(conv_net(), "bn_ema", momentum=1.5)


def test_a_batch_whose_statistics_overflow_is_not_folded_in():
    model = conv_net()
    adapted = tta.adapt(model, "bn_ema")
    adapted(torch.rand(8, 3, 8, 8))
    before = full_state(model)
    adapted(torch.rand(8, 3, 8, 8) * 1e30)  # finite inputs whose variance overflows float32
    assert adapted.skipped_steps == 1
    assert_same_state(full_state(model), before)
    adapted(torch.rand(8, 3, 8, 8))
    assert adapted.skipped_steps == 1 and not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_the_cpu_fast_path_gives_the_plain_path_s_values_to_rounding():
    batches = [x.float() for x in _batches(3)]
    runs = {}
    for fast in (False, True):
        if fast:
            tta.accel.enable(kernels=True, batch_norm=True, lean_graph=False, tensor_cache=False)
        try:
            model = conv_net()
            adapted = tta.adapt(model, "bn_ema")
            runs[fast] = ([adapted(x) for x in batches], full_state(model))
        finally:
            tta.accel.disable()
    for plain, fast in zip(runs[False][0], runs[True][0]):
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, atol=1e-6, rtol=1e-5)
