"""The one-pass C statistics kernel against float64 hand computations, its conditioning flag, its threads, and the
fallbacks when it cannot be built."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tta
from tta.accel import channel_moments as native_moments
from tta.accel import kernels as native
from tta.accel.batch_norm import CONDITION_LIMIT, batch_statistics

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler on this machine: the kernel is not built (PyTorch ops used)")


def float64_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = x.mean(1)
    return mean, ((x - mean[:, None]) ** 2).mean(1)


@pytest.fixture(autouse=True)
def kernels_on():
    """The kernels of tta.accel on (the tensor cache stays off: it is process-wide)."""
    tta.accel.enable(tensor_cache=False)
    yield
    tta.accel.disable()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A clean cache directory and a forgotten library, restored afterwards."""
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path / "cache"))
    native._load.cache_clear()
    yield tmp_path
    native._load.cache_clear()


@needs_compiler
def test_kernel_is_built_where_a_compiler_exists():
    """CI has a compiler: the fast path must be in use there, not silently replaced by the fallback."""
    state = native_moments.status()
    assert state["available"], state["detail"]


@needs_compiler
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(8, 40), length=st.sampled_from([16, 17, 127, 129, 511, 512, 513, 1500]),
       channels_last=st.booleans(), bfloat16=st.booleans(), scale=st.floats(0.01, 100.0),
       shift=st.floats(-10.0, 10.0), seed=st.integers(0, 2 ** 16))
def test_moments_match_float64(n, c, length, channels_last, bfloat16, scale, shift, seed):
    """float32 and bfloat16 maps (the reference: float64 statistics of the very same values)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=generator) * scale + shift
    if bfloat16:
        x = x.bfloat16()
    if channels_last:  # the same values with the channels innermost in memory
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    if not channels_last and length < native_moments.MIN_ROW_LENGTH[x.dtype]:
        assert native_moments.layout(x) is None and native_moments.channel_moments(x, CONDITION_LIMIT) is None
        return
    assert native_moments.layout(x) == ("channels_last" if channels_last else "rows")
    mean, var, well_conditioned = native_moments.channel_moments(x, CONDITION_LIMIT)
    ref_mean, ref_var = float64_statistics(x)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (c,)
    expected_ok = bool((ref_mean ** 2 <= CONDITION_LIMIT * ref_var).all())
    if expected_ok:
        assert well_conditioned
    if well_conditioned:
        # float32 rounding of the sums (relative ~1e-6 at most) magnified by the cancellation, 1 + mean^2 / var
        magnification = 1 + float((ref_mean ** 2 / ref_var.clamp_min(1e-300)).max())
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6 * scale)
        torch.testing.assert_close(var.double(), ref_var, rtol=1e-6 * magnification, atol=1e-6 * scale ** 2)


@needs_compiler
@pytest.mark.parametrize("shape", [(64, 10), (5, 12, 1, 1), (3, 16, 4, 5, 6)])
def test_batchnorm1d_pooled_and_3d_channels_last_maps(shape):
    torch.manual_seed(2)
    x = torch.randn(shape) * 2 - 1
    if len(shape) == 5:
        x = x.to(memory_format=torch.channels_last_3d)
    assert native_moments.layout(x) == "channels_last"
    mean, var, ok = native_moments.channel_moments(x, CONDITION_LIMIT)
    ref_mean, ref_var = float64_statistics(x)
    assert ok
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ill_conditioned_and_non_finite_channels_are_flagged(channels_last, dtype):
    torch.manual_seed(0)
    good = torch.randn(8, 9, 128).to(dtype)

    def prepare(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else t

    _, _, ok = native_moments.channel_moments(prepare(good), CONDITION_LIMIT)
    assert ok
    for bad_value in (float("nan"), float("inf"), 1e20):  # 1e20 squared overflows float32
        x = good.clone()
        x[2, 1, 5] = bad_value
        assert not native_moments.channel_moments(prepare(x), CONDITION_LIMIT)[2]
    shifted = good.clone()
    shifted[:, 2] = shifted[:, 2] * 0.01 + 100.0  # mean^2 / var = 1e8
    assert not native_moments.channel_moments(prepare(shifted), CONDITION_LIMIT)[2]
    # ... and batch_statistics then answers with the Welford kernel, exactly enough (PyTorch's bfloat16 Welford
    # kernel is itself good to ~3e-3 on the other channels)
    _, var = batch_statistics(prepare(shifted).view(8, 9, 8, 16))
    ref_var = float64_statistics(shifted)[1]
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3 if dtype == torch.float32 else 1e-2, atol=1e-8)
    assert abs(var[2].item() - ref_var[2].item()) <= 1e-3 * ref_var[2].item() + 1e-8


@needs_compiler
@pytest.mark.parametrize("channels_last", [False, True])
def test_threads_split_the_work_with_the_same_results(monkeypatch, channels_last):
    torch.manual_seed(1)
    x = torch.randn(16, 10, 64, 64) * 2 + 0.5  # 655,360 elements: several threads' worth
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    one = native_moments.channel_moments(x, CONDITION_LIMIT)
    monkeypatch.setattr(native_moments, "ELEMENTS_PER_THREAD", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        four = native_moments.channel_moments(x, CONDITION_LIMIT)
    finally:
        torch.set_num_threads(previous)
    if channels_last:  # row ranges per thread: the same sums added in another order
        torch.testing.assert_close(one[0], four[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(one[1], four[1], rtol=1e-6, atol=1e-7)
    else:  # channel ranges per thread: each channel's sums are computed exactly as by one thread
        assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])
    assert one[2] == four[2]


def test_layouts_the_kernel_takes():
    assert native_moments.layout(torch.zeros(4, 3, 4, 4)) == "rows"
    assert native_moments.layout(torch.zeros(4, 3, 3, 3)) is None  # rows of 9 < MIN_ROW_LENGTH, 3 < MIN_CHANNELS
    assert native_moments.layout(torch.zeros(4, 8, 3, 3)) is None  # short rows, channels not innermost
    assert native_moments.layout(torch.zeros(4, 8, 3, 3).to(memory_format=torch.channels_last)) == "channels_last"
    assert native_moments.layout(torch.zeros(4, 8)) == "channels_last"  # BatchNorm1d on (N, C)
    assert native_moments.layout(torch.zeros(4, 3)) is None
    assert native_moments.layout(torch.zeros(4, 3, 4, 4, dtype=torch.float64)) is None
    assert native_moments.layout(torch.zeros(4, 3, 4, 4, dtype=torch.float16)) is None
    assert native_moments.layout(torch.zeros(4, 3, 16, 8, dtype=torch.bfloat16)) == "rows"
    assert native_moments.layout(torch.zeros(4, 3, 8, 8, dtype=torch.bfloat16)) is None  # PyTorch's is faster there
    assert native_moments.layout(torch.zeros(4, 8, 8, 8, dtype=torch.bfloat16).to(
        memory_format=torch.channels_last)) == "channels_last"
    assert native_moments.layout(torch.zeros(8, 4, 4, 4).transpose(0, 2)) is None  # neither layout
    assert native_moments.layout(torch.zeros(0, 3, 4, 4)) is None
    assert native_moments.channel_moments(torch.zeros(4, 3), CONDITION_LIMIT) is None


def test_disabled_by_environment_falls_back_to_pytorch(monkeypatch, fresh_build):
    monkeypatch.setenv("TTA_NATIVE", "0")
    assert native_moments.status() == {"available": False, "detail": "disabled (TTA_NATIVE=0)"}
    x = torch.randn(6, 4, 8, 8) * 3 + 1
    assert native_moments.channel_moments(x, CONDITION_LIMIT) is None
    mean, var = batch_statistics(x)
    ref_mean, ref_var = float64_statistics(x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)


def test_failed_build_is_reported_and_falls_back(monkeypatch, fresh_build):
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    state = native_moments.status()
    assert not state["available"] and state["detail"].startswith("build failed")
    x = torch.randn(6, 4, 8, 8)
    assert native_moments.channel_moments(x, CONDITION_LIMIT) is None
    torch.testing.assert_close(batch_statistics(x)[1].double(), float64_statistics(x)[1], rtol=1e-5, atol=1e-6)


@needs_compiler
def test_build_is_cached_and_survives_an_unwritable_cache(monkeypatch, fresh_build):
    state = native_moments.status()
    assert state["available"] and state["detail"].startswith(str(fresh_build / "cache"))
    native._load.cache_clear()
    assert native_moments.status()["detail"] == state["detail"]  # found, not rebuilt
    blocker = fresh_build / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("TTA_CACHE_DIR", str(blocker / "cache"))  # a directory below a file cannot be made
    native._load.cache_clear()
    state = native_moments.status()
    assert state["available"] and "tta-native-" in state["detail"]


@needs_compiler
def test_a_cached_library_without_the_entry_points_is_not_used(fresh_build, tmp_path):
    """A stale or foreign file at the cache path (here a library with other symbols) is skipped, not called."""
    compiler = native.find_compiler()
    stale = native._library_path(compiler, native.VARIANTS[0])
    stale.parent.mkdir(parents=True)
    source = tmp_path / "other.c"
    source.write_text("int something_else(void) { return 1; }\n")
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(stale)], check=True)
    state = native_moments.status()
    generic = native._library_path(compiler, native.VARIANTS[1])
    assert state["available"] and state["detail"] == str(generic)
    x = torch.randn(4, 3, 8, 8)
    mean, var, ok = native_moments.channel_moments(x, CONDITION_LIMIT)
    torch.testing.assert_close(var.double(), float64_statistics(x)[1], rtol=1e-5, atol=1e-6)
