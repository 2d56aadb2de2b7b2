"""tta.accel.tensor_cache: the caching CPU allocator reuses freed blocks by size, stays within its bound, gives pages
back on release, reports to the profiler, and survives threads and fork.

The allocator is process-wide, so each scenario runs in a fresh interpreter (one per test module, see ``probe``)
and reports its counters as JSON; the tests compare them with values computed by hand. MiB = 2**20 bytes; a float32
tensor of n elements asks for 4n bytes, and gets a block of its size class: rounded up to whole 4096-byte pages and
to an eighth of the request's power of two (2 MiB - 4 bytes -> 2 MiB; 25 MiB -> 26 MiB, in steps of 2 MiB).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
needs_linux_cxx = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (shutil.which("c++") or shutil.which("g++")),
    reason="the tensor cache is built with a C++ compiler on Linux")

SCENARIOS = r"""
import json, os, threading, torch
torch.set_num_threads(1)  # the forked child must not start an OpenMP pool its parent already has
from tta.accel import tensor_cache as tc
MIB = 2**20
out = {}

def delta(before):
    now = tc.counters()
    return {k: now[k] - before[k] for k in ("blocks_mapped", "blocks_unmapped", "reuses")}

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

out["installed"] = tc.install(threshold_bytes=MIB, max_cached_ratio=2.0) and tc.installed()

# reuse: the same size, and a size within the same pages, get the freed block back
a = torch.empty(MIB // 2)  # 2 MiB
pointer = a.data_ptr()
before = tc.counters()
del a
b = torch.empty(MIB // 2 - 1)  # 2 MiB - 4 bytes: the same size class
out["same_block"] = b.data_ptr() == pointer
out["reuse"] = delta(before)
del b

# a small tensor is left to PyTorch's default CPU allocator
before = tc.counters()
small = torch.empty(1000)
out["small"] = delta(before)
del small

# a new size class maps a new block, the free one stays cached within the bound (ratio 2)
tc.release()
before = tc.counters()
c = torch.empty(MIB)  # 4 MiB live
del c                 # 4 MiB cached
d = torch.empty(MIB // 2)  # 2 MiB: no free block of that size; 0 + 4 + 2 <= 2 * peak
out["kept"] = delta(before) | {"cached_mb": tc.counters()["cached_bytes"] / MIB}
del d

# ratio 1: mapped memory may not exceed the most live bytes ever held, so the free blocks go first
tc.release()
peak = tc.counters()["peak_live_bytes"]
tc.install(threshold_bytes=MIB, max_cached_ratio=1.0)
big = torch.empty(peak // 4 // 2)  # half the peak: live + cached stays under the peak
del big
before = tc.counters()
other = torch.empty(peak // 4 // 2 + MIB)  # another size: half the peak + 4 MiB with the cached half > peak
out["evicted"] = delta(before) | {"cached_mb": tc.counters()["cached_bytes"] / MIB}
del other
tc.install(threshold_bytes=MIB, max_cached_ratio=2.0)

# release gives the pages back: 200 MB touched and freed stays resident until release()
tc.release()
start = rss_mb()
tensors = [torch.ones(25 * MIB // 4) for _ in range(8)]
del tensors
out["rss_kept_mb"] = rss_mb() - start
out["released_mb"] = tc.release() / MIB
out["rss_after_release_mb"] = rss_mb() - start

# the profiler sees every allocation: 3 MiB and 5 MiB alive together, then 1 MiB after the 3 MiB is freed
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    x = torch.empty(3 * MIB // 4); y = torch.empty(5 * MIB // 4); del x; z = torch.empty(MIB // 4); del y, z
cpu = torch._C._autograd.DeviceType.CPU
held = peak_seen = 0
for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and e.device_type() == cpu):
    held += n; peak_seen = max(peak_seen, held)
out["profiler_peak_mb"] = peak_seen / MIB
out["profiler_final_bytes"] = held

# four threads allocating and freeing sizes of 1-8 MiB: every block comes back
tc.release()
live_before = tc.counters()["live_bytes"]
def churn(seed):
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for _ in range(200):
        kept.append(torch.empty(int(torch.randint(MIB // 4, 2 * MIB, (1,), generator=generator))))
        if len(kept) > 3:
            kept.pop(int(torch.randint(0, len(kept), (1,), generator=generator)))
threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
after = tc.counters()
out["threads"] = {"live_delta": after["live_bytes"] - live_before,
                  "mapped_minus_unmapped_is_cached": after["blocks_mapped"] - after["blocks_unmapped"] >= 0}

# fork: a child allocates from the inherited cache while the parent holds blocks
held_block = torch.ones(MIB)
pid = os.fork()
if pid == 0:
    try:
        child = torch.ones(MIB) + torch.ones(MIB)
        os._exit(0 if float(child[0]) == 2.0 else 1)
    except BaseException:
        os._exit(2)
out["fork_child_status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

# tent on a small network, fixed shapes: after the first two batches every large tensor reuses a block (2 MiB maps)
import tta
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                          torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
adapted = tta.adapt(net, "tent")
batch = torch.rand(32, 3, 32, 32)
for _ in range(2):
    adapted(batch)
before = tc.counters()
for _ in range(3):
    adapted(batch)
out["tent_steady"] = delta(before)
del adapted, net, batch

# uninstall: new tensors are the default allocator's again; a cached-allocator tensor freed afterwards is still handled
before = tc.counters()
out["uninstalled"] = tc.uninstall() and not tc.installed()
later = torch.empty(MIB)
del held_block, later
out["after_uninstall"] = delta(before) | {"live_bytes": tc.counters()["live_bytes"]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    done = subprocess.run([sys.executable, "-c", SCENARIOS], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_linux_cxx
def test_freed_block_is_reused_by_the_same_size_class(probe):
    assert probe["installed"]
    assert probe["same_block"]
    assert probe["reuse"] == {"blocks_mapped": 0, "blocks_unmapped": 0, "reuses": 1}


@needs_linux_cxx
def test_small_tensors_are_left_to_the_default_allocator(probe):
    assert probe["small"] == {"blocks_mapped": 0, "blocks_unmapped": 0, "reuses": 0}


@needs_linux_cxx
def test_free_blocks_are_kept_within_the_bound_and_unmapped_beyond_it(probe):
    # ratio 2: a 4 MiB free block stays cached when a 2 MiB tensor maps its own block
    assert probe["kept"] == {"blocks_mapped": 2, "blocks_unmapped": 0, "reuses": 0, "cached_mb": 4.0}
    # ratio 1: the cached half of the peak plus a new (half + 4 MiB) block would exceed the peak: it is unmapped
    assert probe["evicted"] == {"blocks_mapped": 1, "blocks_unmapped": 1, "reuses": 0, "cached_mb": 0.0}


@needs_linux_cxx
def test_release_gives_the_pages_back(probe):
    assert probe["rss_kept_mb"] > 190  # 8 x 25 MiB touched and freed: still resident, ready for reuse
    assert probe["released_mb"] == pytest.approx(8 * 26.0)  # blocks of the 26 MiB class; 25 MiB of each touched
    assert probe["rss_after_release_mb"] < 10


@needs_linux_cxx
def test_profiler_sees_the_cached_allocations(probe):
    assert probe["profiler_peak_mb"] == pytest.approx(8.0)  # 3 + 5 MiB at once; 1 + 5 later
    assert probe["profiler_final_bytes"] == 0


@needs_linux_cxx
def test_threads_return_every_block(probe):
    assert probe["threads"] == {"live_delta": 0, "mapped_minus_unmapped_is_cached": True}


@needs_linux_cxx
def test_a_forked_child_allocates(probe):
    assert probe["fork_child_status"] == 0


@needs_linux_cxx
def test_a_repeated_tent_step_reuses_its_blocks(probe):
    """No block mapped or unmapped in three steady steps (no page faults); each step reuses its 2 MiB maps."""
    steady = probe["tent_steady"]
    assert steady["blocks_mapped"] == 0 and steady["blocks_unmapped"] == 0
    assert steady["reuses"] >= 3 * 4  # at least the two convolutions' outputs and the two BatchNorm outputs


@needs_linux_cxx
def test_uninstall_restores_the_default_allocator_and_still_takes_back_its_blocks(probe):
    assert probe["uninstalled"]
    # the 4 MiB tensor allocated after uninstall is the default allocator's; the one from before goes back to the cache
    assert probe["after_uninstall"]["blocks_mapped"] == 0
    assert probe["after_uninstall"]["live_bytes"] == 0


def test_bad_settings_are_refused():
    from tta.accel import tensor_cache
    with pytest.raises(ValueError, match="threshold_bytes"):
        tensor_cache.install(threshold_bytes=0)
    with pytest.raises(ValueError, match="max_cached_ratio"):
        tensor_cache.install(max_cached_ratio=0.5)


def test_without_a_compiler_nothing_changes(tmp_path):
    code = ("import json; from tta.accel import tensor_cache as tc; "
            "print(json.dumps([tc.install(), tc.installed(), tc.status()['detail'], tc.release()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CXX": shutil.which("false") or "/bin/false",
                               "TTA_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    installed, active, detail, released = json.loads(done.stdout.strip().splitlines()[-1])
    assert not installed and not active and released == 0
    assert detail.startswith("build failed") or detail.startswith("Linux only")
