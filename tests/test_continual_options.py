"""``tta continual`` options as a new user meets them: options that cannot apply are errors, NMC's weights are
found, downloaded or asked for with the command's flags, config.json records the files actually used, and the
report after --stop-after or with one seed says only what is true."""
from __future__ import annotations

import json
import urllib.error

import pytest
import torch

from continual.config import ContinualConfig
from eval.cli import main

TINY = ["--n-train", "100", "--n-test", "50", "--no-progress", "--threads", "1"]
TRAINED = [*TINY, "--image-size", "8", "--width", "4", "--buffer", "20", "--eval-batch-size", "64"]


@pytest.mark.parametrize("options, message", [
    (["--method", "nmc", "--norm", "adab2n"], "--norm adab2n cannot apply to this run (--method nmc"),
    (["--method", "nmc", "--epochs", "3"], "--epochs 3 cannot apply"),
    (["--method", "er", "--kappa", "0.5"], "--kappa 0.5 cannot apply to this run (--method er --norm bn"),
    (["--method", "sgd", "--buffer", "100"], "--buffer 100 cannot apply"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum 0.9 cannot apply"),
    (["--method", "er", "--weights", "w.pt"], "--weights w.pt cannot apply"),
    (["--benchmark", "random-labels", "--n-test", "10"], "--n-test 10 cannot apply"),
])
def test_an_option_that_cannot_apply_is_an_error(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    assert main(["continual", "--out", str(out), *options, "--no-progress"]) == 2
    assert message in capsys.readouterr().out
    assert not out.exists()


def test_resolving_is_idempotent_and_fills_the_defaults():
    nmc = ContinualConfig(method="nmc").resolved()
    assert (nmc.norm, nmc.epochs) == ("none", 1) and nmc.resolved() == nmc
    sgd = ContinualConfig(method="sgd").resolved()
    assert (sgd.norm, sgd.buffer, sgd.data) == ("bn", 0, "digits") and sgd.resolved() == sgd


def _backbone_in_shared_data(root):
    from eval.cifar_resnet import CifarResNet

    folder = root / "models" / "akamaster-resnet-cifar10"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(CifarResNet(20, 10).state_dict(), folder / "resnet20-12fca82f.th")
    return folder / "resnet20-12fca82f.th"


def test_nmc_weights_are_asked_for_with_the_command_s_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TTA_SHARED_DATA", str(tmp_path / "empty"))
    out = tmp_path / "nmc"
    argv = ["continual", "--out", str(out), "--method", "nmc", "--backbone", "cifar10_resnet20", *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weights PATH" in err and "--download" in err
    assert str(tmp_path / "empty" / "models" / "akamaster-resnet-cifar10" / "resnet20-12fca82f.th") in err
    assert "weights=PATH" not in err and not out.exists()

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main([*argv, "--download"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not download the weights of cifar10_resnet20 from https://" in err
    assert not out.exists()


def test_config_json_records_the_data_and_weights_used_and_old_folders_resume(tmp_path, capsys, monkeypatch):
    weights = _backbone_in_shared_data(tmp_path / "shared")
    monkeypatch.setenv("TTA_SHARED_DATA", str(tmp_path / "shared"))
    out = tmp_path / "nmc"
    argv = ["continual", "--out", str(out), "--method", "nmc", "--backbone", "cifar10_resnet20", *TINY]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["data"] == "digits" and saved["config"]["weights"] == str(weights)
    # a folder written when these were recorded as null (the default locations) still resumes
    saved["config"]["data"] = saved["config"]["weights"] = None
    (out / "config.json").write_text(json.dumps(saved))
    assert main(argv) == 0
    assert "different configuration" not in capsys.readouterr().out


def test_stop_after_names_only_the_files_written_and_one_seed_has_no_spread(tmp_path, capsys):
    out = tmp_path / "er"
    argv = ["continual", "--out", str(out), "--method", "er", *TRAINED]
    assert main([*argv, "--stop-after", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"results in {out} (results.jsonl, timings.jsonl, config.json, summary.json)" in printed
    assert "accuracy_matrix" not in printed and "heatmap" not in printed
    assert "seed(s) 0 not finished (--stop-after)" in printed
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "heatmap.png" in printed and "±" not in printed and "final average accuracy: " in printed
    assert "±" not in (out / "summary.md").read_text() and "±" not in (out / "accuracy_matrix.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["bwt"]["std"] is None and summary["accuracy_matrix_std"] is None
