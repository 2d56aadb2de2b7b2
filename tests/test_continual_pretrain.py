"""Class-incremental for real (issue #22): a backbone pre-trained on held-out classes only, NMC beside its bounds.

The backbone never sees an incremental class (asserted on the labels that reach its loss), the stream holds only
the other classes, the options that choose another extractor are refused, the linear probe is the convex optimum
scikit-learn finds and beats NMC where the class means must fail, and the records name the backbone's classes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from continual.benchmarks import build_benchmark, incremental_task_sizes
from continual.models import build_model
from continual.nmc import NMCClassifier
from continual.pretrain import fingerprint, pretrain, replace_head
from continual.probe import LinearProbe, fit_softmax_regression
from continual.records import backbone_records, experience_records, read_records
from eval.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TINY = ["--n-train", "100", "--n-test", "50", "--image-size", "8", "--width", "4", "--pretrain-epochs", "2",
        "--no-progress", "--eval-batch-size", "64", "--threads", "1"]


def test_task_sizes_keep_the_usual_size_and_put_the_remainder_last():
    assert incremental_task_sizes(10, 5, 5) == [2, 2, 1]
    assert incremental_task_sizes(10, 5, 2) == [2, 2, 2, 2]
    assert incremental_task_sizes(100, 10, 50) == [10] * 5
    assert incremental_task_sizes(10, 5, 0) == [2] * 5
    with pytest.raises(ValueError):
        incremental_task_sizes(10, 5, 10)


def test_the_backbone_is_trained_on_the_held_out_classes_only(monkeypatch):
    stream = build_benchmark("split-digits", seed=3, n_train=200, n_test=100, image_size=8, shuffle_classes=True,
                             pretrain_classes=5)
    order = np.random.default_rng(3).permutation(10).tolist()
    assert stream.class_order == order and stream.pretrain_classes == order[:5]
    assert stream.incremental_classes == order[5:]
    # the stream: only the other classes, relabelled by position, in tasks of 2, 2, 1
    for split in (stream.train_stream, stream.test_stream):
        labels = [sorted({int(y) for _, y, *_ in experience.dataset}) for experience in split]
        assert labels == [[0, 1], [2, 3], [4]]
    assert stream.n_train == sum(len(e.dataset) for e in stream.train_stream)
    # the labels that reach the loss during pre-training, seen from outside the training loop
    reached: list[torch.Tensor] = []
    cross_entropy = F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        reached.append(target.clone())
        return cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    torch.manual_seed(0)
    model = build_model("cnn", 5, 3, 8, width=4)
    report = pretrain(model, stream.pretrain_train, epochs=2, lr=0.05, batch_size=16, seed=3)
    fed = torch.cat(reached)
    assert len(fed) == 2 * len(stream.pretrain_train) == 2 * 100  # class-balanced: 5 classes x 20 images
    original = {stream.pretrain_classes[int(label)] for label in fed.unique()}
    assert original == set(order[:5]) and not original & set(stream.incremental_classes)
    assert report["images_per_label"] == {k: 40 for k in range(5)}
    # the pre-training images are the training images of those classes, and of no other
    from continual.benchmarks import _subset, load_split

    train = _subset(load_split("digits", "train", 8), 200, 3)
    held_out = torch.isin(train.labels, torch.tensor(order[:5]))
    assert sorted(map(bytes, stream.pretrain_train.images.numpy())) == sorted(
        map(bytes, train.images[held_out].numpy()))


def test_pretraining_is_deterministic_and_the_head_is_replaced():
    stream = build_benchmark("split-digits", seed=0, n_train=100, n_test=50, image_size=8, pretrain_classes=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model("cnn", 2, 3, 8, width=4))
        pretrain(models[-1], stream.pretrain_train, epochs=2, lr=0.05, batch_size=8, seed=0)
    assert fingerprint(models[0]) == fingerprint(models[1])
    body = {k: v.clone() for k, v in models[0].body.state_dict().items()}
    replace_head(models[0], 8)
    assert models[0].head.out_features == 8 and models[0](torch.zeros(1, 3, 8, 8)).shape == (1, 8)
    assert all(torch.equal(v, models[0].body.state_dict()[k]) for k, v in body.items())


@pytest.mark.parametrize("extra, named", [
    (["--backbone", "cifar10_resnet20"], "--backbone cifar10_resnet20"),
    (["--weights", "w.pt"], "--weights w.pt"),
    (["--backbone", "cifar10_resnet20", "--weights", "w.pt"], "--backbone cifar10_resnet20 and --weights w.pt"),
])
def test_pretrain_classes_with_a_loaded_backbone_is_refused(tmp_path, capsys, extra, named):
    out = tmp_path / "run"
    assert main(["continual", "--out", str(out), "--method", "nmc", "--pretrain-classes", "5", *extra]) == 2
    printed = capsys.readouterr().out
    assert f"--pretrain-classes 5 and {named} both choose the feature extractor" in printed
    assert not out.exists()


@pytest.mark.parametrize("options, message", [
    (["--method", "nmc", "--pretrain-epochs", "3"], "--pretrain-epochs 3 cannot apply"),
    (["--method", "nmc", "--probe-l2", "0.1"], "--probe-l2 0.1 cannot apply"),
    (["--method", "linear_probe", "--nmc-metric", "cosine"], "--nmc-metric cosine cannot apply"),
    (["--method", "nmc", "--model", "mlp"], "--model mlp cannot apply"),
    (["--benchmark", "random-labels", "--method", "sgd", "--pretrain-classes", "5"],
     "--pretrain-classes 5 cannot apply"),
    (["--method", "nmc", "--pretrain-classes", "10"], "--pretrain-classes must be in [1, 9]"),
    (["--method", "sgd", "--norm", "nap", "--pretrain-classes", "5"], "--norm nap cannot apply with"),
    (["--method", "nmc", "--pretrain-classes", "5", "--download"], "--pretrain-classes 5 and --download"),
    (["--method", "linear_probe", "--pretrain-classes", "5", "--epochs", "2"], "--epochs 2 cannot apply"),
])
def test_options_that_cannot_apply_to_a_pretrained_run_are_errors(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    assert main(["continual", "--out", str(out), *options, "--no-progress"]) == 2
    assert message in capsys.readouterr().out
    assert not out.exists()


def test_the_probe_is_the_convex_optimum_scikit_learn_finds():
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    y = torch.arange(60) % 3
    x[:, :3] += 1.5 * F.one_hot(y, 3)  # overlapping classes: a finite optimum even without the penalty
    l2 = 1e-2
    W, b, info = fit_softmax_regression(x, y, num_classes=4, l2=l2)
    assert info["max_abs_gradient"] < 1e-6 and torch.equal(W[3], torch.zeros(4))  # class 3 absent: row stays 0
    reference = LogisticRegression(C=1 / (len(y) * l2), tol=1e-12, max_iter=10000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(x @ W[:3].T + b[:3], dim=1).numpy()
    assert np.allclose(ours, reference.predict_proba(x.numpy()), atol=1e-5)


def _anisotropic():
    """Unit features: class 0 spread over angles -80..80 degrees, class 1 tight around 100 degrees. The line x = 0
    separates them; the nearest mean cannot: class 0's mean sits near (0.6, 0), so its points near 80 degrees are
    closer to class 1's mean."""
    angles = torch.cat([torch.linspace(-80, 80, 33), torch.linspace(96, 104, 9)]) * torch.pi / 180
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    return features, torch.tensor([0] * 33 + [1] * 9)


def test_the_probe_beats_nmc_where_the_class_means_must_fail():
    features, labels = _anisotropic()
    probe = LinearProbe(nn.Identity(), num_classes=3, dim=2, l2=1e-4)
    nmc = NMCClassifier(nn.Identity(), num_classes=3, dim=2)
    probe.store(features, labels)
    probe.fit()
    nmc.update(features, labels)
    probe_accuracy = float((probe(features).argmax(1) == labels).float().mean())
    nmc_accuracy = float((nmc(features).argmax(1) == labels).float().mean())
    assert probe_accuracy == 1.0 and nmc_accuracy < 0.95
    assert torch.isinf(probe(features)[:, 2]).all()  # never seen, never predicted
    state = probe.state_dict()  # the stored features travel with a checkpoint
    restored = LinearProbe(nn.Identity(), num_classes=3, dim=2, l2=1e-4)
    restored.load_state_dict(state)
    assert torch.equal(restored(features), probe(features)) and len(restored.bank_labels) == 42


def _run(out, method, *extra):
    return main(["continual", "--out", str(out), "--method", method, "--pretrain-classes", "5", "--shuffle-classes",
                 "--seeds", "1", *TINY, *extra])


def test_the_three_methods_share_one_backbone_and_the_records_name_its_classes(tmp_path, capsys):
    order = np.random.default_rng(1).permutation(10).tolist()
    fingerprints = set()
    for method in ("nmc", "linear_probe", "sgd"):
        out = tmp_path / method
        assert _run(out, method) == 0
        config = json.loads((out / "config.json").read_text())["config"]
        assert config["pretrain_classes"] == 5 and config["pretrain_epochs"] == 2 and config["backbone"] is None
        records = read_records(out / "results.jsonl")
        assert records[0]["kind"] == "backbone"
        (backbone,) = backbone_records(records)
        assert backbone["trained_on_classes"] == order[:5] and backbone["incremental_classes"] == order[5:]
        assert backbone["n_images"] == 50 and backbone["epochs"] == 2
        assert sum(backbone["images_fed_per_class"].values()) == 2 * 50
        fingerprints.add(backbone["fingerprint"])
        rows = experience_records(records)
        assert [len(r["accuracies"]) for r in rows] == [3, 3, 3]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["backbone"]["1"]["trained_on_classes"] == order[:5]
        names = ", ".join(map(str, order[:5]))
        assert f"pre-trained on classes {names} only" in (out / "summary.md").read_text()
        assert f"pre-trained on classes {names} only" in capsys.readouterr().out
    assert len(fingerprints) == 1  # the bounds run on NMC's very backbone


@pytest.mark.parametrize("method", ["linear_probe", "sgd"])
def test_a_resumed_seed_loads_its_backbone_and_continues_exactly(tmp_path, method):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(whole, method) == 0
    assert _run(parts, method, "--stop-after", "1") == 0
    assert (parts / "checkpoints" / "seed1.pt").exists()
    assert _run(parts, method) == 0
    assert (parts / "results.jsonl").read_bytes() == (whole / "results.jsonl").read_bytes()
    timings = [json.loads(line) for line in (parts / "timings.jsonl").read_text().splitlines()]
    assert sum("pretrain_seconds" in t for t in timings) == 1  # pre-trained once, loaded on resume
