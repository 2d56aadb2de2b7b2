"""Methods on models without BatchNorm: every method that does not need batch statistics adapts a LayerNorm ViT
and a GroupNorm ResNet (updating what it declares); one that needs BatchNorm refuses, naming the layers found."""
from __future__ import annotations

import pytest
import torch

import tta
from tta.base import NORM_LAYERS
from tests.method_cases import adapt_case, declared_parameters, trains
from tests.tta_nets import assert_same_state, full_state, gn_resnet, tiny_vit

pytest.importorskip("timm", reason="timm (a test dependency: pip install -e '.[test]') builds the ViT")

MODELS = {"vit": tiny_vit, "gn_resnet": gn_resnet}
NEEDS_BATCHNORM = [m for m in tta.methods() if tta.registry.method_class(m).layers == "BatchNorm"]
NORM_AFFINE = [m for m in tta.methods() if tta.registry.method_class(m).layers == NORM_LAYERS]


def batches(n: int = 3, size: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(size, 3, 32, 32, generator=g) for _ in range(n)]


def test_the_declarations_cover_both_kinds():
    assert "tent" in NORM_AFFINE and "norm" in NEEDS_BATCHNORM


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", NEEDS_BATCHNORM)
def test_a_batchnorm_method_refuses_and_names_the_layers_it_found(method, model_name):
    model = MODELS[model_name]()
    before = full_state(model)
    kind = "LayerNorm" if model_name == "vit" else "GroupNorm"
    with pytest.raises(ValueError, match=rf"'{method}' adapts BatchNorm layers, but this model has none \(found "
                                         rf"{kind} x \d+"):
        tta.adapt(model, method)
    assert_same_state(before, full_state(model))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", NORM_AFFINE)
def test_a_norm_affine_method_adapts_the_norm_layers_and_resets_exactly(method, model_name):
    model = MODELS[model_name]()
    before = full_state(model)
    declared = declared_parameters(method, model)
    adapted = adapt_case(method, model, input_shape=(3, 32, 32))
    for x in batches():
        assert adapted(x).shape == (x.shape[0], 4)
    after = full_state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if trains(method):
        assert changed, f"{method} changed nothing"
        assert changed <= declared, f"{method} changed {sorted(changed - declared)}, not declared"
    adapted.reset()
    assert_same_state(before, full_state(model))
    assert adapted.release() is model
    assert_same_state(before, full_state(model))
    assert all(p.requires_grad for p in model.parameters())


def test_tent_on_a_vit_is_one_entropy_step_on_the_layernorm_affine_parameters():
    """Hand-written: tent's step on a ViT equals an Adam step of the mean entropy w.r.t. the LayerNorm weights."""
    x = batches(1)[0].double()
    reference = tiny_vit().double()
    params = [p for m in reference.modules() if isinstance(m, torch.nn.LayerNorm) for p in (m.weight, m.bias)]
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    logits = reference(x)
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    entropy.backward()
    optimizer.step()

    model = tiny_vit().double()
    adapted = tta.adapt(model, "tent")
    assert torch.allclose(adapted(x), logits.detach(), atol=1e-12, rtol=0)
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-12, rtol=0), key
