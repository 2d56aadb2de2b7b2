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


def _continual_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "eval.cli", "continual", "--method", "er", "--norm", "adab2n", "--seeds", "0,1,2",
            "--n-train", "300", "--n-test", "50", "--image-size", "8", "--width", "4", "--buffer", "20",
            "--eval-batch-size", "64", "--threads", "1", "--no-progress", "--out", str(out)]


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def test_sigkill_tta_continual_then_resume_gives_identical_results(tmp_path):
    """Killed three times inside training, `tta continual` resumes from its last finished experience:
    results.jsonl ends up byte-identical to an uninterrupted run's, nothing lost or repeated.

    Each kill waits until the run has written at least one new record (so the kill lands in training, not in
    the imports, whatever the machine's load), then a random 0-0.4 s more (about one experience), then SIGKILL."""
    reference = tmp_path / "reference"
    process = _run(_continual_command(reference))
    assert process.wait(timeout=600) == 0, process.stderr.read().decode()
    expected = (reference / "results.jsonl").read_bytes()
    assert len(expected.splitlines()) == 15  # 3 seeds x 5 experiences

    out = tmp_path / "killed"
    rng = random.Random(0)
    progress = []
    for _ in range(3):
        before = _lines(out / "results.jsonl")
        process = _run(_continual_command(out))
        deadline = time.monotonic() + 600
        while _lines(out / "results.jsonl") <= before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        assert process.poll() is None, "the run finished before it could be killed; make it longer"
        process.send_signal(signal.SIGKILL)
        process.wait()
        progress.append(_lines(out / "results.jsonl"))
    assert progress == sorted(progress) and progress[1] < 15  # each rerun went on from where the last one stopped
    process = _run(_continual_command(out))
    assert process.wait(timeout=600) == 0, process.stderr.read().decode()
    assert (out / "results.jsonl").read_bytes() == expected
    assert not (out / "checkpoints").exists()
