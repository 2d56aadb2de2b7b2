"""``tta bench`` reports progress through every phase (a line per timed round and per memory row) and its default
is the short setting (5 repeats), the published one being ``--repeats 30``."""
from __future__ import annotations

import threading

import torch

from eval import bench
from eval.bench import BenchConfig
from eval.cli import build_parser


def test_time_rows_logs_a_line_per_round() -> None:
    rows = [bench.Row(name, "tta", torch.nn.Identity(), lambda x: x, None, {}) for name in ("plain", "a", "b")]
    lines: list[str] = []
    bench.time_rows(rows, [torch.zeros(2)], BenchConfig(repeats=3), {}, lines.append)
    assert [line.split(" in ")[0] for line in lines] == [f"timed round {r}/3: 3 rows" for r in (1, 2, 3)]


def test_memory_logs_each_row_and_runs_the_processes_side_by_side(monkeypatch) -> None:
    both_running = threading.Barrier(2, timeout=30)  # the first two probes pass only if they run at the same time
    calls: list[str] = []
    lock = threading.Lock()

    def probe(config: BenchConfig, name: str, server: bench.MemoryServer | None = None) -> dict:
        with lock:
            calls.append(name)
            first_two = len(calls) <= 2
        if first_two:
            both_running.wait()
        return {"peak_memory_mb": float(len(name)), "memory_method": "fake"}

    monkeypatch.setattr(bench, "probe_memory", probe)
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    records = {name: {"method": name, "error": None} for name in ("plain", "norm", "tent", "cafa")}
    records["cafa"]["error"] = "failed at set-up"
    lines: list[str] = []
    bench.measure_memory(BenchConfig(memory="subprocess"), records, lines.append)
    assert [records[n].get("peak_memory_mb") for n in ("plain", "norm", "tent", "cafa")] == [5.0, 4.0, 4.0, None]
    assert lines[0] == "memory: 3 rows, each in a fresh process (1 thread each)"
    assert {line.split(": ", 1)[1] for line in lines[1:]} == {"plain", "norm", "tent"}
    assert [line.split(":")[0] for line in lines[1:]] == ["memory 1/3", "memory 2/3", "memory 3/3"]
    lines.clear()
    bench.measure_memory(BenchConfig(memory="off"), records, lines.append)
    assert lines == []


def test_the_default_is_the_short_setting() -> None:
    args = build_parser(only="bench").parse_args(["bench"])
    assert args.repeats == BenchConfig().repeats == 5
