"""The default path is plain PyTorch: ``import tta``, ``tta.adapt()`` and adapting a large CPU batch change nothing
global in the process (import hooks, torch function modes, the allocator, compiled libraries).

Each case runs in a fresh interpreter, since what it checks is process-wide. A control case turns ``tta.accel`` on
in the same script and shows that the checks see the fast path when it is there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys
import torch
from torch.overrides import _get_current_function_mode_stack as mode_stack

meta_path_before = list(sys.meta_path)
modes_before = len(mode_stack())
import tta
from tests.tta_nets import conv_net

if sys.argv[1] == "accel":
    tta.accel.enable()
x = torch.rand(44, 3, 32, 32, generator=torch.Generator().manual_seed(0))
assert x.numel() >= 2**17  # the batch size from which the lean graph ran by default before tta 0.2
modes_during = []
for method in ("tent", "norm"):
    adapted = tta.adapt(conv_net(), method)
    adapted.model[1].register_forward_hook(lambda *_: modes_during.append(len(mode_stack())))
    for _ in range(2):
        adapted(x)
    adapted.release()
maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
print(json.dumps({
    # finders added by import
    "new_finders": [type(f).__module__ + "." + type(f).__name__ for f in sys.meta_path
                    if f not in meta_path_before],
    "modes_before": modes_before, "modes_during": sorted(set(modes_during)), "modes_after": len(mode_stack()),
    "accel_on": [piece for piece in tta.accel.PIECES if tta.accel.state()[piece]],
    "accel_modules": sorted(m for m in sys.modules if m.startswith("tta.accel.")),
    "libraries": sorted({line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/tta-" in line}),
    "cache_files": sorted(os.listdir(os.environ["TTA_CACHE_DIR"])) if os.path.isdir(os.environ["TTA_CACHE_DIR"])
    else [],
}))
"""


def _probe(mode: str, tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TTA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TTA_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_adapt_and_a_large_cpu_batch_change_nothing_global(tmp_path):
    probe = _probe("plain", tmp_path)
    assert probe["new_finders"] == []
    assert probe["modes_before"] == 0 and probe["modes_during"] == [0] and probe["modes_after"] == 0
    assert probe["accel_on"] == []
    assert probe["accel_modules"] == []  # no kernel, tensor-cache, allocator or lean-graph code even imported
    assert probe["libraries"] == [] and probe["cache_files"] == []  # nothing compiled, nothing loaded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_checks_see_the_fast_path_when_it_is_on(tmp_path):
    """The control: with tta.accel.enable() the same script sees the lean graph's mode during tent's forward, the
    fast path's modules, and (where a compiler exists) the libraries built into the cache and loaded."""
    probe = _probe("accel", tmp_path)
    assert probe["new_finders"] == []  # the fast path adds no import hooks either
    assert 1 in probe["modes_during"] and probe["modes_after"] == 0
    assert {"tta.accel.batch_norm", "tta.accel.lean_graph", "tta.accel.kernels"} <= set(probe["accel_modules"])
    if "kernels" in probe["accel_on"]:
        assert any(name.startswith("tta-kernels") for name in probe["libraries"])
        assert any(name.startswith("tta-kernels") for name in probe["cache_files"])
