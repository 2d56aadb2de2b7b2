"""``tta select`` / a sweep file's ``[select]`` block: options chosen on the validation corruptions only (never a
test corruption), by the documented rule (lowest mean validation error, ties to the first grid value, the margin
that keeps a default, the grid extension), recorded in selection.json, the test records and the report; an
overlap of validation and test corruptions refused; reruns skip finished validation and test cells.

The cells run in this process (an executor without Ray) on the embedded digits data with a small CNN, except one
test of the command itself on a local Ray."""
from __future__ import annotations

import json
import statistics
import tomllib
from pathlib import Path

import pytest
import torch

from eval.cli import main
from eval.records import ResultsLog
from eval.sweep import SweepError, load_sweep, parse_sweep
from eval.sweep_cell import run_cell
from eval.sweep_select import Candidate, Group, choose, default_candidate, extensions, run_selection
from streams.corruptions import EXTRA_CORRUPTIONS

TEST_CORRUPTIONS = ["gaussian_noise", "fog"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A digits CNN trained for two epochs (seeded): good enough that an absurd learning rate is clearly worse."""
    from eval.demo import train_digits_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_digits_cnn(epochs=2, log=False)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("model") / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    return path


def sweep_file(weights: Path, select: str, methods: str = "source = {}\ntent = {}",
               corruptions: str = json.dumps(TEST_CORRUPTIONS), top: str = "") -> str:
    return f"""{top}
protocols = ["reset"]
batch_sizes = [16]
seeds = [0]
n_images = 32

[methods]
{methods}

[select]
{select}

[[models]]
name = "cnn"
arch = "eval.demo:digits_cnn"
weights = "{weights}"
input_mean = [0, 0, 0]
input_std = [1, 1, 1]

[[data]]
name = "digits"
path = "digits"
corruptions = {corruptions}
severities = [5]
"""


def parse(text: str):
    return parse_sweep(tomllib.loads(text), "s.toml")


class InProcess:
    """Runs cells here, one by one, and remembers their keys; ``fail`` names cells that fail instead."""

    def __init__(self, fail=()):
        self.ran: list[str] = []
        self.fail = set(fail)

    def run(self, cells, on_start=None):
        threads = torch.get_num_threads()
        try:
            for cell in cells:
                self.ran.append(cell.key)
                if cell.key in self.fail:
                    yield cell, {"status": "failed", "error": "RuntimeError: told to", "traceback": ""}
                else:
                    yield cell, {"status": "done", "records": run_cell(cell, threads=1)}
        finally:
            torch.set_num_threads(threads)


# -- the rule, on given errors ---------------------------------------------------------------------------------------

def candidates(*pairs):
    return [Candidate({"lr": lr}, errors=[error]) for lr, error in pairs]


def test_the_rule_picks_the_lowest_mean_error_and_a_tie_goes_to_the_first_grid_value():
    default = {"lr": 0.001}
    assert choose(candidates((0.01, 0.30), (0.001, 0.20), (0.1, 0.25)), default) == ({"lr": 0.001}, {"lr": 0.001})
    assert choose(candidates((0.01, 0.20), (0.001, 0.20)), default)[0] == {"lr": 0.01}  # the first of equals
    assert choose(candidates((0.001, 0.20), (0.01, 0.20)), default)[0] == {"lr": 0.001}
    # the mean over all records of a candidate, each weighted equally
    two = [Candidate({"lr": 1}, errors=[0.1, 0.5]), Candidate({"lr": 2}, errors=[0.2, 0.3])]
    assert two[0].error == pytest.approx(0.3) and choose(two, {"lr": 1})[0] == {"lr": 2}


def test_a_margin_keeps_the_default_unless_a_candidate_is_better_by_more_than_it():
    default = {"lr": 0.001}
    within = candidates((0.0003, 0.308 - 0.00297), (0.001, 0.308))  # select_lr v2's core: 0.297 points better
    assert choose(within, default, margin=0.003) == (default, {"lr": 0.0003})
    beyond = candidates((0.0003, 0.300), (0.001, 0.308))
    assert choose(beyond, default, margin=0.003)[0] == {"lr": 0.0003}
    assert choose(within, default)[0] == {"lr": 0.0003}  # no margin: the lowest


def group(method: str, *pairs) -> Group:
    return Group(method=method, fixed={}, key=(), candidates=candidates(*pairs), default={"lr": 0.001},
                 best={"lr": min(pairs, key=lambda p: p[1])[0]})


def test_the_grid_is_extended_beyond_the_end_where_the_best_value_sits(weights):
    sweep = parse(sweep_file(weights, "extend = 2\nmethods = { tent = { lr = [0.0003, 0.001, 0.003] } }"))
    grids = {"tent": {"lr": [0.0003, 0.001, 0.003]}}
    high = group("tent", (0.0003, 0.3), (0.001, 0.2), (0.003, 0.1))
    assert extensions(sweep.select, grids, [high]) == {"tent": [0.009]}
    low = group("tent", (0.0003, 0.1), (0.001, 0.2), (0.003, 0.3))
    assert extensions(sweep.select, grids, [low]) == {"tent": [9e-05]}  # 0.0003 * 0.0003 / 0.001
    inside = group("tent", (0.0003, 0.3), (0.001, 0.1), (0.003, 0.3))
    assert extensions(sweep.select, grids, [inside]) == {}
    incomplete = group("tent", (0.0003, 0.3), (0.001, 0.2), (0.003, 0.1))
    incomplete.candidates[0].missing.append("a cell")
    assert extensions(sweep.select, grids, [incomplete]) == {}


def test_an_extension_stays_inside_the_options_range(weights):
    sweep = parse(sweep_file(weights, "extend = 1\nmethods = { alpha_bn = { alpha = [0.5, 1.0] } }",
                             methods="alpha_bn = {}"))
    best_at_one = Group(method="alpha_bn", fixed={}, key=(), default={"alpha": 0.5}, best={"alpha": 1.0},
                        candidates=[Candidate({"alpha": 0.5}, [0.3]), Candidate({"alpha": 1.0}, [0.2])])
    assert extensions(sweep.select, {"alpha_bn": {"alpha": [0.5, 1.0]}}, [best_at_one]) == {}  # 2.0 > 1


# -- the file --------------------------------------------------------------------------------------------------------

def test_validation_corruptions_that_overlap_the_test_corruptions_are_refused(weights):
    with pytest.raises(SweepError) as error:
        parse(sweep_file(weights, 'corruptions = ["spatter", "fog"]\nmethods = { tent = { lr = [0.001] } }'))
    message = str(error.value)
    assert "select.corruptions" in message and "overlap" in message and "data[0] (digits): fog" in message, message
    with pytest.raises(SweepError, match="gaussian_noise"):  # the test on every corruption, validation on 'all'
        parse(sweep_file(weights, 'corruptions = "all"\nmethods = { tent = { lr = [0.001] } }'))
    # a test grid that takes corruptions from the held-out ones
    with pytest.raises(SweepError, match=r"\(digits\): spatter, speckle_noise;"):
        parse(sweep_file(weights, "methods = { tent = { lr = [0.001] } }",
                         corruptions='["fog", "spatter", "speckle_noise"]'))


@pytest.mark.parametrize("select, methods, key, allowed", [
    ("methods = { tent = { lr = [0.001] } }", "source = {}", "select.methods.tent", "not in [methods]"),
    ("methods = { tent = { lr = [0.001] } }", "tent = { lr = 0.01 }", "select.methods.tent.lr", "not both"),
    ("methods = { tent = { lr = [0.001, 0.001] } }", "tent = {}", "select.methods.tent.lr", "repeats"),
    ("methods = { tent = { learning_rate = [0.1] } }", "tent = {}", "methods.tent.learning_rate", "optimizer, lr"),
    ("per = [\"colour\"]\nmethods = { tent = { lr = [0.001] } }", "tent = {}", "select.per[0]", "model, data"),
    ("margin = 0.003\nmethods = { tent = { lr = [0.01, 0.1] } }", "tent = {}", "select.methods.tent",
     "must contain the default (lr=0.001)"),
    ("models = [\"other\"]\nmethods = { tent = { lr = [0.001] } }", "tent = {}", "select.models[0]", "cnn"),
    ("batch_sizes = [8]\nper = [\"data\", \"batch_size\"]\nmethods = { tent = { lr = [0.001] } }", "tent = {}",
     "select.per", "batch_size=16"),
    ("colour = 1\nmethods = { tent = { lr = [0.001] } }", "tent = {}", "select.colour", "corruptions, severities"),
    ("protocols = [\"continual\", \"continual\"]\nmethods = { tent = { lr = [0.001] } }", "tent = {}",
     "select.protocols[1]", "at most once"),
    ("corruptions = [\"rain\"]\nmethods = { tent = { lr = [0.001] } }", "tent = {}", "select.corruptions",
     "speckle_noise"),
])
def test_an_invalid_select_block_names_the_key_and_the_allowed_values(weights, select, methods, key, allowed):
    with pytest.raises(SweepError) as error:
        parse(sweep_file(weights, select, methods=methods))
    message = str(error.value)
    assert f"{key}: " in message and allowed in message, message


# -- running ---------------------------------------------------------------------------------------------------------

ABSURD = "methods = { tent = { lr = [10.0, 0.001] } }"  # Adam at lr 10 wrecks the BatchNorm affine parameters


def test_the_lowest_mean_validation_error_is_chosen_and_the_test_runs_with_it(weights, tmp_path):
    sweep = parse(sweep_file(weights, ABSURD))
    out = tmp_path / "out"
    executor = InProcess()
    outcome = run_selection(sweep, out, executor, progress=False)
    assert not outcome.failed and not outcome.waiting
    validation = ResultsLog(out / "validation" / "results.jsonl").read()
    test = ResultsLog(out / "results.jsonl").read()
    # selection never evaluates a test corruption, and the test evaluates only test corruptions
    assert {r["corruption"] for r in validation} == set(EXTRA_CORRUPTIONS)
    assert {r["corruption"] for r in test} == set(TEST_CORRUPTIONS)
    assert all(r["method"] == "tent" for r in validation)
    # the mean validation error of each candidate, recomputed from the records; the lower one is chosen
    means = {lr: statistics.fmean(r["error"] for r in validation if r["options"]["lr"] == lr) for lr in (10.0, 0.001)}
    assert means[0.001] < means[10.0]
    selection = json.loads((out / "selection.json").read_text())
    entry = selection["methods"]["tent"]["model=cnn|data=digits"]
    assert [(c["options"], c["validation_error"], c["records"]) for c in entry["candidates"]] == [
        ({"lr": 10.0}, pytest.approx(means[10.0]), 4), ({"lr": 0.001}, pytest.approx(means[0.001]), 4)]
    assert entry["chosen"] == entry["best"] == {"lr": 0.001} and entry["default"] == {"lr": 0.001}
    assert entry["validation_error"] == pytest.approx(means[0.001])
    assert selection["validation"]["corruptions"] == list(EXTRA_CORRUPTIONS)
    assert selection["test_corruptions"] == {"digits": TEST_CORRUPTIONS}
    # the test records carry the chosen options; methods without a selection run as in the file
    assert {(r["method"], r["options"].get("lr")) for r in test} == {("source", None), ("tent", 0.001)}
    assert [k.split("method=")[1] for k in executor.ran] == [
        "tent[lr=0.001]|seed=0", "tent[lr=10.0]|seed=0", "source|seed=0", "tent[lr=0.001]|seed=0"]
    # the report: the table of selected hyper-parameters beside the defaults, then the test tables
    from eval.select_cli import report

    assert report(sweep, out, outcome, title="s") == 0
    text = (out / "results.md").read_text()
    assert "## Selected hyper-parameters" in text and text.index("Selected") < text.index("gaussian_noise-5")
    row = next(line for line in text.splitlines() if line.startswith("| tent |"))
    assert row.startswith(f"| tent | model=cnn, data=digits | lr=0.001 | {100 * means[0.001]:.1f} | lr=0.001 |")
    assert "spatter-5" in (out / "validation" / "results.md").read_text()


def test_reruns_skip_finished_validation_and_test_cells(weights, tmp_path):
    sweep = parse(sweep_file(weights, ABSURD))
    out = tmp_path / "out"
    first = InProcess()
    run_selection(sweep, out, first, progress=False, validation_only=True)
    assert len(first.ran) == 2 and not (out / "results.jsonl").exists()
    chosen = (out / "selection.json").read_bytes()
    second = InProcess()
    run_selection(sweep, out, second, progress=False)
    assert [k.split("method=")[1] for k in second.ran] == ["source|seed=0", "tent[lr=0.001]|seed=0"]
    assert (out / "selection.json").read_bytes() == chosen
    before = (out / "results.jsonl").read_bytes(), (out / "validation" / "results.jsonl").read_bytes()
    third = InProcess()
    run_selection(sweep, out, third, progress=False)
    assert third.ran == []
    assert ((out / "results.jsonl").read_bytes(), (out / "validation" / "results.jsonl").read_bytes()) == before


def test_a_failed_validation_cell_holds_back_its_groups_test_cells_until_retried(weights, tmp_path):
    sweep = parse(sweep_file(weights, ABSURD))
    out = tmp_path / "out"
    absurd = next(k for k in _validation_keys(sweep) if "lr=10.0" in k)
    outcome = run_selection(sweep, out, InProcess(fail=[absurd]), progress=False)
    assert outcome.failed == [absurd] and len(outcome.waiting) == 1 and "method=tent|" in outcome.waiting[0]
    entry = json.loads((out / "selection.json").read_text())["methods"]["tent"]["model=cnn|data=digits"]
    assert entry["chosen"] is None and entry["candidates"][0]["missing"] == [absurd]
    assert {r["method"] for r in ResultsLog(out / "results.jsonl").read()} == {"source"}
    retry = InProcess()
    outcome = run_selection(sweep, out, retry, progress=False, retry_failed=True)
    assert retry.ran == [absurd, next(k for k in _test_keys(out) if "tent" in k)]
    assert not outcome.failed and not outcome.waiting


def test_a_grid_of_another_option_in_methods_gets_one_choice_per_value(weights, tmp_path):
    sweep = parse(sweep_file(weights, ABSURD, methods="tent = { steps = [1, 2] }"))
    out = tmp_path / "out"
    run_selection(sweep, out, InProcess(), progress=False)
    methods = json.loads((out / "selection.json").read_text())["methods"]
    assert sorted(methods) == ["tent[steps=1]", "tent[steps=2]"]
    chosen = {entry["fixed"]["steps"]: entry["chosen"]["lr"]
              for by_key in methods.values() for entry in by_key.values()}
    assert chosen == {1: 0.001, 2: 0.001}
    test = ResultsLog(out / "results.jsonl").read()
    assert sorted({(r["options"]["steps"], r["options"]["lr"]) for r in test}) == [(1, 0.001), (2, 0.001)]


def _validation_keys(sweep):
    from eval.sweep_select import validation_sweep

    return [c.key for c in validation_sweep(sweep, sweep.select).cells()]


def _test_keys(out: Path):
    return [e["cell"] for e in ResultsLog(out / "cells.jsonl").read()]


def test_choices_average_over_axes_outside_the_key_and_the_extension_runs_more_validation_cells(weights, tmp_path):
    # two validation batch sizes averaged into one choice per (model, data); of [10, 0.001] the best, 0.001, is the
    # low end, so extend = 1 adds 0.001 * 0.001 / 10 = 1e-7 and runs it (once: extend is 1)
    select = "extend = 1\nbatch_sizes = [8, 16]\nmethods = { tent = { lr = [10.0, 0.001] } }"
    sweep = parse(sweep_file(weights, select, methods="tent = {}"))
    out = tmp_path / "out"
    outcome = run_selection(sweep, out, InProcess(), progress=False, validation_only=True)
    selection = json.loads((out / "selection.json").read_text())
    assert selection["extended"] == {"tent": [1e-7]} and selection["grids"] == {"tent": {"lr": [10.0, 0.001, 1e-7]}}
    assert len(outcome.validation) == 2  # two rounds: the file's grid, then the extension
    entry = selection["methods"]["tent"]["model=cnn|data=digits"]
    lrs = [c["options"]["lr"] for c in entry["candidates"]]
    validation = ResultsLog(out / "validation" / "results.jsonl").read()
    assert {r["batch_size"] for r in validation} == {8, 16} and len(validation) == 3 * 2 * 4
    means = {lr: statistics.fmean(r["error"] for r in validation if r["options"]["lr"] == lr) for lr in lrs}
    assert [c["validation_error"] for c in entry["candidates"]] == pytest.approx([means[lr] for lr in lrs])
    assert entry["chosen"] == {"lr": min(lrs, key=lambda lr: (means[lr], lrs.index(lr)))} != {"lr": 10.0}


# -- the command, on a local Ray -------------------------------------------------------------------------------------

@pytest.fixture
def ray_local():
    """A local Ray with two CPUs that both commands of the test use (starting Ray takes seconds)."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'tta-runtime[sweep]'")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_tta_select_runs_both_stages_and_lists_the_cells(ray_local, weights, tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(sweep_file(weights, ABSURD, methods="tent = {}"))
    out = tmp_path / "out"
    command = ["select", str(path), "--out", str(out), "--threads", "1", "--no-progress"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "| tent | model=cnn, data=digits | lr=0.001 |" in printed
    assert [r["options"]["lr"] for r in ResultsLog(out / "results.jsonl").read()] == [0.001, 0.001]
    assert main([*command, "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in listed] == [["done", "validation"]] * 2 + [["done", "test"]]
    # tta sweep on the same file does the same (here: nothing left to run)
    assert main(["sweep", *command[1:]]) == 0
    assert "validation cells run now: 0 (0 failed), skipped: 2" in capsys.readouterr().out


def test_tta_select_refuses_a_file_without_a_select_block(tmp_path, capsys, weights):
    path = tmp_path / "plain.toml"
    path.write_text(sweep_file(weights, "").replace("[select]\n", ""))
    assert load_sweep(path).select is None
    assert main(["select", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "no [select] block" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- the files of the repository -------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_the_example_of_docs_sweeps_md_selects_as_its_text_says():
    import re

    from eval.sweep_select import validation_sweep

    text = (REPO / "docs" / "sweeps.md").read_text()
    section = text[text.index("## Selecting hyper-parameters"):]
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    sweep = parse_sweep(tomllib.loads(example), "docs/sweeps.md")
    validation = validation_sweep(sweep, sweep.select).cells()
    assert len(validation) == int(re.search(r"on (\d+) validation cells", section).group(1))
    assert len(sweep.cells()) == int(re.search(r"\((\d+) test\s+cells\)", section).group(1))
    assert {c.data["corruptions"] for c in validation} == {"extra"}


def validation_grid(path: Path) -> dict:
    """What a selection file validates on, in the terms of the scripts it replaces."""
    from eval.sweep_select import validation_sweep

    sweep = load_sweep(path)
    cells = validation_sweep(sweep, sweep.select).cells()
    return {"grids": sweep.select.methods, "margin": sweep.select.margin, "extend": sweep.select.extend,
            "models": sorted({c.model["name"] for c in cells}), "protocols": sorted({c.protocol for c in cells}),
            "batch_sizes": sorted({c.batch_size for c in cells}), "seeds": sorted({c.seed for c in cells}),
            "severities": sorted({c.severity for c in cells}), "corruptions": {c.data["corruptions"] for c in cells},
            "n_images": {c.data.get("n_images", c.settings["n_images"]) for c in cells}}


def test_the_selection_files_validate_on_the_grids_of_the_scripts_they_replace():
    lrs = [0.0003, 0.001, 0.003]
    common = {"models": ["resnet20"], "seeds": [0], "severities": [5], "corruptions": {"extra"}}
    # select_alpha.py: alpha_bn's 8 alphas, batch sizes 16, 64, 200, reset, 1000 images, no margin
    assert validation_grid(REPO / "benchmarks" / "select_alpha.toml") == {
        **common, "grids": {"alpha_bn": {"alpha": [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]}}, "margin": 0.0,
        "extend": 0, "protocols": ["reset"], "batch_sizes": [16, 64, 200], "n_images": {1000}}
    # select_lr.py rule v2: core and cafa, 4 rates, continual only, 7500 images, margin 0.3 points, no extension
    assert validation_grid(REPO / "benchmarks" / "select_lr.toml") == {
        **common, "grids": {m: {"lr": [*lrs, 0.009]} for m in ("core", "cafa")}, "margin": 0.003, "extend": 0,
        "protocols": ["continual"], "batch_sizes": [200], "n_images": {7500}}
    # select_lr.py rule v1: core, cafa, tent, 3 rates extended at most twice, reset and continual, 2000 images
    assert validation_grid(REPO / "benchmarks" / "select_lr_short.toml") == {
        **common, "grids": {m: {"lr": lrs} for m in ("core", "cafa", "tent")}, "margin": 0.003, "extend": 2,
        "protocols": ["continual", "reset"], "batch_sizes": [200], "n_images": {2000}}


@pytest.mark.parametrize("file, figures, chosen_key", [
    ("select_alpha.toml", "alpha_selection.json", "chosen_alpha"),
    ("select_lr.toml", "lr_selection_long.json", "chosen_lr"),
    ("select_lr_short.toml", "lr_selection.json", "chosen_lr"),
])
def test_the_rule_of_a_selection_file_on_its_scripts_figures_makes_the_scripts_choices(file, figures, chosen_key):
    """The scripts' recorded mean validation errors, fed to the rule round by round as ``tta select`` would (the
    grid extended where the best value sits), give the values the scripts chose."""
    sweep = load_sweep(REPO / "benchmarks" / file)
    recorded = json.loads((REPO / "docs" / figures).read_text())
    for method, grid in sweep.select.methods.items():
        (name, values), = grid.items()
        grids = {method: {name: list(values)}}
        by_value = recorded["mean_error"].get(method, recorded["mean_error"])  # select_alpha.py: one method
        means = {float(value): error for value, error in by_value.items()}
        for _ in range(sweep.select.extend + 1):
            candidates = [Candidate({name: v}, errors=[means[v]]) for v in grids[method][name]]
            default = default_candidate(method, [name])
            chosen, best = choose(candidates, default, sweep.select.margin)
            group = Group(method=method, fixed={}, key=(), candidates=candidates, default=default, chosen=chosen,
                          best=best)
            added = extensions(sweep.select, grids, [group])
            if not added:
                break
            grids[method][name] += added[method]  # a value the script also ran: a KeyError here says otherwise
        want = recorded[chosen_key] if chosen_key == "chosen_alpha" else recorded[chosen_key][method]
        assert chosen == {name: want}, (method, grids)
