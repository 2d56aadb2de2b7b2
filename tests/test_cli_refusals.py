"""``tta corruption`` as a new user meets it: no silently random model, classes that must match, --num-classes,
--n-images beyond the data, nothing written by a refused run, downloads without a network, Ctrl-C, and messages
that name the command's flags rather than Python arguments."""
from __future__ import annotations

import json
import urllib.error

import pytest
import torch
from torch import nn

from eval.cli import main
from eval.models import load_model

TINY = ["--data", "digits", "--corruptions", "gaussian_noise", "--severity", "3", "--batch-size", "16",
        "--n-images", "16", "--methods", "source", "--no-progress", "--threads", "1"]


def _corruption(out, *extra: str) -> int:
    return main(["corruption", *TINY, "--out", str(out), *extra])


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def fixed_net() -> nn.Module:
    """A constructor without num_classes: 7 outputs."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))


def test_a_model_without_weights_is_refused_unless_random_weights_is_asked_for(tmp_path, capsys):
    out = tmp_path / "r18"
    assert _corruption(out, "--model", "torchvision:resnet18") == 2
    err = _one_line_error(capsys)
    assert "has no weights" in err and "--weights PATH" in err and "--random-weights" in err
    assert "weights=PATH" not in err and "download=True" not in err  # the CLI names its flags
    assert not out.exists()
    # Python callers get the keyword arguments instead
    with pytest.raises(ValueError, match="random_weights=True"):
        load_model("torchvision:resnet18")


def test_outputs_must_match_the_data_s_classes_or_be_mapped(tmp_path, capsys):
    out = tmp_path / "r18"
    assert _corruption(out, "--model", "torchvision:resnet18", "--random-weights") == 2
    err = _one_line_error(capsys)
    assert "1000 outputs" in err and "10 classes" in err and "--class-map" in err
    assert not out.exists()
    assert _corruption(out, "--model", "torchvision:resnet18", "--random-weights", "--class-map", "0,1,2") == 2
    assert "the class map lists 3 outputs but digits has 10 classes" in _one_line_error(capsys)
    (tmp_path / "map.txt").write_text("\n".join(str(100 + i) for i in range(10)))
    assert _corruption(out, "--model", "torchvision:resnet18", "--random-weights", "--class-map",
                       str(tmp_path / "map.txt")) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["class_map"] == list(range(100, 110)) and config["random_weights"] is True
    assert _corruption(tmp_path / "both", "--random-weights", "--weights", "w.pt") == 2  # contradicting flags
    assert "--random-weights asks for no weights, but a checkpoint was given" in _one_line_error(capsys)
    # the mapped model returns exactly the chosen logits
    model = load_model("torchvision:resnet18", random_weights=True, class_map=[5, 3])
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), model.net(model.normalize(x))[:, [5, 3]])


def test_num_classes_reaches_the_constructor_or_is_a_one_line_error(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "r18_10.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    for model in (["--arch", "torchvision.models:resnet18", "--input-mean", "0.5,0.5,0.5", "--input-std",
                   "0.25,0.25,0.25"], ["--model", "torchvision:resnet18"]):
        out = tmp_path / model[1].replace(":", "_")
        assert _corruption(out, *model, "--num-classes", "10", "--weights", str(weights)) == 0, capsys.readouterr()
        assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["n"] == 16
    capsys.readouterr()
    arch = ["--arch", "tests.test_cli_refusals:fixed_net", "--input-mean", "0,0,0", "--input-std", "1,1,1"]
    assert _corruption(tmp_path / "fixed", *arch, "--num-classes", "10", "--random-weights") == 2
    err = _one_line_error(capsys)
    assert "gives 7 outputs, not 10" in err and "--num-classes" in err and "num_classes=N" not in err


def test_n_images_beyond_the_data_is_refused(tmp_path, capsys):
    out = tmp_path / "big"
    argv = [*TINY[:TINY.index("--n-images")], *TINY[TINY.index("--n-images") + 2:]]
    assert main(["corruption", *argv, "--n-images", "500", "--model", "torchvision:resnet18", "--random-weights",
                 "--class-map", ",".join(map(str, range(10))), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "--n-images 500 is more than the 360 images of gaussian_noise-3" in err and "--n-images 360" in err
    assert not out.exists()


def test_a_refused_run_writes_nothing_so_the_corrected_command_runs(tmp_path, capsys):
    out = tmp_path / "run"
    model = ["--model", "torchvision:resnet18", "--random-weights", "--class-map", ",".join(map(str, range(10)))]
    assert _corruption(out, *model, "--severity", "9") == 2
    assert "severity" in _one_line_error(capsys)
    assert not out.exists()
    assert _corruption(out, *model, "--severity", "3") == 0


def test_download_without_a_network_is_one_line_naming_what_where_and_how(tmp_path, capsys, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached torchvision weights
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no cached akamaster weights
    assert _corruption(tmp_path / "a", "--model", "torchvision:resnet18", "--download") == 2
    err = _one_line_error(capsys)
    assert "could not download the weights of torchvision:resnet18 from https://download.pytorch.org/" in err
    assert "Temporary failure in name resolution" in err and "--weights PATH" in err
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-") in err
    assert _corruption(tmp_path / "b", "--model", "cifar10_resnet20", "--download") == 2
    err = _one_line_error(capsys)
    assert "from https://github.com/akamaster/" in err and "resnet20-12fca82f.th" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_robustbench_download_without_a_network(tmp_path, capsys, monkeypatch):
    requests = pytest.importorskip("requests")
    pytest.importorskip("robustbench")
    import robustbench.utils

    def offline(*args, **kwargs):
        raise requests.ConnectionError("Max retries exceeded with url: /uc?id=...")

    monkeypatch.setattr(robustbench.utils, "load_model", offline)
    monkeypatch.setenv("TTA_ROBUSTBENCH_DIR", str(tmp_path / "rb"))
    assert _corruption(tmp_path / "c", "--model", "robustbench:Standard", "--download") == 2
    err = _one_line_error(capsys)
    assert "could not download the weights of robustbench:Standard from https://drive.google.com/" in err
    assert str(tmp_path / "rb" / "cifar10" / "corruptions" / "Standard.pt") in err and "--weights PATH" in err


def test_ctrl_c_says_the_run_resumes_and_it_does(tmp_path, capsys, monkeypatch):
    import eval.corruption_benchmark as bench
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn().eval()
    monkeypatch.setattr(bench, "model_factory", lambda config, m=None: bench._fresh_copy(model, config))
    real = bench.run_methods

    def interrupted_after_the_first_method(runs, *args, **kwargs):
        real(runs[:1], *args, **kwargs)
        raise KeyboardInterrupt

    argv = [*TINY[:TINY.index("--methods")], "--methods", "source,norm", *TINY[TINY.index("--methods") + 2:]]
    monkeypatch.setattr(bench, "run_methods", interrupted_after_the_first_method)
    assert main(["corruption", *argv, "--out", str(tmp_path / "cut")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "tta corruption: stopped (Ctrl-C); rerun the same command to resume where it stopped"
    monkeypatch.setattr(bench, "run_methods", real)
    assert main(["corruption", *argv, "--out", str(tmp_path / "cut")]) == 0
    assert main(["corruption", *argv, "--out", str(tmp_path / "whole")]) == 0
    assert (tmp_path / "cut" / "results.jsonl").read_bytes() == (tmp_path / "whole" / "results.jsonl").read_bytes()
