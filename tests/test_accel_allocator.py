"""tta.accel.allocator: freed memory is kept (the tensor cache for large tensors, glibc's heap for the rest), so
re-allocating a large freed buffer costs no page faults.

Each case runs in a fresh interpreter: malloc settings are process-wide and cannot be undone.
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

# Allocate, touch and free 200 MB in 8 tensors of 25 MB (under the 32 MB mmap threshold) the way a backward pass
# frees its saved activations, six times; report the minor page faults of rounds 2 to 6.
PROBE = """
import json, resource, sys, torch
from tta.accel import allocator
applied = allocator.install() and allocator.settings() if sys.argv[1] == "retain" else None
def round_trip():
    tensors = [torch.ones(25 * 2**20 // 4) for _ in range(8)]
    del tensors
round_trip()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_trip()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


GLIBC_SETTINGS = {"mmap_threshold": 32 * 2**20, "trim_threshold": 2**31 - 1, "top_pad": 64 * 2**20}


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc malloc settings apply on glibc Linux only")
@pytest.mark.parametrize("mode", ["retain", "glibc"])
def test_retained_memory_is_reused_without_page_faults(mode):
    default, retained = _probe("default"), _probe("retain", TTA_MALLOC=mode)
    assert default["applied"] is None
    cache = {"tensor_cache_threshold": 2**20, "tensor_cache_max_ratio": 2.0} if mode == "retain" else {}
    assert retained["applied"] == GLIBC_SETTINGS | cache
    # 200 MB is ~51,000 pages: glibc's defaults return the freed memory, so the second round faults them in again
    # (later rounds vary with glibc's adaptive thresholds). Retained, a round reuses the same pages: in glibc's
    # heap, in one round of ten or so a single 25 MB tensor (6,400 pages) still lands in fresh pages, never more;
    # the tensor cache gives each tensor its block back.
    assert default["faults"][0] > 25_000
    assert statistics.median(retained["faults"]) < 1_000
    assert max(retained["faults"]) <= 6_400 + 1_000


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc malloc settings apply on glibc Linux only")
def test_tta_malloc_default_turns_it_off():
    probe = _probe("retain", TTA_MALLOC="default")
    assert probe["applied"] is None
    assert probe["faults"][0] > 25_000


def test_an_unknown_tta_malloc_is_refused():
    code = "import tta; tta.accel.enable()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TTA_MALLOC": "jemalloc"})
    assert done.returncode != 0 and "TTA_MALLOC='jemalloc': choose retain" in done.stderr


def test_idempotent_and_reported():
    code = ("import json, tta; from tta.accel import allocator; allocator.install(); a = allocator.settings(); "
            "allocator.install(); b = allocator.settings(); state = tta.accel.enable(); "
            "print(json.dumps([a == b, allocator.settings() == a, state['malloc']]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [True, True, GLIBC_LINUX]


def test_the_deprecated_alias_warns_and_installs_the_allocator_pieces_only():
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
