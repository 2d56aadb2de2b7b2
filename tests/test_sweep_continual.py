"""Continual cells of ``tta sweep`` (a ``[continual]`` table): validation and expansion, a two-cell sweep on a local
Ray giving the records of ``tta continual`` run for each cell, resume, the continual table of the report."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from continual.records import experience_records, read_records
from eval.cli import main
from eval.records import ResultsLog
from eval.sweep import SweepError, load_sweep, parse_sweep, sort_key
from eval.sweep_driver import latest_status, run_sweep

TINY = {"n_train": 100, "n_test": 50, "image_size": 8, "width": 4, "eval_batch_size": 64}
TINY_FLAGS = ["--n-train", "100", "--n-test", "50", "--image-size", "8", "--width", "4", "--eval-batch-size", "64",
              "--no-progress", "--threads", "1"]


def continual_table(body: str, settings: dict | None = None) -> str:
    fixed = "".join(f"{k} = {v}\n" for k, v in (TINY if settings is None else settings).items())
    return f"[continual]\n{fixed}{body}"


def parse(text: str):
    return parse_sweep(tomllib.loads(text), "s.toml")


# -- the table: validation and expansion (no Ray) ------------------------------------------------------------------

@pytest.mark.parametrize("body, key, allowed", [
    ("colour = 3\n[continual.methods]\ner = {}\n", "continual.colour", "benchmarks, methods, norms, buffers"),
    ("norms = [\"bn\", \"group\"]\n[continual.methods]\ner = {}\n", "continual.norms[1]",
     "bn, none, adab2n, layer, rms, nap"),
    ("benchmarks = [\"split-mnist\"]\n[continual.methods]\ner = {}\n", "continual.benchmarks[0]",
     "split-digits, split-cifar10"),
    ("buffers = [-1]\n[continual.methods]\ner = {}\n", "continual.buffers[0]", "integers >= 0"),
    ("[continual.methods]\newc = {}\n", "continual.methods.ewc", "sgd, er, er_ace, nmc"),
    ("[continual.methods]\ner = { learning_rate = [0.1] }\n", "continual.methods.er.learning_rate", "lr, momentum"),
    ("[continual.methods]\ner = { optimizer = [\"adam\", \"lion\"] }\n", "continual.methods.er.optimizer",
     "sgd, adam"),
    ("[continual.methods]\ner = { lr = \"fast\" }\n", "continual.methods.er.lr", "a float"),
    ("[continual.methods]\ner = { n_train = 10 }\n", "continual.methods.er.n_train", "also set as"),
    ("kappa = 0.5\n[continual.methods]\ner = {}\n", "continual.kappa", "--norm adab2n"),
    ("[continual.methods]\n", "continual.methods", "missing or empty"),
])
def test_an_invalid_continual_key_is_refused_naming_it(tmp_path, body, key, allowed):
    path = tmp_path / "bad.toml"
    path.write_text(continual_table(body))
    with pytest.raises(SweepError) as error:
        load_sweep(path)
    message = str(error.value)
    assert f": {key}: " in message and allowed in message, message


def test_an_impossible_combination_is_refused_naming_the_cell():
    with pytest.raises(SweepError, match=r"continual: cell benchmark=random-labels\|method=er\|norm=adab2n.*mlp"):
        parse(continual_table('benchmarks = ["random-labels"]\nnorms = ["adab2n"]\n[continual.methods]\ner = {}\n',
                              {"n_train": 64}))


def test_axes_that_cannot_apply_are_not_expanded_and_options_apply_where_they_can():
    sweep = parse(continual_table('norms = ["bn", "adab2n"]\nbuffers = [20, 50]\nseeds = [1, 0]\n'
                                  "[continual.methods]\nsgd = {}\ner = { kappa = [0.5, 1.0] }\n"))
    assert sweep.corruption_cells() == []
    keys = [c.key for c in sweep.cells()]
    assert keys == [c.key for c in sorted(sweep.cells(), key=lambda c: sort_key(c.axes()))]
    labels = sorted({k.split("|seed")[0] for k in keys})
    assert labels == [
        "benchmark=split-digits|method=er[kappa=0.5]|norm=adab2n|buffer=20",
        "benchmark=split-digits|method=er[kappa=0.5]|norm=adab2n|buffer=50",
        "benchmark=split-digits|method=er[kappa=1.0]|norm=adab2n|buffer=20",
        "benchmark=split-digits|method=er[kappa=1.0]|norm=adab2n|buffer=50",
        "benchmark=split-digits|method=er|norm=bn|buffer=20",  # kappa is for adab2n: both values are one cell
        "benchmark=split-digits|method=er|norm=bn|buffer=50",
        "benchmark=split-digits|method=sgd|norm=adab2n|buffer=0",  # sgd replays nothing: one buffer
        "benchmark=split-digits|method=sgd|norm=bn|buffer=0"]
    assert len(keys) == 2 * len(labels) and keys[0].endswith("seed=0") and keys[1].endswith("seed=1")
    assert all(c.settings == {"device": "cpu", **TINY} for c in sweep.cells())


def test_a_file_may_hold_corruption_and_continual_cells(tmp_path):
    text = """
seeds = [3]
[methods]
source = {}
[[models]]
name = "m"
model = "cifar10_resnet20"
[[data]]
name = "d"
path = "digits"
corruptions = ["fog"]
""" + continual_table("[continual.methods]\nsgd = {}\n")
    cells = parse(text).cells()
    assert [c.key for c in cells] == [
        "model=m|data=d@5|protocol=reset|batch_size=200|method=source|seed=3",
        "benchmark=split-digits|method=sgd|norm=bn|buffer=0|seed=3"]  # the top-level seeds are the default


# -- running: two cells on a local Ray, resume, the report ---------------------------------------------------------

def direct(cell, out: Path) -> list[dict]:
    """The records of ``tta continual`` with the cell's flags, in this process."""
    argv = ["continual", "--out", str(out), *TINY_FLAGS, "--method", cell.method, "--norm", cell.norm,
            "--seeds", str(cell.seed)]
    if cell.method in ("er", "er_ace"):
        argv += ["--buffer", str(cell.buffer)]
    for name, value in cell.options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return experience_records(read_records(out / "results.jsonl"))


class NoRun:
    def run(self, cells, on_start=None):
        assert not cells, f"a rerun ran {[c.key for c in cells]}"
        return iter(())


def test_a_two_cell_continual_sweep_gives_the_records_of_tta_continual(tmp_path, capsys):
    pytest.importorskip("ray", reason="ray is not installed: pip install 'tta-runtime[sweep]' to test tta sweep")
    path = tmp_path / "c.toml"
    path.write_text(continual_table('buffers = [20]\n[continual.methods]\ner = { lr = 0.05 }\nsgd = {}\n'))
    sweep = load_sweep(path)
    cells = sweep.cells()
    assert [c.key for c in cells] == ["benchmark=split-digits|method=er[lr=0.05]|norm=bn|buffer=20|seed=0",
                                      "benchmark=split-digits|method=sgd|norm=bn|buffer=0|seed=0"]
    out = tmp_path / "out"
    command = ["sweep", str(path), "--out", str(out), "--num-cpus", "2", "--threads", "1", "--no-progress"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "final average accuracy" in printed and "cells run now: 2 (0 failed)" in printed
    records = ResultsLog(out / "results.jsonl").read()
    assert [r["cell"] for r in records] == [c.key for c in cells for _ in range(6)]  # 5 experiences + summary
    for cell in cells:
        mine = [r for r in records if r["cell"] == cell.key]
        experiences = [{k: v for k, v in r.items() if k not in ("cell", "sweep")} for r in mine[:5]]
        assert experiences == direct(cell, tmp_path / f"direct-{cell.method}")  # accuracies and all
        summary = mine[5]["summary"]
        reference = __import__("json").loads((tmp_path / f"direct-{cell.method}" / "summary.json").read_text())
        assert summary == reference["per_seed"]["0"]
        assert mine[5]["sweep"]["kind"] == "continual" and mine[5]["config"]["buffer"] == cell.buffer
    assert {e["kind"] for e in latest_status(out).values()} == {"done"}
    # the report: one continual row per (benchmark, method, norm, buffer); one seed, so no spread
    report = (out / "results.md").read_text()
    assert "| split-digits | er[lr=0.05] | bn | 20 | 1 |" in report and "±" not in report.split("Continual:")[0]
    assert (out / "results_continual.csv").read_text().startswith("benchmark,method,norm,buffer,seeds,")

    # resume: a rerun runs nothing; a grid with one more seed runs only the new cells
    before = (out / "results.jsonl").read_bytes()
    assert run_sweep(sweep, out, NoRun(), progress=False).ran == []
    assert (out / "results.jsonl").read_bytes() == before
    more = parse(continual_table('buffers = [20]\nseeds = [0, 1]\n[continual.methods]\ner = { lr = 0.05 }\n'
                                 "sgd = {}\n"))

    class InProcess:
        ran: list[str] = []

        def run(self, cells, on_start=None):
            from eval.sweep_cell import run_cell_outcome

            for c in cells:
                self.ran.append(c.key)
                yield c, run_cell_outcome(c, threads=1)

    threads = torch.get_num_threads()
    try:
        summary = run_sweep(more, out, InProcess(), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert InProcess.ran == [c.key for c in more.cells() if c.seed == 1] and len(summary.skipped) == 2
    records = ResultsLog(out / "results.jsonl").read()
    assert [r["cell"] for r in records] == [c.key for c in more.cells() for _ in range(6)]
    from eval.sweep_report import write_sweep_report

    (table,) = write_sweep_report(records, out)
    assert "| split-digits | sgd | bn | 0 | 2 |" in table.to_markdown() and "±" in table.to_markdown()
    # a changed setting of a finished cell is refused, not mixed in
    changed = parse(continual_table('buffers = [20]\n[continual.methods]\ner = { lr = 0.05 }\nsgd = {}\n',
                                    {**TINY, "n_train": 120}))
    with pytest.raises(ValueError, match="n_train"):
        run_sweep(changed, out, NoRun(), progress=False)


def test_a_failing_continual_cell_is_recorded_as_failed(tmp_path):
    from eval.sweep_cell import run_cell_outcome

    settings = {"n_train": 100, "n_test": 50, "data": '"/no/such/data"'}  # image_size is for digits only
    sweep = parse(continual_table('[continual.methods]\nsgd = {}\n', settings))
    (cell,) = sweep.cells()

    class InProcess:
        def run(self, cells, on_start=None):
            for c in cells:
                yield c, run_cell_outcome(c, threads=1)

    threads = torch.get_num_threads()
    try:
        summary = run_sweep(sweep, tmp_path / "out", InProcess(), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary.failed == [cell.key]
    entry = latest_status(tmp_path / "out")[cell.key]
    assert entry["kind"] == "failed" and "Traceback" in entry["traceback"]


def test_the_continual_example_of_docs_sweeps_md_expands_as_it_says():
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "sweeps.md").read_text()
    section = text.split("## Continual cells", 1)[1]
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    cells = parse(example).cells()
    assert len(cells) == int(re.search(r"expands into (\d+) cells", section).group(1))
    by_method = {m: sum(c.method == m for c in cells) for m in ("er", "er_ace", "sgd")}
    assert by_method == {"er": 24, "er_ace": 12, "sgd": 6}
    assert all(("kappa" in c.settings) == (c.norm == "adab2n") for c in cells)
