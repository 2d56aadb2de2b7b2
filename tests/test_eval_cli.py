"""The tta command: options generated from the dataclasses, a small real run end to end, resume, bad input."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import tta
from eval.cli import main
from eval.method_cli import add_method_options, method_options_from_args, resolved_options


def test_every_option_of_every_method_can_be_set():
    parser = argparse.ArgumentParser()
    add_method_options(parser)
    for method in tta.methods():
        for name, field in tta.method_options(method).__dataclass_fields__.items():
            if field.metadata.get("cli", True) is not True:  # objects (source_stats) and deprecated options
                continue
            default = getattr(tta.method_options(method)(), name)
            shown = str(default).lower() if isinstance(default, bool) else default
            args = parser.parse_args(["--set", f"{method}.{name}={shown}"])
            assert method_options_from_args(args, method) == {name: default}
    args = parser.parse_args(["--set", "tent.lr=0.01", "--set", "tent.optimizer=sgd", "--set", "alpha_bn.alpha=0.4",
                              "--set", "norm.episodic=true"])
    assert method_options_from_args(args, "tent") == {"lr": 0.01, "optimizer": "sgd"}
    assert method_options_from_args(args, "alpha_bn") == {"alpha": 0.4}
    assert method_options_from_args(args, "norm") == {"episodic": True}
    with pytest.raises(ValueError, match="choose one of adam, sgd"):
        method_options_from_args(parser.parse_args(["--set", "tent.optimizer=rmsprop"]), "tent")
    assert resolved_options("tent", {"lr": 0.01})["lr"] == 0.01
    assert resolved_options("tent", {})["optimizer"] == "adam"




def test_tta_corruption_runs_resumes_and_refuses_a_different_run_in_the_same_folder(tmp_path, capsys, monkeypatch):
    import eval.corruption_benchmark as bench
    from eval.demo import train_digits_cnn

    model = train_digits_cnn(epochs=2, log=False)
    monkeypatch.setattr(bench, "model_factory", lambda config, m=None: bench._fresh_copy(model, config))
    out = tmp_path / "run"
    argv = ["corruption", "--data", "digits", "--methods", "source,norm,tent", "--corruptions",
            "gaussian_noise,contrast", "--severity", "5", "--batch-size", "64", "--n-images", "128", "--out", str(out),
            "--no-progress", "--set", "tent.lr=0.002"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| source |" in printed and "| tent |" in printed and "gaussian_noise-5" in printed
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["corruption"]) for r in records} == {
        (m, c) for m in ("source", "norm", "tent") for c in ("gaussian_noise", "contrast")}
    assert all(r["n"] == 128 and 0 <= r["error"] <= 1 and r["seed"] == 0 for r in records)
    tent = next(r for r in records if r["method"] == "tent")
    assert tent["options"]["lr"] == 0.002
    config = json.loads((out / "config.json").read_text())
    assert config["resolved_options"]["tent"]["lr"] == 0.002 and config["versions"]["torch"]
    # rerun: nothing recomputed, same table
    assert main(argv) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    assert printed.split("results:")[0] == capsys.readouterr().out.split("results:")[0]
    # a different run into the same folder is refused
    assert main([*argv[:argv.index("--severity") + 1], "3", *argv[argv.index("--severity") + 2:]]) == 2
    assert "different run (severity differ)" in capsys.readouterr().err
    # so is a changed method option: tent's old rows would otherwise be reused as if run with the new lr
    assert main([*argv[:-1], "tent.lr=0.005"]) == 2
    assert "different run (tent options differ)" in capsys.readouterr().err
    # a folder written before an option existed resumes when that option is at its default, and only then
    saved = json.loads((out / "config.json").read_text())
    del saved["resolved_options"]["tent"]["weight_decay"]  # as if weight_decay had been added since
    (out / "config.json").write_text(json.dumps(saved))
    assert main(argv) == 0
    capsys.readouterr()
    (out / "config.json").write_text(json.dumps(saved))
    assert main([*argv, "--set", "tent.weight_decay=0.1"]) == 2
    assert "different run (tent options differ)" in capsys.readouterr().err
    # a folder written by tta 0.1 recorded the lean_graph option, which never changed results: it resumes
    saved["resolved_options"]["tent"]["lean_graph"] = "auto"
    (out / "config.json").write_text(json.dumps(saved))
    assert main(argv) == 0


def test_a_method_with_its_own_batch_size_and_image_count(tmp_path, capsys, monkeypatch):
    import eval.corruption_benchmark as bench
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn()
    monkeypatch.setattr(bench, "model_factory", lambda config, m=None: bench._fresh_copy(model, config))
    out = tmp_path / "run"
    argv = ["corruption", "--data", "digits", "--methods", "source,norm", "--corruptions", "contrast", "--severity",
            "3", "--batch-size", "32", "--n-images", "96", "--method-batch-size", "source=8", "--method-n-images",
            "source=40", "--out", str(out), "--no-progress", "--random-weights"]
    assert main(argv) == 0
    records = {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert (records["source"]["n"], records["source"]["batch_size"]) == (40, 8)
    assert (records["norm"]["n"], records["norm"]["batch_size"]) == (96, 32)
    # source's rows equal a run with those settings for every method: its own stream of the same data and seed
    alone = tmp_path / "alone"
    assert main(["corruption", "--data", "digits", "--methods", "source", "--corruptions", "contrast", "--severity",
                 "3", "--batch-size", "8", "--n-images", "40", "--out", str(alone), "--no-progress",
                 "--random-weights"]) == 0
    assert json.loads((alone / "results.jsonl").read_text().splitlines()[0])["error"] == records["source"]["error"]
    assert "- source: batch 8, 40 images per domain" in (out / "results.md").read_text()
    capsys.readouterr()
    changed = [*argv[:argv.index("source=8")], "source=16", *argv[argv.index("source=8") + 1:]]
    assert main(changed) == 2
    assert "source's batch size or image count" in capsys.readouterr().err
    assert main([*argv, "--method-batch-size", "tent=1"]) == 2
    assert "'tent' is not in this run's methods" in capsys.readouterr().err


def test_bad_method_and_missing_data_are_clear_one_line_errors(tmp_path, capsys, monkeypatch):
    assert main(["corruption", "--data", "digits", "--methods", "nope", "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("tta corruption: error: unknown method(s) ['nope']")
    assert main(["corruption", "--data", str(tmp_path / "missing.zip"), "--methods", "source",
                 "--weights", "w.pt", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "missing.zip' not found" in capsys.readouterr().err
    monkeypatch.setenv("TTA_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown method"):
        main(["corruption", "--data", "digits", "--methods", "nope", "--out", str(tmp_path / "a"), "--no-progress"])


def test_help_lists_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("demo", "corruption", "domains", "continual", "make-c", "bench"):
        assert command in out


def test_models_by_registry_torchvision_robustbench_and_arch(tmp_path, monkeypatch):
    import torch

    from eval.models import custom_entry, load_checkpoint, load_model, model_entry

    tv = load_model("torchvision:resnet18", random_weights=True)
    assert tv(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    # robustbench: found by name in its own layout under TTA_ROBUSTBENCH_DIR
    monkeypatch.setenv("TTA_ROBUSTBENCH_DIR", str(tmp_path))
    entry = model_entry("robustbench:Standard")
    with pytest.raises(FileNotFoundError, match="robustbench checkpoint not found"):
        load_model("robustbench:Standard")
    state = entry.build().state_dict()
    (tmp_path / "cifar10" / "corruptions").mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / entry.weights_file)
    model = load_model("robustbench:Standard")
    assert torch.equal(model.net.state_dict()[next(iter(state))], next(iter(state.values())))
    # --arch with an explicit normalisation, loading a state dict
    arch_entry = custom_entry("eval.demo:digits_cnn", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    from eval.demo import digits_cnn

    torch.save(digits_cnn().state_dict(), tmp_path / "digits.pt")
    custom = load_model("eval.demo:digits_cnn", tmp_path / "digits.pt", entry=arch_entry)
    assert custom.normalize.std.flatten().tolist() == [0.25] * 3
    with pytest.raises(ValueError, match="package.module:callable"):
        custom_entry("no_colon", (0,), (1,))
    # a whole pickled module is refused by weights_only loading, with the file named
    torch.save(digits_cnn(), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="module.pt.*weights_only"):
        load_checkpoint(tmp_path / "module.pt")


def _image_folder(root, domain_shift, n_per_class=12, seed=0):
    """A tiny ImageFolder: class 'dark' images are darker than class 'light' ones, plus a domain-wide shift."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    for label, base in (("dark", 60), ("light", 170)):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.clip(g.normal(base + domain_shift, 25, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def test_tta_domains_on_one_imagefolder_per_domain(tmp_path, capsys, monkeypatch):
    import torch

    import eval.corruption_benchmark as bench
    from eval.demo import digits_cnn

    for name, shift in (("photo", 0), ("sketch", 40), ("cartoon", -40)):
        _image_folder(tmp_path / "pacs" / name, shift)
    _image_folder(tmp_path / "source", 0, seed=1)
    torch.manual_seed(0)
    model = digits_cnn(num_classes=2).eval()
    monkeypatch.setattr(bench, "model_factory", lambda config, m=None: bench._fresh_copy(model, config))
    out = tmp_path / "out"
    argv = ["domains", "--data", str(tmp_path / "pacs"), "--domains", "sketch,cartoon", "--methods",
            "source,norm,cafa", "--source-data", str(tmp_path / "source"), "--batch-size", "8", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["domain"]) for r in records] == [
        (m, d) for d in ("sketch", "cartoon") for m in ("source", "norm", "cafa")]
    assert all(r["n"] == 24 for r in records)
    assert "| source |" in capsys.readouterr().out
    # cafa without labelled source data is refused with a clear message
    assert main([*argv[:argv.index("--source-data")], *argv[argv.index("--source-data") + 2:]]) == 2
    assert "--source-data" in capsys.readouterr().err
