"""shot_im: the information-maximisation loss and the SGD-Nesterov step against hand computations; what is frozen;
reset, determinism, LayerNorm/GroupNorm models."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import tta
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, mlp_bn1d, tiny_vit


def _batch(seed=0, n=8, dtype=torch.float64):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _hand_loss(logits, eps=1e-5):
    """mean_i H(p_i) - H(mean_i p_i), written out with explicit sums."""
    n, c = logits.shape
    total = 0.0
    mean = [0.0] * c
    for i in range(n):
        z = [float(v) for v in logits[i]]
        norm = sum(math.exp(v) for v in z)
        p = [math.exp(v) / norm for v in z]
        total += -sum(pc * math.log(pc) for pc in p) / n
        mean = [m + pc / n for m, pc in zip(mean, p)]
    return total + sum(m * math.log(m + eps) for m in mean)


def test_loss_equals_the_hand_computation():
    x = _batch()
    model = conv_net().double()
    adapted = tta.adapt(model, "shot_im")
    with torch.no_grad():
        logits = model(x)
        assert math.isclose(float(adapted.loss(x, logits)), _hand_loss(logits), rel_tol=0, abs_tol=1e-12)
        # a collapsed batch (every sample the same confident class) scores higher than a diverse one
        collapsed = torch.tensor([[4.0, 0, 0, 0]] * 4, dtype=torch.float64)
        diverse = torch.eye(4, dtype=torch.float64) * 4
        assert adapted.loss(x, collapsed) > adapted.loss(x, diverse)
        assert math.isclose(float(adapted.loss(x, diverse)), _hand_loss(diverse), abs_tol=1e-12)


def test_one_update_is_an_sgd_nesterov_step_on_every_parameter_but_the_head():
    x = _batch(1)
    model = conv_net().double()
    before = full_state(model)
    # the gradient by hand: the same network with batch statistics (train-mode BatchNorm), the loss written out
    twin = copy.deepcopy(model).train()
    probs = twin(x).softmax(1)
    mean = probs.mean(0)
    loss = -(probs * torch.log(probs)).sum(1).mean() + (mean * torch.log(mean + 1e-5)).sum()
    grads = dict(zip([n for n, _ in twin.named_parameters()], torch.autograd.grad(loss, list(twin.parameters()))))
    tta.adapt(model, "shot_im")(x)
    after = full_state(model)
    for name, value in before.items():
        if name in grads and not name.startswith("8."):
            # first SGD step with momentum 0.9 and Nesterov: theta - lr (g + 0.9 g)
            torch.testing.assert_close(after[name], value - 1e-3 * 1.9 * grads[name], rtol=0, atol=1e-15)
            if name not in ("0.bias", "3.bias"):  # a conv bias before batch-statistics BN has zero gradient
                assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name  # the head (8.*) and the BN running statistics


def test_classifier_layer_option_names_the_head():
    model = mlp_bn1d()  # Linear(5, 7) - BN - ReLU - Linear(7, 3)
    before = full_state(model)
    adapted = tta.adapt(model, "shot_im", classifier_layer="0", lr=0.1)
    adapted(torch.rand(6, 5, generator=torch.Generator().manual_seed(0)))
    after = full_state(model)
    assert torch.equal(after["0.weight"], before["0.weight"]) and not torch.equal(after["3.weight"],
                                                                                  before["3.weight"])
    with pytest.raises(ValueError, match="no submodule"):
        tta.adapt(mlp_bn1d(), "shot_im", classifier_layer="missing")


def test_reset_is_bitwise_and_a_reset_adapter_equals_a_fresh_one():
    model = conv_net()
    source = full_state(model)
    adapted = tta.adapt(model, "shot_im", lr=0.05)
    first = adapted(_batch(0, dtype=torch.float32))
    for seed in range(1, 4):
        adapted(_batch(seed, dtype=torch.float32))
    assert adapted.optimizer.state
    adapted.reset()
    assert_same_state(full_state(model), source)
    assert adapted.optimizer.state_dict()["state"] == {}
    assert torch.equal(adapted(_batch(0, dtype=torch.float32)), first)
    assert adapted.release() is model
    assert_same_state(full_state(model), source)
    assert all(p.requires_grad for p in model.parameters())


def test_two_runs_are_identical():
    def run():
        adapted = tta.adapt(conv_net(), "shot_im", lr=0.05)
        return torch.stack([adapted(_batch(s, dtype=torch.float32)) for s in range(3)])

    assert torch.equal(run(), run())


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet])
def test_layernorm_and_groupnorm_models_train_everything_but_the_head(make):
    model = make()
    head_name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    before = full_state(model)
    tta.adapt(model, "shot_im", lr=0.05)(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    after = full_state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in changed if k.startswith(head_name + ".")}
    assert {n for n in changed if "norm" in n or n.startswith("bn")}  # norm layers move
    assert any(k.endswith("weight") and "norm" not in k and not k.startswith("bn") for k in changed)  # and others


def test_a_batch_of_one_is_refused_with_batchnorm():
    with pytest.raises(ValueError, match="batch of 1"):
        tta.adapt(conv_net(), "shot_im")(torch.rand(1, 3, 8, 8))


def test_declarations():
    cls = type(tta.adapt(conv_net(), "shot_im"))
    assert (cls.updates, cls.uses_classifier, cls.layers) == ("all but the classifier", True, "any")
    o = tta.method_options("shot_im")()
    assert (o.optimizer, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 1e-3, 0.9, True, 0.0)
