"""`--deterministic` runs every method under torch.use_deterministic_algorithms without an error, and on CPU
gives the same results.jsonl bytes as a plain run (CPU runs are deterministic already)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(out: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "eval.cli", "corruption", "--data", "digits", "--arch", "eval.demo:digits_cnn",
               "--input-mean", "0.5,0.5,0.5", "--input-std", "0.5,0.5,0.5", "--methods",
               "source,norm,alpha_bn,core,cafa,tent", "--corruptions", "gaussian_noise,contrast", "--severity", "5",
               "--protocol", "continual", "--batch-size", "32", "--n-images", "96", "--source-images", "200",
               "--threads", "1", "--no-progress", "--random-weights", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_deterministic_flag_runs_every_method_and_changes_nothing_on_cpu(tmp_path):
    _run(tmp_path / "plain")
    _run(tmp_path / "deterministic", "--deterministic")
    plain = (tmp_path / "plain" / "results.jsonl").read_bytes()
    assert len(plain.splitlines()) == 12
    assert (tmp_path / "deterministic" / "results.jsonl").read_bytes() == plain
    assert '"deterministic": true' in (tmp_path / "deterministic" / "config.json").read_text()
