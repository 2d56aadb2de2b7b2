"""tta.accel.enable(): without a compiler it says so once and the plain path runs; pieces switch one by one."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tta
from tests.tta_nets import conv_net

ROOT = Path(__file__).resolve().parents[1]

NO_COMPILER = r"""
import json, warnings, torch, tta
from tests.tta_nets import conv_net
x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
plain = tta.adapt(conv_net(), "tent")(x)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = tta.accel.enable()
    second = tta.accel.enable()
fast = tta.adapt(conv_net(), "tent")(x)
print(json.dumps({"warnings": [f"{w.category.__name__}: {w.message}" for w in caught], "first": first,
                  "second": second, "notes": tta.accel.state()["notes"],
                  "difference": (fast - plain).abs().max().item()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tensor cache is Linux only")
def test_without_a_compiler_it_warns_once_and_runs_the_plain_path(tmp_path):
    false = shutil.which("false") or "/bin/false"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CC": false, "CXX": false, "TTA_CACHE_DIR": str(tmp_path)}
    env.pop("TTA_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", NO_COMPILER], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(probe["warnings"]) == 1, probe["warnings"]
    assert probe["warnings"][0].startswith("RuntimeWarning: tta.accel: C kernels not used (build failed")
    assert "tensor cache not used (build failed" in probe["warnings"][0]
    for state in (probe["first"], probe["second"]):
        assert not state["kernels"] and not state["tensor_cache"]
        assert state["batch_norm"] and state["lean_graph"]  # pure Python pieces: on, using PyTorch's ops
    assert probe["notes"]["kernels"].startswith("build failed")
    assert probe["difference"] < 1e-5  # the same predictions (to rounding) as the plain path


def test_pieces_switch_one_by_one_and_disable_returns_to_the_plain_path():
    try:
        on = tta.accel.enable(lean_graph=False, tensor_cache=False)
        assert on["batch_norm"] and not on["lean_graph"] and not on["tensor_cache"]
        x = torch.rand(4, 3, 8, 8)
        assert tta.accel.fast_batch_norm(x) is not None
        assert tta.accel.lean_graph_mode(torch.rand(44, 3, 32, 32)) is None
        assert tta.accel.fast_batch_norm(x.to("meta")) is None  # the fast path is for CPU tensors only
        tta.accel.enable(batch_norm=False, tensor_cache=False)
        assert tta.accel.fast_batch_norm(x) is None and tta.accel.lean_graph_mode(torch.rand(44, 3, 32, 32))
    finally:
        off = tta.accel.disable()
    assert not any(off[piece] for piece in ("kernels", "batch_norm", "lean_graph", "tensor_cache"))
    assert tta.accel.fast_batch_norm(x) is None and tta.accel.lean_graph_mode(torch.rand(44, 3, 32, 32)) is None
    with pytest.raises(ValueError, match="unknown accel piece 'kernel'"):
        tta.accel.is_on("kernel")


@pytest.mark.parametrize("malloc", [True, False])
def test_the_removed_malloc_piece_warns_and_is_ignored(malloc):
    try:
        with pytest.warns(FutureWarning, match=rf"enable\(malloc={malloc}\): the malloc piece of tta.accel was "):
            on = tta.accel.enable(kernels=False, lean_graph=False, tensor_cache=False, malloc=malloc)
        assert on == {"kernels": False, "batch_norm": True, "lean_graph": False, "tensor_cache": False}
        assert "malloc" not in tta.accel.state() and "malloc" not in tta.accel.PIECES
        with pytest.warns(FutureWarning, match="malloc piece of tta.accel was removed"):
            assert tta.accel.is_on("malloc") is False
    finally:
        tta.accel.disable()


def test_the_deprecated_module_paths_warn_and_still_work():
    for old in ("tta.cpu_memory", "tta.lean_graph", "tta.native", "tta.tensor_cache"):
        sys.modules.pop(old, None)
        with pytest.warns(FutureWarning, match=f"{old} moved to tta.accel"):
            module = __import__(old, fromlist=["_"])
        assert module.__name__ == old
    from tta.cpu_memory import malloc_settings
    assert malloc_settings() is None  # glibc's malloc is no longer configured
    from tta.lean_graph import AUTO_MIN_INPUT_ELEMENTS, LeanGraph
    assert AUTO_MIN_INPUT_ELEMENTS == tta.accel.LEAN_GRAPH_MIN_INPUT_ELEMENTS
    with torch.enable_grad(), LeanGraph():
        assert conv_net()(torch.rand(2, 3, 8, 8)).shape == (2, 4)
