"""Unsafe or broken files: a checkpoint carrying code is refused without running it; truncated files are named."""
from __future__ import annotations

import os

import pytest
import torch

import tta
from eval.models import load_checkpoint, load_model


class _Payload:
    """Unpickling this runs os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="evil.th.*weights_only=True.*never executed"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="evil.th"):
        load_model("cifar10_resnet20", path)
    assert not marker.exists()


def test_truncated_and_garbage_checkpoints_name_the_file(tmp_path, resnet20_weights):
    truncated = tmp_path / "truncated.th"
    truncated.write_bytes(resnet20_weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.th"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.th"):
        load_checkpoint(tmp_path / "missing.th")
    stats = tmp_path / "stats.pt"
    torch.save({"means": _Payload(tmp_path / "pwned2")}, stats)
    with pytest.raises(ValueError, match="stats.pt"):
        tta.SourceStats.load(stats)
    assert not (tmp_path / "pwned2").exists()
