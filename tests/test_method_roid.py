"""roid: the loss, weights, EMA, ensembling and prior correction against hand computations; the golden outputs of
the reference (tests/golden/roid.json, benchmarks/golden/roid.py); reset, determinism, layers; the augmentation."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import tta
from tests.tta_nets import assert_same_state, conv3d_net, conv_net, full_state, gn_resnet, mlp_bn1d, tiny_vit
from tta import augment

GOLDEN = Path(__file__).with_name("golden") / "roid.json"


def fixed_augment(x):
    """The deterministic stand-in for the random augmentation (the same as benchmarks/golden/roid.py)."""
    return (0.8 * x.flip(-1) + 0.1).roll(1, dims=-2)


def _batch(seed=0, n=8, size=8, dtype=torch.float64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _model():
    return conv_net(num_classes=4).double()


def _hand_min_max(v):
    return (v - v.min()) / (v.max() - v.min())


def _hand_loss(logits, logits_aug_fn, ema, temperature=1 / 3):
    """The paper's weighted SLR + consistency loss, written out (no helper of the method)."""
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    cos = (p * ema).sum(1) / (p.norm(dim=1) * ema.norm())
    div = _hand_min_max(1 - cos)
    keep = div >= div.mean()
    cert = _hand_min_max((p * torch.log(p)).sum(1))
    w = torch.exp(div * cert / temperature)
    pc = p.clamp(max=0.99)
    slr = -(pc * torch.log(pc / (1 - pc) + 1e-5)).sum(1)
    za = logits_aug_fn(keep)
    q = torch.exp(za) / torch.exp(za).sum(1, keepdim=True)
    sce = -0.5 * (p[keep] * torch.log(q)).sum(1) - 0.5 * (q * torch.log(p[keep])).sum(1)
    b = logits.shape[0]
    return (slr[keep] * w[keep]).sum() / b + (sce * w[keep]).sum() / b, keep, w


def test_loss_weights_and_ema_equal_the_hand_computation():
    x = _batch()
    model = _model()
    adapted = tta.adapt(model, "roid")
    adapted.augment = fixed_augment
    with torch.no_grad():
        logits = model(x)
        expected, keep, w = _hand_loss(logits, lambda k: model(fixed_augment(x[k])), torch.full((4,), 0.25,
                                                                                               dtype=torch.float64))
        got = adapted.loss(x, logits)
    assert 0 < keep.sum() < len(keep)  # the filter drops some samples and keeps others
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    p = logits.softmax(1)
    torch.testing.assert_close(adapted.probs_ema, 0.9 * 0.25 + 0.1 * p.mean(0), rtol=0, atol=1e-15)

    from tta.methods.roid import roid_weights
    weights, kept = roid_weights(logits, torch.full((4,), 0.25, dtype=torch.float64), 1 / 3)
    assert torch.equal(kept, keep)
    torch.testing.assert_close(weights, w * keep, rtol=1e-12, atol=0)


def test_without_weighting_every_sample_counts_with_weight_one():
    x = _batch(1)
    model = _model()
    adapted = tta.adapt(model, "roid", weighting=False, consistency=False)
    with torch.no_grad():
        logits = model(x)
        p = logits.softmax(1).clamp(max=0.99)
        expected = -(p * torch.log(p / (1 - p) + 1e-5)).sum() / x.shape[0]
        torch.testing.assert_close(adapted.loss(x, logits), expected, rtol=1e-12, atol=0)
    assert torch.equal(adapted.probs_ema, torch.full((4,), 0.25, dtype=torch.float64))  # no EMA without weighting


def test_prior_correction_multiplies_the_logits_by_the_smoothed_prior():
    x = _batch(2)
    raw = tta.adapt(_model(), "roid", prior_correction=False)(x)
    corrected = tta.adapt(_model(), "roid")(x)
    prior = raw.softmax(1).mean(0)
    smooth = max(1 / 8, 1 / 4) / prior.max()
    torch.testing.assert_close(corrected, raw * (prior + smooth) / (1 + 4 * smooth), rtol=1e-12, atol=0)


def test_one_update_moves_exactly_the_norm_affine_parameters_and_ensembles_with_the_source():
    x = _batch(3)
    source = _model()
    before = full_state(source)
    plain, ensembled = copy.deepcopy(source), copy.deepcopy(source)
    tta.adapt(plain, "roid", source_momentum=1.0, lr=0.05)(x)
    tta.adapt(ensembled, "roid", source_momentum=0.99, lr=0.05)(x)
    after = full_state(ensembled)
    affine = {"1.weight", "1.bias", "4.weight", "4.bias"}
    for name in before:
        if name in affine:
            assert not torch.equal(after[name], before[name]), name
            # theta <- 0.99 theta_step + 0.01 theta_source (the same step without ensembling)
            torch.testing.assert_close(after[name], 0.99 * full_state(plain)[name] + 0.01 * before[name],
                                       rtol=0, atol=1e-15)
        else:
            assert torch.equal(after[name], before[name]), name  # conv/linear weights, BN running statistics


def test_golden_outputs_of_the_reference():
    golden = json.loads(GOLDEN.read_text())
    model = _model()
    adapted = tta.adapt(model, "roid")
    adapted.augment = fixed_augment
    g = torch.Generator().manual_seed(0)
    for step in golden["steps"]:
        x = torch.rand(8, 3, 8, 8, generator=g, dtype=torch.float64)
        out = adapted(x)
        torch.testing.assert_close(out, torch.tensor(step["logits"], dtype=torch.float64), rtol=0, atol=1e-12)
        named = dict(model.named_parameters())
        for name, value in step["params"].items():
            torch.testing.assert_close(named[name].detach(), torch.tensor(value, dtype=torch.float64), rtol=0,
                                       atol=1e-12)
        torch.testing.assert_close(adapted.probs_ema, torch.tensor(step["probs_ema"], dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_reset_is_bitwise_and_a_reset_adapter_equals_a_fresh_one():
    model = conv_net()
    source = full_state(model)
    adapted = tta.adapt(model, "roid", lr=0.05)
    first = adapted(_batch(0, dtype=torch.float32))
    for seed in range(1, 4):
        adapted(_batch(seed, dtype=torch.float32))
    assert adapted.optimizer.state and not torch.equal(adapted.probs_ema, torch.full((4,), 0.25))
    adapted.reset()
    assert_same_state(full_state(model), source)
    assert adapted.optimizer.state_dict()["state"] == {}
    assert torch.equal(adapted.probs_ema, torch.full((4,), 0.25))
    assert torch.equal(adapted(_batch(0, dtype=torch.float32)), first)  # generator restored too
    assert adapted.release() is model
    assert_same_state(full_state(model), source)


def test_two_runs_with_one_seed_are_identical_and_the_seed_matters():
    def run(seed):
        adapted = tta.adapt(conv_net(), "roid", lr=0.05, seed=seed)
        return torch.stack([adapted(_batch(s, dtype=torch.float32)) for s in range(3)])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_state_dict_round_trip_continues_identically():
    a = tta.adapt(conv_net(), "roid", lr=0.05)
    a(_batch(0, dtype=torch.float32))
    state = copy.deepcopy(a.state_dict())
    b = tta.adapt(conv_net(), "roid", lr=0.05)
    b.load_state_dict(state)
    x = _batch(1, dtype=torch.float32)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet])
def test_layernorm_and_groupnorm_models_adapt_their_affine_parameters(make):
    model = make()
    before = full_state(model)
    adapted = tta.adapt(model, "roid", lr=0.05)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapted(x)
    after = full_state(model)
    norm_params = {f"{name}.{p}" for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) for p in ("weight", "bias")}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= norm_params


def test_consistency_needs_images_and_vectors_work_without_it():
    with pytest.raises(ValueError, match="consistency=False"):
        tta.adapt(conv3d_net(), "roid")
    with pytest.raises(ValueError, match="consistency=False"):
        tta.adapt(mlp_bn1d(), "roid")(torch.rand(6, 5))
    model = mlp_bn1d()
    before = full_state(model)
    tta.adapt(model, "roid", consistency=False, lr=0.05)(torch.rand(6, 5, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(full_state(model)["1.weight"], before["1.weight"])


def test_a_batch_of_one_is_refused_with_batchnorm_and_kept_with_weight_one_without():
    with pytest.raises(ValueError, match="batch of 1"):
        tta.adapt(conv_net(), "roid")(torch.rand(1, 3, 8, 8))
    from tta.methods.roid import roid_weights

    # min-max over one value: zeros (MD: 0/0 = NaN), so the sample is kept with weight exp(0) = 1
    weights, keep = roid_weights(torch.tensor([[1.0, 2.0, 0.5]]), torch.full((3,), 1 / 3), 1 / 3)
    assert keep.tolist() == [True] and weights.tolist() == [1.0]


def test_declarations():
    cls = type(tta.adapt(conv_net(), "roid"))
    assert (cls.updates, cls.batch_statistics, cls.multi_pass, cls.inputs) == ("norm affine", "always", True, "images")


# -- the augmentation (tta/augment.py) against torchvision's tensor functions ------------------------------------
def test_colour_and_geometry_operations_match_torchvision():
    tf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for ours, theirs, factor in [(augment.adjust_brightness, tf.adjust_brightness, 1.3),
                                 (augment.adjust_contrast, tf.adjust_contrast, 0.8),
                                 (augment.adjust_saturation, tf.adjust_saturation, 1.4),
                                 (augment.adjust_gamma, lambda im, f: tf.adjust_gamma(im.clamp(1e-8, 1), f), 0.8)]:
        torch.testing.assert_close(ours(x, factor), theirs(x, factor), rtol=0, atol=1e-12)
    torch.testing.assert_close(augment.adjust_hue(x, -0.05), tf.adjust_hue(x, -0.05), rtol=0, atol=1e-5)
    torch.testing.assert_close(augment.hsv_to_rgb(augment.rgb_to_hsv(x)), x, rtol=0, atol=1e-12)
    padded = torch.nn.functional.pad(x, (6, 6, 6, 6), mode="reflect")
    torch.testing.assert_close(augment.rotate_scale_translate(padded, 12.3, (2.0, -3.0), 1.07),
                               tf.affine(padded, 12.3, [2, -3], 1.07, [0.0, 0.0],
                                         interpolation=InterpolationMode.BILINEAR), rtol=0, atol=1e-12)


def test_consistency_augment_is_seeded_in_range_and_one_draw_per_batch():
    x = _batch(0, n=4, size=16)
    a = augment.consistency_augment(x, torch.Generator().manual_seed(5))
    b = augment.consistency_augment(x, torch.Generator().manual_seed(5))
    c = augment.consistency_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    # one draw for the batch: augmenting images one by one with the same stream start gives the same views
    single = augment.consistency_augment(x[2:3], torch.Generator().manual_seed(5))
    torch.testing.assert_close(single, a[2:3], rtol=0, atol=1e-12)
    assert not math.isclose(float((a - x).abs().mean()), 0.0)


def test_consistency_augment_is_the_reference_transform_without_blur_and_noise():
    """MD's get_tta_transforms(..., padding_mode="reflect", cotta_augs=False) with torchvision, given parameters."""
    tf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    transform = augment.ROID_TRANSFORM
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.rand(3, 3, 16, 16, generator=g) * 1.2 - 0.1
        p = transform.sample(g, 16, 16)
        assert p.sigma is None and "sigma" not in transform.ranges
        expected = x.clamp(0, 1)
        for index in p.order:
            op = augment.COLOUR_OPS[index]
            expected = tf.adjust_gamma(expected.clamp(1e-8, 1.0), p.gamma) if op == "gamma" else \
                getattr(tf, f"adjust_{op}")(expected, getattr(p, op))
        expected = tf.pad(expected, [8], padding_mode="reflect")
        expected = tf.affine(expected, angle=p.angle, translate=list(p.translate), scale=p.scale, shear=[0.0, 0.0],
                             interpolation=InterpolationMode.BILINEAR, fill=[0.0] * 3)
        expected = tf.center_crop(expected, [16, 16])
        expected = (tf.hflip(expected) if p.flip else expected).clamp(0, 1)
        torch.testing.assert_close(transform.apply(x, p, None), expected, rtol=0, atol=1e-5)
    # the view draws exactly these parameters (no blur sigma, no noise) from the generator
    x = _batch(0, n=2, size=16, dtype=torch.float32)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    view = augment.consistency_augment(x, g1)
    assert torch.equal(view, transform.apply(x, transform.sample(g2, 16, 16), None))
    assert torch.equal(g1.get_state(), g2.get_state())
