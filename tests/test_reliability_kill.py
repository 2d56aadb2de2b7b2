"""Kill `tta corruption` with SIGKILL at random moments, several times, then rerun with the same --out: the final
results.jsonl is bitwise identical to an uninterrupted run's (no record lost, duplicated or half-written)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "digits_cnn.pt"
    torch.save(digits_cnn().state_dict(), path)
    return path


def _command(weights: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "eval.cli", "corruption", "--data", "digits", "--arch", "eval.demo:digits_cnn",
            "--input-mean", "0.5,0.5,0.5", "--input-std", "0.5,0.5,0.5", "--weights", str(weights),
            "--methods", "source,norm,tent", "--corruptions", "gaussian_noise,contrast,brightness,pixelate",
            "--severity", "5", "--protocol", "continual", "--batch-size", "16", "--n-images", "96",
            "--threads", "1", "--no-progress", "--out", str(out)]


def _run(command: list[str], timeout: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_at_random_moments_then_resume_gives_identical_results(weights, tmp_path):
    reference = tmp_path / "reference"
    process = _run(_command(weights, reference))
    start = time.monotonic()
    assert process.wait(timeout=600) == 0, process.stderr.read().decode()
    full_run = time.monotonic() - start
    expected = (reference / "results.jsonl").read_bytes()
    assert len(expected.splitlines()) == 12

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(8):
        process = _run(_command(weights, out))
        try:
            process.wait(timeout=rng.uniform(0.15, 0.45) * full_run)
            assert process.returncode == 0, process.stderr.read().decode()
            break  # finished before the kill
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
    process = _run(_command(weights, out))
    assert process.wait(timeout=600) == 0, process.stderr.read().decode()
    assert kills >= 2  # the run really was interrupted several times
    assert (out / "results.jsonl").read_bytes() == expected
    assert not list((out / "checkpoints").glob("*.pt"))
