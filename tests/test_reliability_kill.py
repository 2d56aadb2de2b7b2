"""Kill `tta corruption` and `tta continual` with SIGKILL at each risky point of a run (after a checkpoint and
before its record, after a record, halfway through writing a record), then rerun the same command: the final
results.jsonl is bitwise identical to an uninterrupted run's (no record lost, duplicated or half-written).

The kills land at points the runs count themselves (``TTA_KILL_AT``, :mod:`eval.kill_points`), never after a
timer, so the test does not depend on the machine's speed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.kill_points import POINTS, reached
from eval.records import ResultsLog
from tests.kill_hook import environment, run_killed_at, run_to_completion

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "digits_cnn.pt"
    torch.save(digits_cnn().state_dict(), path)
    return path


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _ends_torn(path: Path) -> bool:
    data = path.read_bytes()
    return bool(data) and not data.endswith(b"\n")


def _kill_then_resume(command: list[str], out: Path, expected: bytes, schedule: list[str]) -> list[int]:
    """Run ``command`` once per kill point of ``schedule``, each run killed there, then once to the end; check
    that the records grew at each kill and that the final file is ``expected``. Returns the line counts."""
    results = out / "results.jsonl"
    counts = []
    for kill_at in schedule:
        before = len(ResultsLog(results).read())
        run_killed_at(command, kill_at)
        after = len(ResultsLog(results).read())
        assert after > before or kill_at.startswith("checkpoint"), (kill_at, before, after)
        if kill_at.startswith("torn_record"):
            assert _ends_torn(results)  # the kill really cut a record in half
        counts.append(after)
    assert counts[-1] < len(expected.splitlines())  # the last kill still left work to do
    run_to_completion(command)
    assert results.read_bytes() == expected
    return counts


def _corruption_command(weights: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "eval.cli", "corruption", "--data", "digits", "--arch", "eval.demo:digits_cnn",
            "--input-mean", "0.5,0.5,0.5", "--input-std", "0.5,0.5,0.5", "--weights", str(weights),
            "--methods", "source,norm,tent", "--corruptions", "gaussian_noise,contrast,brightness,pixelate",
            "--severity", "5", "--protocol", "continual", "--batch-size", "16", "--n-images", "96",
            "--threads", "1", "--no-progress", "--out", str(out)]


def test_sigkill_tta_corruption_at_each_point_then_resume_gives_identical_results(weights, tmp_path):
    reference = tmp_path / "reference"
    run_to_completion(_corruption_command(weights, reference))
    expected = (reference / "results.jsonl").read_bytes()
    assert len(expected.splitlines()) == 12  # 3 methods x 4 corruptions

    out = tmp_path / "killed"
    # a record, then a checkpoint whose record is never written, then a half-written record, then a record again
    counts = _kill_then_resume(_corruption_command(weights, out), out, expected,
                               ["record:2", "checkpoint:3", "torn_record:2", "record:3"])
    assert counts == [2, 4, 5, 8]
    assert not list((out / "checkpoints").glob("*.pt"))


def _continual_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "eval.cli", "continual", "--method", "er", "--norm", "adab2n", "--seeds", "0,1,2",
            "--n-train", "300", "--n-test", "50", "--image-size", "8", "--width", "4", "--buffer", "20",
            "--eval-batch-size", "64", "--threads", "1", "--no-progress", "--out", str(out)]


def test_sigkill_tta_continual_at_each_point_then_resume_gives_identical_results(tmp_path):
    """Killed inside training at each point, `tta continual` resumes from its last checkpointed experience (a
    record that only reached the checkpoint is appended on resume): results.jsonl ends up byte-identical to an
    uninterrupted run's, nothing lost or repeated."""
    reference = tmp_path / "reference"
    run_to_completion(_continual_command(reference))
    expected = (reference / "results.jsonl").read_bytes()
    records = ResultsLog(reference / "results.jsonl").read()
    # 3 seeds x (5 experiences, then the seed's summary record: summary.json's per-seed metrics)
    assert [r.get("experience", r["kind"]) for r in records] == [0, 1, 2, 3, 4, "summary"] * 3
    per_seed = json.loads((reference / "summary.json").read_text())["per_seed"]
    assert {str(r["seed"]): r["metrics"] for r in records if r["kind"] == "summary"} == per_seed

    out = tmp_path / "killed"
    counts = _kill_then_resume(_continual_command(out), out, expected,
                               ["record:2", "record:3", "checkpoint:5", "torn_record:1", "torn_record:3"])
    # seed 0: 2 records, then 3 more, killed between its last experience record and its summary (5); the next run
    # appends the summary (6), four records of seed 1 and only checkpoints the fifth (10); the next appends that
    # record from the checkpoint (11) and tears seed 1's summary; the last killed run appends the summary (12), seed
    # 2's first record (13) and tears its second; the run to the end writes every summary once
    assert counts == [2, 5, 10, 11, 13]
    assert not (out / "checkpoints").exists()


# ------------------------------------------------------------------------------------------- the hook itself
def _append_in_child(path: Path, kill_at: str | None, n: int) -> subprocess.CompletedProcess:
    code = ("import sys; from eval.records import ResultsLog\n"
            f"log = ResultsLog({str(path)!r})\n"
            f"for i in range({n}): log.append({{'i': i, 'pad': 'x' * 40}}, kill_points_here=True)\n"
            "log.append({'timing': 1})  # not a result record: never a kill point\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment(kill_at), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("kill_at, whole, torn", [("record:2", 2, False), ("torn_record:3", 2, True),
                                                  ("torn_record:1", 0, True)])
def test_kill_points_land_exactly_where_named(tmp_path, kill_at, whole, torn):
    path = tmp_path / "results.jsonl"
    done = _append_in_child(path, kill_at, 5)
    assert done.returncode == -9, done.stderr
    assert [r["i"] for r in ResultsLog(path).read()] == list(range(whole))
    assert _ends_torn(path) == torn
    ResultsLog(path).append({"i": "next"})  # the next append cuts the torn line first
    assert [r["i"] for r in ResultsLog(path).read()] == [*range(whole), "next"]


def test_without_the_variable_nothing_happens_and_bad_values_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("TTA_KILL_AT", raising=False)
    done = _append_in_child(tmp_path / "results.jsonl", None, 3)
    assert done.returncode == 0 and len(ResultsLog(tmp_path / "results.jsonl").read()) == 4
    for bad in ["record", "record:0", "record:x", "elsewhere:1", "record:1;checkpoint:2"]:
        monkeypatch.setenv("TTA_KILL_AT", bad)
        with pytest.raises(ValueError, match="POINT:K"):
            reached("record")
    with pytest.raises(ValueError, match="unknown kill point"):
        reached("nowhere")
    assert POINTS == ("checkpoint", "record", "torn_record")
