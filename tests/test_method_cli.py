"""Per-method options on the command line (``--set METHOD.OPTION=VALUE``), the deprecated per-method flags,
``tta methods``, and a user's own method loaded with ``--plugin`` (the README's "Write a method", as written)."""
from __future__ import annotations

import dataclasses

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tta
from eval.cli import main
from eval.method_cli import add_method_options, check_settings, method_options_from_args
from eval.methods_cli import methods_table

REPO = Path(__file__).resolve().parents[1]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_method_options(parser)
    return parser.parse_args(list(argv))


def test_set_gives_typed_values_to_the_named_method_only():
    args = _parse("--set", "tent.lr=5e-4", "--set", "tent.optimizer=sgd", "--set", "tent.nesterov=false",
                  "--set", "alpha_bn.alpha=0.3", "--set", "core.steps=2")
    assert method_options_from_args(args, "tent") == {"lr": 5e-4, "optimizer": "sgd", "nesterov": False}
    assert method_options_from_args(args, "alpha_bn") == {"alpha": 0.3}
    assert method_options_from_args(args, "core") == {"steps": 2}
    assert method_options_from_args(args, "norm") == {}
    tta.method_options("tent")(**method_options_from_args(args, "tent"))  # valid for the dataclass


@pytest.mark.parametrize("setting, message", [
    ("tent.lr", "write METHOD.OPTION=VALUE"),
    ("lr=1e-3", "write METHOD.OPTION=VALUE"),
    ("tentt.lr=1e-3", "unknown method 'tentt'; registered methods: source, norm"),
    ("tent.learning_rate=1e-3", "method 'tent' has no option 'learning_rate'; its options: episodic"),
    ("tent.lr=fast", "tent.lr is a float"),
    ("tent.steps=1.5", "tent.steps is a int"),
    ("tent.optimizer=adamw", "choose one of adam, sgd"),
    ("tent.episodic=maybe", "give true or false"),
    ("cafa.source_stats=x", "method 'cafa' has no option 'source_stats'"),  # an object: Python only
])
def test_bad_settings_say_what_is_allowed(setting, message):
    args = _parse("--set", setting)
    with pytest.raises(ValueError, match=re.escape(message)):
        method_options_from_args(args, "tent")


def test_a_setting_for_a_method_outside_the_run_is_refused():
    args = _parse("--set", "core.alpha=0.2")
    check_settings(args, ["core", "tent"])
    with pytest.raises(ValueError, match=r"'core' is not in this run's methods \(source, tent\)"):
        check_settings(args, ["source", "tent"])


def test_the_old_flags_still_work_and_warn():
    args = _parse("--tent-lr", "0.01", "--norm-episodic")
    with pytest.warns(FutureWarning, match=r"--tent-lr is deprecated .* use --set tent.lr=0.01"):
        assert method_options_from_args(args, "tent") == {"lr": 0.01}
    with pytest.warns(FutureWarning, match="--set norm.episodic=true"):
        assert method_options_from_args(args, "norm") == {"episodic": True}


def test_help_is_short_and_shows_set_not_one_flag_per_option(capsys):
    with pytest.raises(SystemExit):
        main(["corruption", "--help"])
    text = capsys.readouterr().out
    assert "--set METHOD.OPTION=VALUE" in text and "--tent-lr" not in text
    flags = [f"--{m}-{f.name}".replace("_", "-") for m in tta.methods()
             for f in dataclasses.fields(tta.method_options(m))]
    assert not [flag for flag in flags if flag in text]  # no per-method flag
    assert len(text.splitlines()) < 150  # the run's own flags only: 238 lines when each option had a flag


def test_methods_table_reads_the_class_declarations():
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in methods_table().splitlines()[2:]}
    assert list(rows) == tta.methods()
    for name in tta.methods():
        cls = tta.registry.method_class(name)
        assert rows[name][1:5] == [cls.updates, cls.batch_statistics, cls.layers, cls.source_data or "-"]
        assert rows[name][5].startswith("several passes" if cls.multi_pass else "one pass")
    assert rows["tent"][1] == "norm affine" and rows["norm"][1] == "nothing" and rows["source"][3] == "any"
    assert "tta.source_stats" in rows["cafa"][4]


def test_the_readme_s_methods_table_is_tta_methods_output():
    text = (REPO / "README.md").read_text()
    start = "<!-- methods-table: the output of `tta methods` -->\n"
    table = text.split(start, 1)[1].split("\n<!-- /methods-table -->")[0]
    assert table == methods_table(), "README's methods table is stale: paste the output of `tta methods`"


def test_methods_page_lists_every_option_with_its_default(capsys):
    assert main(["methods", "core"]) == 0
    text = capsys.readouterr().out
    assert "You, Li, Zhao 2021" in text  # the paper, from the method's file
    for name in ("alpha", "lr", "optimizer", "steps"):
        assert re.search(rf"^\| {name} \| \S+ \| \S+ \|", text, re.M), name
    assert "| alpha | float | 0.5 |" in text or "| alpha | float |" in text


def _readme_method_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Write a method", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_method_runs_as_written_from_python_and_every_command(tmp_path):
    (tmp_path / "my_methods.py").write_text(_readme_method_block())
    env_path = f"{tmp_path}:{REPO}"
    check = (
        "import torch, tta, my_methods\n"
        "from tests.tta_nets import conv_net\n"
        "model = conv_net()\n"
        "x = torch.rand(8, 3, 10, 10, generator=torch.Generator().manual_seed(0))\n"
        "adapted = tta.adapt(model, 'confident_tent', threshold=10.0)\n"  # every sample kept: tent's loss
        "reference = tta.adapt(conv_net(), 'tent')\n"
        "assert torch.equal(adapted(x), reference(x))\n"
        "assert torch.equal(adapted(x), reference(x))  # the same update as tent's\n"
        "adapted.release()\n"
        "nothing = tta.adapt(model, 'confident_tent', threshold=0.0)\n"  # no sample kept: no change
        "before = [p.clone() for p in model.parameters()]\n"
        "nothing(x); nothing(x)\n"
        "assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))\n"
        "print('ok')\n")
    env = {"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip() == "ok", done.stderr
    shown = subprocess.run([sys.executable, "-m", "eval.cli", "methods", "--plugin", "my_methods", "confident_tent"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "| threshold | float | 0.5 |" in shown.stdout, shown.stderr
    out = tmp_path / "run"
    ran = subprocess.run([sys.executable, "-m", "eval.cli", "corruption", "--plugin", "my_methods", "--data", "digits",
                          "--arch", "eval.demo:digits_cnn", "--input-mean", "0.5,0.5,0.5", "--input-std",
                          "0.5,0.5,0.5", "--random-weights", "--methods", "source,confident_tent",
                          "--set", "confident_tent.threshold=0.4",
                          "--corruptions", "contrast", "--n-images", "64", "--batch-size", "32", "--threads", "1",
                          "--no-progress", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert '"threshold": 0.4' in (out / "config.json").read_text()
    assert "confident_tent" in (out / "results.md").read_text()


def test_a_plugin_that_cannot_be_imported_is_a_one_line_error(capsys):
    assert main(["methods", "--plugin", "no_such_module_here"]) == 2
    assert "--plugin no_such_module_here: cannot import it" in capsys.readouterr().err
