"""``tta sweep``: the sweep file's validation and expansion, the order of cells, resuming, and the cells on a local
Ray (two workers): the same records as the cells run one by one, a killed worker retried, a raising cell recorded
as failed and rerun alone by --retry-failed."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from eval.cli import main
from eval.records import ResultsLog
from eval.sweep import SweepError, cell_key, load_sweep, parse_sweep, sort_key
from eval.sweep_cell import run_cell
from eval.sweep_driver import latest_status, run_sweep
from tta import accel

REPO = Path(__file__).resolve().parents[1]
ALL_ON = {piece: True for piece in accel.PIECES}  # the fast path as `tta sweep` and `tta corruption` use it
PLUGIN = "tests.sweep_plugin"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A seeded, untrained digits CNN: enough for records that must match bit for bit."""
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "digits_cnn.pt"
    torch.save(digits_cnn().state_dict(), path)
    return path


def grid(weights: Path, methods: str, seeds: str = "[0, 1]", corruptions: str = '["gaussian_noise", "fog"]') -> str:
    return f"""
protocols = ["reset"]
batch_sizes = [16]
seeds = {seeds}
n_images = 32

[methods]
{methods}

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


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def without_sweep_fields(records):
    return [{k: v for k, v in r.items() if k not in ("cell", "sweep")} for r in records]


# -- the sweep file: validation, expansion, order (no Ray) --------------------------------------------------------

@pytest.mark.parametrize("change, key, allowed", [
    ("protocols = [\"reset\", \"sideways\"]\n", "protocols[1]", "reset, continual, gradual"),
    ("batch_sizes = [0]\n", "batch_sizes[0]", "integers >= 1"),
    ("colour = 3\n", "colour", "methods, models, data"),
    ("[methods]\nsource = {}\nnot_a_method = {}\n", "methods.not_a_method", "source, norm, alpha_bn"),
    ("[methods]\ntent = { learning_rate = [0.1] }\n", "methods.tent.learning_rate", "optimizer, lr, steps"),
    ("[methods]\ntent = { optimizer = [\"adam\", \"rmsprop\"] }\n", "methods.tent.optimizer", "'adam', 'sgd'"),
    ("[methods]\ntent = { steps = [1.5] }\n", "methods.tent.steps", "a int"),
    ("[[data]]\nname = \"d\"\npath = \"digits\"\nseverities = [6]\n", "data[0].severities[0]", "1, 2, 3, 4, 5"),
    ("[[data]]\nname = \"d\"\npath = \"digits\"\ncorruptions = [\"rain\"]\n", "data[0].corruptions",
     "gaussian_noise"),
    ("[[data]]\nname = \"d\"\npath = \"p\"\ndomains = []\nseverities = [5]\n", "data[0].severities",
     "not allowed with domains"),
    ("[[models]]\nname = \"m\"\nmodel = \"x\"\nwieghts = \"w\"\n", "models[0].wieghts", "name, model, weights"),
])
def test_an_invalid_sweep_file_names_the_key_and_the_allowed_values(tmp_path, change, key, allowed):
    base = {"protocols": 'protocols = ["reset"]\n', "batch_sizes": "batch_sizes = [16]\n",
            "[methods]": "[methods]\nsource = {}\n",
            "[[models]]": '[[models]]\nname = "m"\nmodel = "cifar10_resnet20"\n',
            "[[data]]": '[[data]]\nname = "d"\npath = "digits"\n'}
    section = next((name for name in base if change.startswith(name)), None)
    parts = dict(base)
    if section:
        parts[section] = change
        text = "".join(parts.values())
    else:
        text = change + "".join(parts.values())
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(SweepError) as error:
        load_sweep(path)
    message = str(error.value)
    assert f": {key}: " in message and allowed in message, message


def test_the_command_rejects_an_invalid_file_before_writing_anything(tmp_path, capsys):
    path = write(tmp_path / "bad.toml", "seeds = [\"zero\"]\n[methods]\nsource = {}\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "models: missing" in error and "[[models]]" in error, error
    assert not (tmp_path / "out").exists()


def test_cells_are_ordered_by_their_key_whatever_the_file_order(weights):
    one = parse_sweep(__import__("tomllib").loads(grid(weights, "tent = { lr = [0.01, 0.001] }\nsource = {}",
                                                       seeds="[10, 2]")))
    two = parse_sweep(__import__("tomllib").loads(grid(weights, "source = {}\ntent = { lr = [0.001, 0.01] }",
                                                       seeds="[2, 10]")))
    keys = [c.key for c in one.cells()]
    assert keys == [c.key for c in two.cells()]
    # names by code point, numbers numerically: seed 2 before 10, lr 0.001 before 0.01
    assert [re.sub(r".*method=", "", k) for k in keys] == [
        "source|seed=2", "source|seed=10", "tent[lr=0.001]|seed=2", "tent[lr=0.001]|seed=10",
        "tent[lr=0.01]|seed=2", "tent[lr=0.01]|seed=10"]
    axes = [c.axes() for c in one.cells()]
    assert axes == sorted(axes, key=sort_key)
    small, large = dict(axes[0], batch_size=64), dict(axes[0], batch_size=128)
    assert sort_key(small) < sort_key(large) and cell_key(small) != cell_key(large)


class NoRun:
    """An executor for reruns that must run nothing."""

    def run(self, cells, on_start=None):
        assert not cells, f"a rerun ran {[c.key for c in cells]}"
        return iter(())


# -- on Ray --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    """One local Ray with two CPUs for the module (starting Ray takes seconds; each cell still gets a fresh worker)."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'tta-runtime[sweep]' to test tta sweep")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def executor(**options):
    from eval.sweep_ray import RayExecutor

    options.setdefault("accel", ALL_ON)
    return RayExecutor(cpus_per_cell=1, threads=1, plugins=[PLUGIN], **options)


def reference(cell, tmp_path: Path, threads: int = 1):
    """The records of ``cell`` from ``tta corruption`` with the same settings, in this process."""
    out = tmp_path / f"ref-{abs(hash(cell.key))}"
    argv = ["corruption", "--arch", cell.model["arch"], "--weights", cell.model["weights"], "--input-mean", "0,0,0",
            "--input-std", "1,1,1", "--data", "digits", "--corruptions", ",".join(cell.data["corruptions"]),
            "--severity", str(cell.severity), "--protocol", cell.protocol, "--batch-size", str(cell.batch_size),
            "--n-images", str(cell.settings["n_images"]), "--seed", str(cell.seed), "--methods", cell.method,
            "--threads", str(threads), "--no-progress", "--out", str(out)]
    for name, value in cell.options.items():
        argv += ["--set", f"{cell.method}.{name}={value}"]
    before = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    return ResultsLog(out / "results.jsonl").read()


def test_a_two_worker_sweep_gives_the_records_of_the_cells_run_one_by_one(ray_local, weights, tmp_path):
    sweep = load_sweep(write(tmp_path / "s.toml", grid(weights, "source = {}\ntent = { lr = [0.001] }")))
    cells = sweep.cells()
    with executor() as ex:
        summary = run_sweep(sweep, tmp_path / "out", ex, progress=False)
    assert len(summary.ran) == 4 and not summary.failed
    records = ResultsLog(tmp_path / "out" / "results.jsonl").read()
    # the driver's file: cells in key order, each cell's records in stream order, each carrying the cell's key
    assert [r["cell"] for r in records] == [c.key for c in cells for _ in range(2)]
    assert [r["segment"] for r in records] == [0, 1] * 4
    expected = [r for c in cells for r in reference(c, tmp_path)]
    assert without_sweep_fields(records) == expected
    # a rerun of the same sweep runs nothing and leaves the file as it was
    before = (tmp_path / "out" / "results.jsonl").read_bytes()
    summary = run_sweep(sweep, tmp_path / "out", NoRun(), progress=False)
    assert summary.ran == [] and len(summary.skipped) == 4
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == before
    # the report over the grid: mean over the two seeds with its spread
    from eval.sweep_report import write_sweep_report

    tables = write_sweep_report(records, tmp_path / "out")
    assert [t.rows for t in tables] == [["source", "tent[lr=0.001]"]]
    table = tables[0]
    errors = [r["error"] for r in records if r["method"] == "source" and r["domain"] == "fog-5"]
    assert table.mean_table().errors["source"]["fog-5"] == pytest.approx(sum(errors) / 2)
    assert "±" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "errors_cnn_on_digits_5__reset__batch_16.png").exists()


def test_a_worker_killed_mid_cell_is_retried_with_identical_results(ray_local, weights, tmp_path):
    sweep = load_sweep(write(tmp_path / "s.toml", grid(weights, "tent = { lr = [0.001] }", seeds="[0]")))
    (cell,) = sweep.cells()
    marker = tmp_path / "killed-once"
    # the cell's first worker SIGKILLs itself right after its first record (TTA_KILL_AT=record:1), mid-cell
    env = {cell.key: {"TTA_TEST_KILL_MARKER": str(marker), "TTA_TEST_KILL_AT": "record:1"}}
    with executor(cell_env=env) as ex:
        summary = run_sweep(sweep, tmp_path / "out", ex, progress=False)
    assert marker.exists(), "the kill point was never armed"
    assert summary.ran == [cell.key] and not summary.failed
    assert len((marker.parent / (marker.name + ".tries")).read_text().split()) == 2  # killed, then retried
    records = ResultsLog(tmp_path / "out" / "results.jsonl").read()
    assert without_sweep_fields(records) == reference(cell, tmp_path)


def test_a_raising_cell_is_recorded_as_failed_and_retry_failed_reruns_only_it(ray_local, weights, tmp_path, capsys):
    importlib.import_module(PLUGIN)  # registers fails_unless here too, as --plugin does in the driver
    marker = tmp_path / "may-run"
    path = write(tmp_path / "s.toml", grid(weights, f'source = {{}}\nfails_unless = {{ marker = "{marker}" }}',
                                           seeds="[0]", corruptions='["fog"]'))
    failing, fine = load_sweep(path).cells()
    assert failing.method == "fails_unless" and fine.method == "source"
    out = tmp_path / "out"
    command = ["sweep", str(path), "--out", str(out), "--plugin", PLUGIN, "--threads", "1", "--no-progress"]
    assert main(command) == 1  # the command itself, on the Ray this module started
    assert "--retry-failed" in capsys.readouterr().out
    entry = latest_status(out)[failing.key]
    assert entry["kind"] == "failed" and "does not exist" in entry["error"]
    assert "Traceback" in entry["traceback"] and "_setup" in entry["traceback"]
    assert [r["cell"] for r in ResultsLog(out / "results.jsonl").read()] == [fine.key]
    assert main([*command, "--list"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == [f"failed  {failing.key}", f"done    {fine.key}"]
    # a plain rerun skips the failed cell too; --retry-failed runs it, and only it
    assert main(command) == 1
    assert len(ResultsLog(out / "cells.jsonl").read()) == 2
    marker.touch()
    assert main([*command, "--retry-failed"]) == 0
    assert "cells run now: 1 (0 failed), skipped: 1" in capsys.readouterr().out
    assert [(e["kind"], e["cell"]) for e in ResultsLog(out / "cells.jsonl").read()][2:] == [("done", failing.key)]
    assert [r["cell"] for r in ResultsLog(out / "results.jsonl").read()] == [failing.key, fine.key]
    assert "fails_unless[marker=" in (out / "results.md").read_text()


def test_records_of_a_cell_without_its_done_line_are_dropped_and_the_cell_runs_again(weights, tmp_path):
    sweep = load_sweep(write(tmp_path / "s.toml", grid(weights, "source = {}", seeds="[0]",
                                                       corruptions='["fog"]')))
    (cell,) = sweep.cells()
    threads = torch.get_num_threads()
    records = run_cell(cell, threads=1)
    out = tmp_path / "out"
    ResultsLog(out / "results.jsonl").append(records[0])  # the driver was stopped before the cell's done line

    class InProcess:
        ran = []

        def run(self, cells, on_start=None):
            for c in cells:
                self.ran.append(c.key)
                yield c, {"status": "done", "records": run_cell(c, threads=1)}

    executor_ = InProcess()
    run_sweep(sweep, out, executor_, progress=False)
    assert executor_.ran == [cell.key]
    torch.set_num_threads(threads)
    assert ResultsLog(out / "results.jsonl").read() == records
    # a changed setting of a finished cell is refused, not mixed in
    changed = load_sweep(write(tmp_path / "s2.toml", grid(weights, "source = {}", seeds="[0]",
                                                          corruptions='["fog"]').replace("n_images = 32",
                                                                                         "n_images = 48")))
    assert changed.cells()[0].key == cell.key
    with pytest.raises(ValueError, match="n_images"):
        run_sweep(changed, out, NoRun(), progress=False)


def test_the_example_of_docs_sweeps_md_is_valid_and_runs(tmp_path):
    from tests.conftest import SHARED_DATA, shared_path

    text = (REPO / "docs" / "sweeps.md").read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    sweep = parse_sweep(__import__("tomllib").loads(example), "docs/sweeps.md")
    assert len(sweep.cells()) == int(re.search(r"expands into (\d+) cells", text).group(1))
    shared_path("cifar10", "cifar10-jpeg.zip")
    shared_path("models", "akamaster-resnet-cifar10", "resnet20-12fca82f.th")
    # the example's paths are relative to the main checkout; the shared data may be elsewhere (TTA_SHARED_DATA)
    located = parse_sweep(__import__("tomllib").loads(example.replace("../shared/data", str(SHARED_DATA))))
    cell = next(c for c in located.cells() if c.method == "tent")
    trimmed = type(cell)(**{**cell.to_dict(), "data": {**cell.data, "corruptions": ["fog"]},
                            "settings": {**cell.settings, "n_images": 20}})
    threads = torch.get_num_threads()
    records = run_cell(trimmed, threads=1)
    torch.set_num_threads(threads)
    assert [r["domain"] for r in records] == [f"fog-{trimmed.severity}"] and records[0]["cell"] == trimmed.key
    assert records[0]["n"] == 20 and records[0]["options"]["lr"] == 0.0001


def test_a_domains_cell_runs_as_tta_domains_does(tmp_path):
    from eval.demo import digits_cnn
    from tests.test_eval_cli import _image_folder

    for name, shift in (("photo", 0), ("sketch", 40)):
        _image_folder(tmp_path / "pacs" / name, shift)
    torch.manual_seed(0)
    torch.save(digits_cnn(num_classes=2).state_dict(), tmp_path / "cnn2.pt")  # the data has classes 0 and 1
    text = f"""
batch_sizes = [8]
[methods]
norm = {{}}
[[models]]
name = "cnn2"
arch = "eval.demo:digits_cnn"
weights = "{tmp_path / 'cnn2.pt'}"
input_mean = [0, 0, 0]
input_std = [1, 1, 1]
num_classes = 2
[[data]]
name = "pacs"
path = "{tmp_path / 'pacs'}"
domains = ["sketch", "photo"]
"""
    (cell,) = load_sweep(write(tmp_path / "d.toml", text)).cells()
    assert cell.severity is None and cell.key == "model=cnn2|data=pacs|protocol=reset|batch_size=8|method=norm|seed=0"
    threads = torch.get_num_threads()
    try:
        records = run_cell(cell, threads=1, accel=ALL_ON)
        out = tmp_path / "ref"
        assert main(["domains", "--data", str(tmp_path / "pacs"), "--domains", "sketch,photo", "--methods", "norm",
                     "--arch", "eval.demo:digits_cnn", "--num-classes", "2", "--weights", str(tmp_path / "cnn2.pt"),
                     "--input-mean",
                     "0,0,0", "--input-std", "1,1,1", "--batch-size", "8", "--threads", "1",
                     "--no-progress", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert [r["domain"] for r in records] == ["sketch", "photo"]
    assert without_sweep_fields(records) == ResultsLog(out / "results.jsonl").read()
