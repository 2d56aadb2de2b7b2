"""memo: the marginal entropy, the prior BatchNorm and the SGD step against a hand-written forward; per-image
episodes; the golden outputs of the reference (tests/golden/memo.json, benchmarks/golden/memo.py); reset,
determinism, layers; the AugMix operations against PIL."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tests.tta_nets import assert_same_state, conv3d_net, conv_net, full_state, gn_resnet, mlp_bn1d, tiny_vit
from tta import augment

GOLDEN = Path(__file__).with_name("golden") / "memo.json"


def fixed_views(image, n=4):
    """Deterministic stand-ins for the AugMix views (the same as benchmarks/golden/memo.py)."""
    views = [(image * (0.7 + 0.1 * k) + 0.05 * k).roll(k, dims=-1) for k in range(n)]
    return torch.stack([v.flip(-2) if k % 2 else v for k, v in enumerate(views)])


def _images(n=3, seed=0, dtype=torch.float64, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _hand_forward(model, x, params, alpha=0.9):
    """conv_net's forward written out, BatchNorm with alpha * source + (1 - alpha) * (mean, unbiased variance of
    the batch), the batch statistics treated as constants."""
    for index, layer in enumerate(model):
        if isinstance(layer, nn.Conv2d):
            x = F.conv2d(x, params[f"{index}.weight"], params[f"{index}.bias"], padding=1)
        elif isinstance(layer, nn.BatchNorm2d):
            d = x.detach()
            n = d.shape[0] * d.shape[2] * d.shape[3]
            mean = d.sum(dim=(0, 2, 3)) / n
            var = ((d - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / (n - 1)
            mean = alpha * layer.running_mean + (1 - alpha) * mean
            var = alpha * layer.running_var + (1 - alpha) * var
            x = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + layer.eps)
            x = x * params[f"{index}.weight"][None, :, None, None] + params[f"{index}.bias"][None, :, None, None]
        elif isinstance(layer, nn.Linear):
            x = x @ params[f"{index}.weight"].T + params[f"{index}.bias"]
        else:
            x = layer(x)
    return x


def test_marginal_entropy_equals_the_hand_computation():
    from tta.methods.memo import marginal_entropy

    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    mean = [sum(p[c] for p in probs) / 5 for c in range(4)]
    assert math.isclose(float(marginal_entropy(logits)), -sum(m * math.log(m) for m in mean), abs_tol=1e-14)


def test_one_image_is_one_sgd_nesterov_step_of_the_hand_loss_and_its_prediction():
    image = _images(1)[0]
    model = conv_net(num_classes=4).double()
    source = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    probs = _hand_forward(model, fixed_views(image), source).softmax(1).mean(0)
    loss = -(probs * torch.log(probs)).sum()
    grads = dict(zip(source, torch.autograd.grad(loss, list(source.values()))))
    expected = {k: v.detach() - 0.005 * 1.9 * grads[k] for k, v in source.items()}  # SGD, momentum 0.9, Nesterov

    adapted = tta.adapt(model, "memo", n_augmentations=4)
    adapted.augment = fixed_views
    out = adapted(image[None])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-14)
    torch.testing.assert_close(out, _hand_forward(model, image[None], expected), rtol=0, atol=1e-12)


def test_golden_outputs_of_the_reference():
    golden = json.loads(GOLDEN.read_text())
    model = conv_net(num_classes=4).double()
    adapted = tta.adapt(model, "memo", n_augmentations=4)
    adapted.augment = fixed_views
    images = _images()
    for index, step in enumerate(golden["steps"]):
        out = adapted(images[index:index + 1])
        torch.testing.assert_close(out, torch.tensor(step["logits"], dtype=torch.float64), rtol=0, atol=1e-12)
        named = dict(model.named_parameters())
        for name, value in step["params"].items():
            torch.testing.assert_close(named[name].detach(), torch.tensor(value, dtype=torch.float64), rtol=0,
                                       atol=1e-12)
    # the three images as one batch: the same per-image episodes
    adapted.reset()
    torch.testing.assert_close(adapted(images), torch.tensor([s["logits"][0] for s in golden["steps"]],
                                                             dtype=torch.float64), rtol=0, atol=1e-12)


def test_each_image_starts_from_the_source_model():
    images = _images(3, seed=4)
    alone = tta.adapt(conv_net(num_classes=4).double(), "memo", n_augmentations=4)
    alone.augment = fixed_views
    last_alone = alone(images[2:])
    together = tta.adapt(conv_net(num_classes=4).double(), "memo", n_augmentations=4)
    together.augment = fixed_views
    assert torch.equal(together(images)[2:], last_alone)
    # with the random views: a batch of two equals the two images one after the other (one random stream)
    a, b = tta.adapt(conv_net(), "memo", n_augmentations=3), tta.adapt(conv_net(), "memo", n_augmentations=3)
    x = _images(2, seed=5, dtype=torch.float32, size=16)
    assert torch.equal(a(x), torch.cat([b(x[:1]), b(x[1:])]))


def test_reset_is_bitwise_and_a_reset_adapter_equals_a_fresh_one():
    model = conv_net()
    source = full_state(model)
    adapted = tta.adapt(model, "memo", n_augmentations=3)
    x = _images(2, dtype=torch.float32, size=16)
    first = adapted(x)
    adapted(_images(2, seed=1, dtype=torch.float32, size=16))
    assert not torch.equal(full_state(model)["0.weight"], source["0.weight"])  # left adapted to the last image
    adapted.reset()
    assert_same_state(full_state(model), source)
    assert adapted.optimizer.state_dict()["state"] == {}
    assert torch.equal(adapted(x), first)  # the augmentation stream restarts too
    assert adapted.release() is model
    assert_same_state(full_state(model), source)


def test_two_runs_with_one_seed_are_identical_and_the_seed_matters():
    x = _images(2, dtype=torch.float32, size=16)

    def run(seed):
        return tta.adapt(conv_net(), "memo", n_augmentations=3, seed=seed)(x)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet])
def test_layernorm_and_groupnorm_models_adapt_all_parameters(make):
    model = make()
    before = full_state(model)
    adapted = tta.adapt(model, "memo", n_augmentations=2, lr=0.05)
    adapted(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    after = full_state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    norms = [n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    assert f"{head}.weight" in changed and f"{norms[0]}.weight" in changed
    assert len(changed) > len(before) // 2


def test_images_only():
    with pytest.raises(ValueError, match="images"):
        tta.adapt(conv3d_net(), "memo")
    with pytest.raises(ValueError, match="images"):
        tta.adapt(mlp_bn1d(), "memo")(torch.rand(4, 5))


def test_prior_batch_norm_uses_the_source_alone_for_a_single_value_per_channel():
    from tta.methods.memo import PriorBatchNorm

    bn = nn.BatchNorm1d(3).double().eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    layer = PriorBatchNorm(bn, 0.9)
    x = torch.randn(1, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), bn(x), rtol=0, atol=0)
    x = torch.randn(5, 3, dtype=torch.float64)
    mean = 0.9 * bn.running_mean + 0.1 * x.mean(0)
    var = 0.9 * bn.running_var + 0.1 * x.var(0, unbiased=True)
    torch.testing.assert_close(layer(x), (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias, rtol=1e-12,
                               atol=1e-12)


def test_declarations():
    cls = type(tta.adapt(conv_net(), "memo"))
    assert (cls.updates, cls.multi_pass, cls.inputs, cls.episodic_by_design) == ("all", True, "images", True)
    o = tta.method_options("memo")()
    assert (o.optimizer, o.lr, o.momentum, o.nesterov, o.n_augmentations, o.alpha) == ("sgd", 0.005, 0.9, True, 32,
                                                                                         0.9)


# -- the AugMix operations (tta/augment.py) ----------------------------------------------------------------------
def _pil_pair(seed=0):
    from PIL import Image

    levels = torch.randint(10, 240, (3, 16, 16), generator=torch.Generator().manual_seed(seed))
    image = levels.to(torch.float64) / 255
    pil = Image.fromarray(levels.permute(1, 2, 0).numpy().astype(np.uint8))
    return image, pil, Image


def _from_pil(pil):
    return torch.from_numpy(np.asarray(pil).astype(np.float64) / 255).permute(2, 0, 1)


def test_lookup_table_operations_equal_pil():
    from PIL import ImageOps

    for seed in range(3):
        image, pil, _ = _pil_pair(seed)
        assert torch.equal(augment.autocontrast(image), _from_pil(ImageOps.autocontrast(pil)))
        assert torch.equal(augment.equalize(image), _from_pil(ImageOps.equalize(pil)))
        assert torch.equal(augment.posterize(image, 4), _from_pil(ImageOps.posterize(pil, 4)))
        assert torch.equal(augment.solarize(image, 240), _from_pil(ImageOps.solarize(pil, 240)))


def test_geometric_operations_follow_pil():
    image, pil, Image = _pil_pair()
    shifted = augment._pil_affine(image, (1, 0, 1.0, 0, 1, 0))
    assert torch.equal(shifted, _from_pil(pil.transform((16, 16), Image.AFFINE, (1, 0, 1, 0, 1, 0),
                                                        resample=Image.BILINEAR)))
    sheared = augment._pil_affine(image, (1, 0.02, 0.0, 0, 1, 0))
    theirs = _from_pil(pil.transform((16, 16), Image.AFFINE, (1, 0.02, 0, 0, 1, 0), resample=Image.BILINEAR))
    assert (sheared - theirs)[..., 2:-2, 2:-2].abs().max() <= 1 / 255 + 1e-12  # PIL rounds to uint8
    t = math.radians(2)
    rotated = augment.affine_sample(image[None], (math.cos(t), -math.sin(t), 0, math.sin(t), math.cos(t), 0))[0]
    theirs = _from_pil(pil.rotate(2, resample=Image.BILINEAR))
    assert (rotated - theirs)[..., 3:-3, 3:-3].abs().max() <= 1 / 255 + 1e-12


def test_augmix_views_are_seeded_distinct_and_in_range():
    image = _images(1, dtype=torch.float32, size=16)[0]
    a = augment.augmix_views(image, 6, torch.Generator().manual_seed(0))
    assert torch.equal(a, augment.augmix_views(image, 6, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment.augmix_views(image, 6, torch.Generator().manual_seed(1)))
    assert a.shape == (6, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert all(not torch.equal(a[i], a[j]) for i in range(6) for j in range(i))
