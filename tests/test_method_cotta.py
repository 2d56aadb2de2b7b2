"""cotta: the loss, the pseudo-label choice, the teacher, the stochastic restore, reset, determinism, the
augmentations against torchvision, and golden outputs of the reference (tests/golden/cotta.json)."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import tta
from tests.tta_nets import assert_same_state, conv_net, full_state, gn_resnet, mlp_bn1d, tiny_vit
from tta.augment import COLOUR_OPS, AugmentParameters, CottaAugment

ROOT = Path(__file__).resolve().parents[1]


def _golden_script():
    spec = importlib.util.spec_from_file_location("golden_cotta", ROOT / "benchmarks" / "golden" / "cotta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(seed=0, n=6, size=8, dtype=torch.float64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _source_with_batch_stats(model):
    """The source model normalising with the test batch's statistics (train-mode BatchNorm on a copy)."""
    clone = copy.deepcopy(model).train()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def _sgd(**options):
    """Plain gradient steps (SGD without momentum) so that an update can be computed by hand."""
    return {"optimizer": "sgd", "momentum": 0.0, "lr": 0.5, **options}


def _hand_loss(student_logits, teacher_logits, symmetric=False):
    p_t, p_s = torch.softmax(teacher_logits, 1), torch.softmax(student_logits, 1)
    forward = -(p_t * torch.log(p_s)).sum(1)
    if not symmetric:
        return forward.mean()
    return (0.5 * forward - 0.5 * (p_s * torch.log(p_t)).sum(1)).mean()


@pytest.mark.parametrize("symmetric", [False, True])
def test_one_step_is_a_gradient_step_on_the_hand_computed_cross_entropy(symmetric):
    model = conv_net().double()
    x = _batch()
    reference = _source_with_batch_stats(model)
    teacher = reference(x).detach()
    loss = _hand_loss(reference(x), teacher, symmetric)
    loss.backward()
    expected = {n: (p - 0.5 * p.grad).detach() for n, p in reference.named_parameters()}

    adapted = tta.adapt(model, "cotta", **_sgd(confidence_threshold=0.0, restore_probability=0.0,
                                               symmetric_loss=symmetric))
    out = adapted(x)
    torch.testing.assert_close(out, teacher, rtol=0, atol=1e-12)  # the prediction: the teacher's, before the step
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-12, msg=name)


def test_teacher_is_the_moving_average_and_restore_takes_masked_elements_from_the_source():
    model = conv_net().double()
    source = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = _batch()
    reference = _source_with_batch_stats(model)
    _hand_loss(reference(x), reference(x).detach()).backward()
    stepped = {n: (p - 0.5 * p.grad).detach() for n, p in reference.named_parameters()}

    adapted = tta.adapt(model, "cotta", **_sgd(confidence_threshold=0.0, restore_probability=0.5,
                                               teacher_momentum=0.9))
    g = torch.Generator().manual_seed(3)
    masks = []
    adapted.restore_mask = lambda p: masks.append(torch.rand(p.shape, generator=g) < 0.5) or masks[-1]
    adapted(x)
    names = [n for n, _ in model.named_parameters()]
    assert len(masks) == len(names)
    for name, mask, teacher in zip(names, masks, adapted.teacher.parameters()):
        # eq. 3: the teacher averages the stepped student (before the restore)
        torch.testing.assert_close(teacher, 0.9 * source[name] + 0.1 * stepped[name], rtol=0, atol=1e-12)
        # eq. 8: masked elements are the source's, the others the stepped values
        p = dict(model.named_parameters())[name].detach()
        assert torch.equal(p[mask], source[name][mask])
        torch.testing.assert_close(p[~mask], stepped[name][~mask], rtol=0, atol=1e-12)
    assert any(m.any() for m in masks) and any((~m).any() for m in masks)


def test_the_default_restore_masks_are_bernoulli_with_the_restore_probability():
    adapted = tta.adapt(conv_net(), "cotta", restore_probability=0.3, seed=0)
    mask = adapted.restore_mask(torch.empty(200_000))
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.3) < 0.005


def test_pseudo_label_is_augmentation_averaged_exactly_when_the_anchor_is_below_the_threshold():
    model = conv_net().double()
    x = _batch()
    reference = _source_with_batch_stats(model)
    with torch.no_grad():
        confidence = torch.softmax(reference(x), 1).max(1).values.mean().item()
        plain = reference(x)
        augmented = [reference(x.flip(-1) * k) for k in (0.9, 0.8, 0.7)]
    averaged = (augmented[0] + augmented[1] + augmented[2]) / 3

    def run(threshold):
        adapted = tta.adapt(copy.deepcopy(model), "cotta", n_augmentations=3, confidence_threshold=threshold)
        factors = iter((0.9, 0.8, 0.7))
        adapted.augment = lambda batch: batch.flip(-1) * next(factors)
        return adapted(x)

    torch.testing.assert_close(run(confidence), plain, rtol=0, atol=1e-12)  # not below: the teacher on x (eq. 1)
    above = torch.nextafter(torch.tensor(confidence, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(run(above.item()), averaged, rtol=0, atol=1e-12)  # below: eq. 4


def test_one_update_moves_every_parameter_and_the_teacher_but_not_the_anchor_or_the_buffers():
    model = conv_net()
    before = full_state(model)
    adapted = tta.adapt(model, "cotta", n_augmentations=2, restore_probability=0.0)
    adapted(_batch(dtype=torch.float32))
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} should have been adapted"
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), f"{name} changed"
    names = [n for n, _ in model.named_parameters()]
    assert all(not torch.equal(t, before[n]) for n, t in zip(names, adapted.teacher.parameters()))
    assert all(torch.equal(a, before[n]) for n, a in zip(names, adapted.anchor.parameters()))


def test_reset_restores_student_teacher_optimizer_and_generators_bitwise():
    model = conv_net()
    source = full_state(model)
    batches = [_batch(seed=s, dtype=torch.float32) for s in range(3)]
    adapted = tta.adapt(model, "cotta", n_augmentations=2, seed=5)
    first = adapted(batches[0])
    for x in batches[1:]:
        adapted(x)
    assert adapted.optimizer.state
    adapted.reset()
    assert_same_state(full_state(model), source)
    assert_same_state(full_state(adapted.teacher), source)
    assert_same_state(full_state(adapted.anchor), source)
    assert adapted.optimizer.state_dict()["state"] == {} and adapted.batches_seen == 0
    assert torch.equal(adapted(batches[0]), first)
    fresh = tta.adapt(conv_net(), "cotta", n_augmentations=2, seed=5)
    assert torch.equal(fresh(batches[0]), first)


def test_runs_with_one_seed_are_identical_and_the_seed_matters():
    batches = [_batch(seed=s, dtype=torch.float32) for s in range(2)]

    def run(**options):
        adapted = tta.adapt(conv_net(), "cotta", n_augmentations=2, confidence_threshold=1.0, **options)
        return [adapted(x) for x in batches]

    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(11)
    d = run()
    torch.manual_seed(11)
    e = run()
    assert all(torch.equal(u, v) for u, v in zip(d, e))  # seed -1: torch.initial_seed()


@pytest.mark.parametrize("make", [tiny_vit, gn_resnet])
def test_layernorm_and_groupnorm_models_train_all_their_parameters(make):
    model = make()
    with torch.no_grad():  # timm zero-initialises each block's last norm weight, which stops the block's gradients
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("2.weight"):
                p.fill_(1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = tta.adapt(model, "cotta", n_augmentations=2, restore_probability=0.0)
    adapted(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved == list(before)


def test_non_image_inputs_are_refused_before_anything_changes():
    adapted = tta.adapt(mlp_bn1d(), "cotta")
    state = full_state(adapted.model)
    with pytest.raises(ValueError, match="cotta: .*images"):
        adapted(torch.rand(4, 5))
    adapted = tta.adapt(conv_net(), "cotta", episodic=True)
    adapted(_batch(dtype=torch.float32))
    state = full_state(adapted.model)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        adapted(torch.rand(4, 4, 8, 8))  # conv_net takes 3 channels, but the channel check comes first
    assert_same_state(full_state(adapted.model), state)
    with pytest.raises(ValueError, match="NaN"):
        adapted(torch.full((4, 3, 8, 8), float("nan")))
    assert_same_state(full_state(adapted.model), state)
    with pytest.raises(ValueError, match="batch of 1"):
        adapted(torch.rand(1, 3, 8, 8))


def test_release_gives_back_the_model_exactly():
    model = conv_net()
    state, types = full_state(model), [type(m) for m in model.modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapted = tta.adapt(model, "cotta", n_augmentations=2)
    adapted(_batch(dtype=torch.float32))
    assert adapted.release() is model
    assert_same_state(full_state(model), state)
    assert [type(m) for m in model.modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training


def _torchvision_transform(x, p, noise, std=0.005):
    """MD's transform (transforms_cotta.get_tta_transforms) spelled with torchvision's functions, given parameters."""
    tf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    out = x.clamp(0, 1)
    for index in p.order:
        op = COLOUR_OPS[index]
        out = tf.adjust_gamma(out.clamp(1e-8, 1.0), p.gamma) if op == "gamma" else \
            getattr(tf, f"adjust_{op}")(out, getattr(p, op))
    out = tf.pad(out, [x.shape[-2] // 2], padding_mode="edge")
    out = tf.affine(out, angle=p.angle, translate=list(p.translate), scale=p.scale, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR, fill=[0.0] * x.shape[1])
    out = tf.gaussian_blur(out, [5, 5], [p.sigma, p.sigma])
    out = tf.center_crop(out, [x.shape[-2], x.shape[-1]])
    out = tf.hflip(out) if p.flip else out
    return (out + noise * std).clamp(0, 1)


@pytest.mark.parametrize("channels", [3, 1])
def test_augmentation_matches_the_reference_transform_given_the_same_parameters(channels):
    augment = CottaAugment()
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        x = torch.rand(4, channels, 16, 16, generator=g) * 1.2 - 0.1
        p = augment.sample(g, 16, 16)
        if trial % 3 == 0:  # the extremes, where the warp reaches past the padding (the fill)
            p = AugmentParameters(p.order, p.brightness, p.contrast, p.saturation, p.hue, p.gamma, 15.0, (2, -2),
                                  0.9, p.sigma, p.flip)
        noise = torch.randn(x.shape, generator=g)
        torch.testing.assert_close(augment.apply(x, p, noise), _torchvision_transform(x, p, noise),
                                   rtol=0, atol=1e-5)


def test_augmentation_parameters_stay_in_the_reference_ranges_and_follow_the_generator():
    augment = CottaAugment()
    g = torch.Generator().manual_seed(1)
    draws = [augment.sample(g, 32, 32) for _ in range(300)]
    for name, (low, high) in augment.ranges.items():
        values = [getattr(d, name) for d in draws]
        assert low <= min(values) and max(values) <= high and max(values) - min(values) > 0.8 * (high - low)
    assert {d.translate[0] for d in draws} == set(range(-4, 5))  # 1/16 of the 64-pixel padded image
    assert 100 < sum(d.flip for d in draws) < 200 and len({d.order for d in draws}) > 50
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(augment(x, torch.Generator().manual_seed(4)), augment(x, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("scenario", ["augmented", "teacher", "symmetric"])
def test_matches_the_reference_implementation(scenario):
    """Golden outputs of MD's cotta (benchmarks/golden/cotta.py), float64, augmentations and masks injected."""
    script = _golden_script()
    golden = json.loads((ROOT / "tests" / "golden" / "cotta.json").read_text())["scenarios"][scenario]
    o = golden["options"]
    model = script.make_model()
    adapted = tta.adapt(model, "cotta", n_augmentations=o["n_augmentations"], confidence_threshold=o["ap"],
                        restore_probability=o["rst"], symmetric_loss=o["symmetric"])
    adapted.augment = script.FixedAugment()
    adapted.restore_mask = masks = script.FixedMasks(o["rst"])
    for step, (x, expected) in enumerate(zip(script.make_batches(), golden["outputs"])):
        masks.start(step)
        torch.testing.assert_close(adapted(x), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    state = model.state_dict()
    for name, value in golden["student"].items():
        torch.testing.assert_close(state[name], torch.tensor(value, dtype=torch.float64), rtol=0, atol=1e-12)
    for p, value in zip(adapted.teacher.parameters(), golden["teacher"], strict=True):
        torch.testing.assert_close(p, torch.tensor(value, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_saved_state_dict_resumes_exactly():
    """Teacher, anchor, optimizer and generators travel in the adapter's state_dict."""
    import io

    batches = [_batch(seed=s, dtype=torch.float32) for s in range(4)]
    first = tta.adapt(conv_net(), "cotta", n_augmentations=2, confidence_threshold=1.0, seed=3)
    for x in batches[:2]:
        first(x)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    second = tta.adapt(conv_net(), "cotta", n_augmentations=2, confidence_threshold=1.0, seed=3)
    second.load_state_dict(torch.load(saved, weights_only=False))
    assert all(torch.equal(first(x), second(x)) for x in batches[2:])
