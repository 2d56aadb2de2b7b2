"""Long continual streams (``rounds``): records carry their round, a run resumes across rounds to the same results
(after an exception, a lost checkpoint, or a SIGKILL), the report adds the error per round, and ``tta corruption``
records ``--rounds``, checks it on resume and refuses it for the reset-per-domain protocols.

Small and deterministic: a toy stream for the runner, the digits data for the command."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import streams
from eval.cli import main
from eval.records import ResultsLog
from eval.report import error_table, round_table, write_report
from tests.kill_hook import run_to_completion
from tests.test_eval_runner import _data, _errors, _Interrupt, _InterruptingStream, _run, _toy_corrupt
from tests.test_reliability_kill import _kill_then_resume


def _rounds_stream(rounds=3):
    """2 domains x ``rounds`` rounds, 6 batches of 8 per segment."""
    protocol = streams.make_protocol("continual", corruptions=["gaussian_noise", "contrast"], severity=3, batch_size=8,
                                     seed=0, rounds=rounds)
    return streams.make_stream(_data(), protocol, corrupt_fn=_toy_corrupt)


def test_records_carry_their_round_and_a_run_resumes_across_rounds(tmp_path):
    reference = tmp_path / "reference"
    _run(_rounds_stream(), reference)
    records = ResultsLog(reference / "results.jsonl").read()
    assert len(records) == 3 * 6  # source, norm, tent x 6 segments
    assert all(r["round"] == r["segment"] // 2 for r in records)
    assert [r["domain"] for r in records if r["method"] == "tent"] == [
        f"{c}-3/r{k}" for k in range(3) for c in ("gaussian_noise", "contrast")]
    assert [r["reset_before"] for r in records if r["method"] == "tent"] == [True] + [False] * 5  # one chain
    # tent's first round is the one-round stream's: rounds only append to it
    alone = tmp_path / "one-round"
    _run(_rounds_stream(rounds=1), alone)
    assert {k: v for k, v in _errors(reference).items() if k[1] < 2} == _errors(alone)
    # interrupted inside round 1 (segment 2, batch 3), then resumed: identical records
    interrupted = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        _run(_InterruptingStream(_rounds_stream(), 15), interrupted)
    assert len(ResultsLog(interrupted / "results.jsonl").read()) == 3 * 2
    _run(_rounds_stream(), interrupted)
    assert _errors(interrupted) == _errors(reference)
    # interrupted in round 2 with its checkpoints lost: the chain is replayed from round 0, to the same records
    replayed = tmp_path / "replayed"
    with pytest.raises(_Interrupt):
        _run(_InterruptingStream(_rounds_stream(), 27), replayed)
    for checkpoint in (replayed / "ckpt").glob("*.pt"):
        checkpoint.unlink()
    _run(_rounds_stream(), replayed)
    assert _errors(replayed) == _errors(reference)


def test_report_has_the_error_per_round_when_the_records_span_several_rounds(tmp_path):
    _run(_rounds_stream(), tmp_path)
    records = ResultsLog(tmp_path / "results.jsonl").read()
    table = round_table(records)
    assert table.rounds == [0, 1, 2] and table.per_round == 2 and table.methods == ["source", "norm", "tent"]
    for method in table.methods:
        for k in range(3):
            mine = [r["error"] for r in records if r["method"] == method and r["round"] == k]
            assert table.errors[method][k] == pytest.approx(sum(mine) / 2)
        assert table.change(method) == pytest.approx(table.errors[method][2] - table.errors[method][0])
    assert table.errors["source"][0] == table.errors["source"][2]  # no adaptation: every round alike
    assert error_table(records).by_round == table
    write_report(records, tmp_path, title="toy")
    markdown = (tmp_path / "results.md").read_text()
    assert "**error per round (protocol: continual)**" in markdown
    assert "| method | round 0 | round 1 | round 2 | last − first |" in markdown
    tent = 100 * table.errors["tent"][1]
    assert any(line.startswith("| tent |") and f"| {tent:.1f} |" in line for line in markdown.splitlines())
    assert (tmp_path / "results_continual_rounds.csv").read_text().splitlines()[0] == (
        "method,round,error,domains_finished,domains_per_round")
    # a round still running: its mean is marked, and the change waits for a complete round
    partial = round_table(records[:-1])  # tent's last segment missing
    assert not partial.complete("tent", 2) and partial.change("tent") == pytest.approx(
        table.errors["tent"][1] - table.errors["tent"][0])
    assert "* = mean over the round's finished domains only" in partial.to_markdown()
    # one round (or records written before rounds existed, without the field): no per-round table
    first = [{k: v for k, v in r.items() if k != "round"} for r in records if r["round"] == 0]
    assert round_table(first) is None and error_table(first).by_round is None
    (tmp_path / "one").mkdir()
    write_report(first, tmp_path / "one", title="toy")
    assert "error per round" not in (tmp_path / "one" / "results.md").read_text()


@pytest.fixture
def seeded_model(monkeypatch):
    """The digits CNN, seeded, as every method's source model (the command under test, not the model)."""
    import eval.corruption_benchmark as bench
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn()
    monkeypatch.setattr(bench, "model_factory", lambda config, m=None: bench._fresh_copy(model, config))


def _argv(out: Path, *extra: str) -> list[str]:
    return ["corruption", "--data", "digits", "--methods", "source,norm", "--corruptions", "gaussian_noise,contrast",
            "--batch-size", "32", "--n-images", "64", "--out", str(out), "--no-progress", "--random-weights",
            *extra]


def test_tta_corruption_rounds_are_recorded_checked_on_resume_and_refused_for_reset(tmp_path, capsys,
                                                                                   seeded_model):
    out = tmp_path / "run"
    argv = _argv(out, "--protocol", "continual", "--rounds", "2")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "error per round (protocol: continual)" in printed and "| round 0 | round 1 |" in printed
    assert json.loads((out / "config.json").read_text())["config"]["rounds"] == 2
    records = ResultsLog(out / "results.jsonl").read()
    assert sorted((r["method"], r["round"], r["corruption"]) for r in records) == sorted(
        (m, k, c) for m in ("source", "norm") for k in (0, 1) for c in ("gaussian_noise", "contrast"))
    assert "**error per round (protocol: continual)**" in (out / "results.md").read_text()
    # resumed: nothing redone; another number of rounds is another run
    assert main(argv) == 0
    assert len(ResultsLog(out / "results.jsonl").read()) == 8
    capsys.readouterr()
    assert main(_argv(out, "--protocol", "continual", "--rounds", "3")) == 2
    assert "different run (rounds differ)" in capsys.readouterr().err
    # a folder written before --rounds existed (no 'rounds' in config.json) resumes as one round, and only so
    one = tmp_path / "one"
    assert main(_argv(one, "--protocol", "continual")) == 0
    saved = json.loads((one / "config.json").read_text())
    del saved["config"]["rounds"]
    (one / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(_argv(one, "--protocol", "continual", "--rounds", "2")) == 2
    assert "different run (rounds differ)" in capsys.readouterr().err
    assert main(_argv(one, "--protocol", "continual")) == 0
    # the reset-per-domain protocols refuse rounds before anything is written
    for protocol in ("reset", "correlated"):
        refused = tmp_path / protocol
        assert main(_argv(refused, "--protocol", protocol, "--rounds", "2")) == 2
        err = capsys.readouterr().err
        assert f"rounds=2: a '{protocol}' protocol resets before every domain" in err and "continual kind" in err
        assert not refused.exists()


def test_tta_domains_takes_rounds_too():
    from eval.cli import build_parser
    from eval.corruption_cli import config_from_args

    args = build_parser(only="domains").parse_args(["domains", "--data", "pacs", "--protocol", "continual",
                                                    "--rounds", "4", "--methods", "source", "--out", "x"])
    assert config_from_args(args, domains=[]).rounds == 4


def test_sigkill_inside_a_later_round_then_resume_gives_identical_results(tmp_path):
    """eta and rdumb (reset every 5 steps, so resets fall inside round 1) over 2 domains x 2 rounds of 3 batches,
    killed in round 1 after a checkpoint and mid-record: the resumed results.jsonl is the uninterrupted one."""
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    weights = tmp_path / "digits_cnn.pt"
    torch.save(digits_cnn().state_dict(), weights)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "eval.cli", "corruption", "--data", "digits", "--arch", "eval.demo:digits_cnn",
                "--input-mean", "0.5,0.5,0.5", "--input-std", "0.5,0.5,0.5", "--weights", str(weights),
                "--methods", "eta,rdumb", "--set", "rdumb.reset_every=5", "--corruptions", "gaussian_noise,contrast",
                "--protocol", "continual", "--rounds", "2", "--batch-size", "16", "--n-images", "48",
                "--threads", "1", "--no-progress", "--out", str(out)]

    reference = tmp_path / "reference"
    run_to_completion(command(reference))
    expected = (reference / "results.jsonl").read_bytes()
    records = ResultsLog(reference / "results.jsonl").read()
    assert len(records) == 8 and [r["round"] for r in records] == [0, 0, 0, 0, 1, 1, 1, 1]
    out = tmp_path / "killed"
    # the 5th checkpoint is eta's after segment 2 (round 1) with its record unwritten; then rdumb's record of
    # segment 2 cut in half
    counts = _kill_then_resume(command(out), out, expected, ["checkpoint:5", "torn_record:2"])
    assert counts == [4, 5]
