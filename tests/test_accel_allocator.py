"""tta.accel.allocator: freed memory is kept (the tensor cache takes tensors of 1 MB and more), so re-allocating a
large freed buffer costs no page faults; ``TTA_MALLOC`` narrows it (``default`` and ``glibc`` are deprecated).

Each case runs in a fresh interpreter: the tensor cache is PyTorch's CPU allocator for the whole process, and a
page-fault count needs a process whose heap no earlier test has shaped.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free 200 MB in 8 tensors of 25 MB the way a backward pass frees its saved activations, six
# times; report the minor page faults of rounds 2 to 6. With "install", allocator.install() runs first (its
# warnings recorded); with "none", nothing is installed: glibc's own thresholds.
PROBE = """
import json, resource, sys, warnings, torch
from tta.accel import allocator
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    installed = allocator.install() if sys.argv[1] == "install" else None
def round_trip():
    tensors = [torch.ones(25 * 2**20 // 4) for _ in range(8)]
    del tensors
round_trip()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_trip()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"installed": installed, "applied": allocator.settings(), "faults": faults,
                  "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""

CACHE_SETTINGS = {"tensor_cache_threshold": 2**20, "tensor_cache_max_ratio": 2.0}


def _probe(mode: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if k != "TTA_MALLOC"}, "PYTHONPATH": str(ROOT),
                               **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="the page-fault figures are glibc Linux's")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _probe("none"), _probe("install")
    assert default["applied"] is None
    assert retained["applied"] == CACHE_SETTINGS and retained["warnings"] == []
    # 200 MB is ~51,000 pages: glibc's defaults return the freed memory, so the second round faults them in again
    # (later rounds vary with glibc's adaptive thresholds). The tensor cache gives each tensor its block back; in a
    # round of ten or so a single 25 MB tensor (6,400 pages) may still land in fresh pages, never more.
    assert default["faults"][0] > 25_000
    assert statistics.median(retained["faults"]) < 1_000
    assert max(retained["faults"]) <= 6_400 + 1_000


@pytest.mark.parametrize("mode", ["default", "glibc"])
def test_the_deprecated_tta_malloc_values_warn_and_keep_the_tensor_cache_off(mode):
    probe = _probe("install", TTA_MALLOC=mode)
    assert probe["applied"] is None
    assert probe["installed"] == {"tensor_cache": False, "notes": {"tensor_cache": f"TTA_MALLOC={mode}"}}
    assert len(probe["warnings"]) == 1
    assert probe["warnings"][0].startswith(f"FutureWarning: TTA_MALLOC={mode} is deprecated")
    assert "--accel-without tensor_cache" in probe["warnings"][0]
    if GLIBC_LINUX:  # glibc's own thresholds: the freed 200 MB go back to the system and are faulted in again
        assert probe["faults"][0] > 25_000


def test_an_unknown_tta_malloc_is_refused():
    code = "import tta; tta.accel.enable()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TTA_MALLOC": "jemalloc"})
    assert done.returncode != 0 and "TTA_MALLOC='jemalloc': choose retain" in done.stderr


def test_idempotent_and_reported():
    code = ("import json, tta; from tta.accel import allocator; allocator.install(); a = allocator.settings(); "
            "allocator.install(); b = allocator.settings(); state = tta.accel.enable(); "
            "print(json.dumps([a == b, allocator.settings() == a, state['tensor_cache'] == (a is not None)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [True, True, True]


def test_the_deprecated_alias_warns_and_installs_the_tensor_cache_only():
    code = ("import json, warnings, tta; from tta.accel import allocator\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    applied = tta.retain_freed_memory()\n"
            "state = tta.accel.state()\n"
            "print(json.dumps([[str(w.category.__name__) for w in caught], str(caught[0].message), "
            "applied == allocator.settings(), state['kernels'], state['lean_graph'], state['batch_norm']]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    categories, message, same, *others = json.loads(done.stdout.strip().splitlines()[-1])
    assert categories == ["FutureWarning"] and "tta.accel.enable()" in message
    assert same and others == [False, False, False]
