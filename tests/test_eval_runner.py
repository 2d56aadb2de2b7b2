"""The runner: records, resume after interruption (bitwise-equal results), checkpoints, replay; reports."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import streams
import tta
from eval.records import ResultsLog, replace_atomically, write_json_atomic
from eval.report import error_table, write_report
from eval.runner import MethodRun, run_methods
from streams.image_dataset import ImageDataset
from tests.tta_nets import conv_net


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n) % 4, ["a", "b", "c", "d"], "toy")


def _stream(kind="reset", corruptions=("gaussian_noise", "contrast", "brightness")):
    protocol = streams.make_protocol(kind, corruptions=list(corruptions), severity=3, batch_size=8, seed=0)
    return streams.make_stream(_data(), protocol, corrupt_fn=_toy_corrupt)


def _toy_corrupt(x, corruption, severity, seed=0, **_):
    """Cheap deterministic stand-in for streams.corrupt (the runner, not the corruptions, is under test)."""
    g = torch.Generator().manual_seed(seed)
    shift = {"gaussian_noise": 0.2, "contrast": -0.3, "brightness": 0.4}[corruption]
    return (x + shift + 0.1 * severity * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _runs():
    return [MethodRun(m, lambda m=m: tta.adapt(conv_net(), m, lr=0.05) if m == "tent" else tta.adapt(conv_net(), m))
            for m in ("source", "norm", "tent")]


class _Interrupt(Exception):
    pass


class _InterruptingStream:
    """Delegates to a stream but raises after ``after`` batches in total (a crash in the middle of a segment)."""

    def __init__(self, stream, after):
        self._stream, self._left = stream, after

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def batches(self, segment):
        for batch in self._stream.batches(segment):
            if self._left == 0:
                raise _Interrupt
            self._left -= 1
            yield batch


def _run(stream, path, progress=False):
    return run_methods(_runs(), stream, ResultsLog(path / "results.jsonl"), context={"protocol": stream.protocol.kind},
                       checkpoint_dir=path / "ckpt", progress=progress)


def _errors(path):
    return {(r["method"], r["segment"]): (r["error"], r["ece"], r["online_error"])
            for r in ResultsLog(path / "results.jsonl").read()}


@pytest.mark.parametrize("kind", ["reset", "continual"])
@pytest.mark.parametrize("after", [3, 9, 14])
def test_interrupted_runs_resume_to_identical_results(tmp_path, kind, after):
    reference = tmp_path / "reference"
    _run(_stream(kind), reference)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        _run(_InterruptingStream(_stream(kind), after), interrupted)
    finished_before = len(ResultsLog(interrupted / "results.jsonl").read())
    assert finished_before == 3 * (after // 6)  # 6 batches per segment: finished segments were recorded at once
    written = _run(_stream(kind), interrupted)
    assert len(written) == 9 - finished_before  # nothing redone, nothing lost
    assert _errors(interrupted) == _errors(reference)
    records = ResultsLog(interrupted / "results.jsonl").read()
    assert len(records) == len({(r["method"], r["segment"]) for r in records}) == 9  # no duplicates
    assert not any((interrupted / "ckpt").glob("*.pt"))  # checkpoints are removed once a run completes


def test_a_finished_run_removes_checkpoints_left_by_a_kill_after_its_last_record(tmp_path):
    _run(_stream("continual"), tmp_path)
    leftovers = [tmp_path / "ckpt" / "tent.pt", tmp_path / "ckpt" / ".tent.pt.k3j9.tmp"]
    for path in leftovers:
        path.write_bytes(b"stale")
    assert _run(_stream("continual"), tmp_path) == []  # nothing to redo
    assert not any(path.exists() for path in leftovers)


def test_continual_chain_is_replayed_when_its_checkpoint_is_lost(tmp_path):
    reference = tmp_path / "reference"
    _run(_stream("continual"), reference)
    run_dir = tmp_path / "run"
    with pytest.raises(_Interrupt):
        _run(_InterruptingStream(_stream("continual"), 8), run_dir)
    for checkpoint in (run_dir / "ckpt").glob("*.pt"):
        checkpoint.unlink()
    _run(_stream("continual"), run_dir)
    assert _errors(run_dir) == _errors(reference)


def test_continual_differs_from_reset_for_tent_but_not_for_norm(tmp_path):
    _run(_stream("reset"), tmp_path / "r")
    _run(_stream("continual"), tmp_path / "c")
    reset, continual = _errors(tmp_path / "r"), _errors(tmp_path / "c")
    assert reset[("norm", 2)] == continual[("norm", 2)]  # nothing to carry over
    assert reset[("tent", 2)][1] != continual[("tent", 2)][1]  # tent carries its parameters across domains (ECE)


def test_results_log_ignores_and_repairs_a_half_written_last_line(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl")
    log.append({"a": 1})
    with open(log.path, "a") as f:
        f.write('{"a": 2, "b"')  # killed mid-write
    assert log.read() == [{"a": 1}]
    log.append({"a": 3})
    assert log.read() == [{"a": 1}, {"a": 3}]
    log.path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        log.read()


def test_atomic_replace_keeps_the_old_file_on_failure_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600

    def fail(handle):
        handle.write(b'{"half": ')
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        replace_atomically(path, fail)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_report_from_records_alone(tmp_path):
    _run(_stream("reset"), tmp_path)
    records = ResultsLog(tmp_path / "results.jsonl").read()
    table = error_table(records)
    assert table.methods == ["source", "norm", "tent"]
    assert table.columns == ["gaussian_noise-3", "contrast-3", "brightness-3"]
    for r in records:
        assert table.errors[r["method"]][r["domain"]] == r["error"]
    mean_norm = sum(table.errors["norm"].values()) / 3
    assert table.mean("norm") == pytest.approx(mean_norm)
    write_report(records, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert f"| norm | {100 * table.errors['norm']['gaussian_noise-3']:.1f} |" in md
    csv = (tmp_path / "results_reset.csv").read_text().splitlines()
    assert csv[0] == "method,gaussian_noise-3,contrast-3,brightness-3,mean" and len(csv) == 4
    for png in ("errors_reset.png", "online_reset.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixed_protocol_records_per_domain_errors(tmp_path):
    _run(_stream("mixed"), tmp_path)
    records = ResultsLog(tmp_path / "results.jsonl").read()
    assert len(records) == 3 and all(r["corruption"] == "mixed" for r in records)
    for r in records:
        per_domain = r["per_domain_error"]
        assert set(per_domain) == {"gaussian_noise-3", "contrast-3", "brightness-3"}
        assert sum(per_domain.values()) / 3 == pytest.approx(r["error"])  # equal-size domains


def test_gradual_protocol_columns_are_numbered_by_position(tmp_path):
    protocol = streams.make_protocol("gradual", corruptions=["gaussian_noise"], batch_size=16, seed=0)
    stream = streams.make_stream(_data(), protocol, corrupt_fn=_toy_corrupt)
    run_methods(_runs()[:2], stream, ResultsLog(tmp_path / "r.jsonl"), context={"protocol": "gradual"},
                checkpoint_dir=tmp_path / "ck", progress=False)
    table = error_table(ResultsLog(tmp_path / "r.jsonl").read())
    assert table.columns == ["gaussian_noise-1", "gaussian_noise-2", "gaussian_noise-3", "gaussian_noise-4",
                             "gaussian_noise-5", "gaussian_noise-4#2", "gaussian_noise-3#2", "gaussian_noise-2#2",
                             "gaussian_noise-1#2"]
    json.dumps(table.errors)


def test_guarded_rows_record_their_resets(tmp_path):
    stream = _stream("reset")
    runs = [MethodRun("tent+guard", lambda: tta.CollapseGuard(tta.adapt(conv_net(), "tent", lr=0.05), window=8,
                                                              min_entropy=0.99))]
    run_methods(runs, stream, ResultsLog(tmp_path / "r.jsonl"), context={"protocol": "reset"},
                checkpoint_dir=tmp_path / "ck", progress=False)
    records = ResultsLog(tmp_path / "r.jsonl").read()
    assert len(records) == 3 and all(r["guard_resets"] >= 1 for r in records)  # threshold 0.99: always resets
