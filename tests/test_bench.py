"""``tta bench``: pass counts by hooks, the reference-style implementations against ours, bench.json, errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import tta
from eval import bench
from eval.bench import BenchConfig, PassCounter, build_row, count_passes, quantile, row_names
from eval.bench_reference import ReferenceNorm, ReferenceTent
from eval.cli import main as tta_main
from tests.method_cases import option_names, source_options, trains
from tests.tta_nets import conv_net

torch.set_num_threads(1)


def _batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- passes per sample, counted with hooks --------------------------------------------------------------------------
def _single_pass_cases() -> list[tuple[str, int, tuple[float, float]]]:
    """Expected passes per sample from each method's declaration: a forward-only method one forward, a one-step
    gradient method ``steps`` forwards and backwards (multi-pass methods are counted by their own tests)."""
    cases = [("plain", 1, (1.0, 0.0)), ("norm (reference)", 1, (1.0, 0.0)), ("tent (reference)", 1, (1.0, 1.0))]
    for name in bench.default_methods():
        if not trains(name):
            cases.append((name, 1, (1.0, 0.0)))
        else:
            cases += [(name, steps, (float(steps), float(steps))) for steps in (1, 2)
                      if steps == 1 or "steps" in option_names(name)]
    return cases


@pytest.mark.parametrize("name, steps, expected", _single_pass_cases())
def test_pass_counts(name: str, steps: int, expected: tuple[float, float]) -> None:
    model = conv_net()
    method = name in tta.methods()
    options = {}
    if method:
        options = dict(tta.registry.method_class(name).select_all_options)
        options.update({"steps": steps} if "steps" in option_names(name) else {})
        options = {name: options}
    config = BenchConfig(method_options=options)
    row = build_row(name, model, config, source_options(name, model) if method else None)
    assert count_passes(row, _batch()) == expected


def test_pass_counter_counts_samples_not_calls() -> None:
    adapted = tta.adapt(conv_net(), "tent")
    counter = PassCounter(adapted.model)
    adapted(_batch(6))
    adapted(_batch(10))
    counter.remove()
    assert (counter.forward_samples, counter.backward_samples) == (16, 16)
    adapted(_batch(6))  # hooks removed: nothing more is counted
    assert counter.forward_samples == 16


# -- the reference-style implementations are faithful --------------------------------------------------------------
def _bn_affine(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
            for p in (m.weight, m.bias)]


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-2), ("sgd", 5e-2)])
def test_reference_tent_equals_ours(optimizer: str, lr: float) -> None:
    source = conv_net()
    ours = tta.adapt(copy.deepcopy(source), "tent", optimizer=optimizer, lr=lr)
    reference = ReferenceTent(copy.deepcopy(source), tta.method_options("tent")(optimizer=optimizer, lr=lr))
    before = _bn_affine(source)
    for seed in range(3):  # three steps: Adam's moments and SGD's momentum buffers are exercised
        x = _batch(seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x).detach(), rtol=1e-5, atol=1e-6)
    after_ours, after_reference = _bn_affine(ours.model), _bn_affine(reference.model)
    for a, b, c in zip(after_ours, after_reference, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, c)  # the step did change the parameters
    reference.reset()
    ours.reset()
    for a, b, c in zip(_bn_affine(ours.model), _bn_affine(reference.model), before):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_reference_tent_frozen_changes_cost_not_result() -> None:
    source = conv_net()
    loose, frozen = ReferenceTent(copy.deepcopy(source)), ReferenceTent(copy.deepcopy(source), freeze_other_params=True)
    x = _batch()
    torch.testing.assert_close(loose(x), frozen(x))
    assert loose.model[0].weight.grad is not None  # weight gradients computed and never used
    assert frozen.model[0].weight.grad is None
    for a, b in zip(_bn_affine(loose.model), _bn_affine(frozen.model)):
        torch.testing.assert_close(a, b)


def test_reference_norm_equals_ours_and_resets() -> None:
    source = conv_net()
    ours = tta.adapt(copy.deepcopy(source), "norm")
    reference = ReferenceNorm(copy.deepcopy(source))
    state = copy.deepcopy(source.state_dict())
    for seed in range(2):
        x = _batch(seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    assert not torch.equal(reference.model[1].running_mean, state["1.running_mean"])  # train-mode BN updates them
    reference.reset()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, state[key]), key


# -- bench.json from a tiny run -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--model", "cifar10_resnet20", "--batch-size", "8", "--repeats", "2",
            "--warmup", "1", "--threads", "1", "--memory", "inprocess", "--out", str(out)]
    assert tta_main(argv) == 0
    return json.loads((out / "bench.json").read_text()), str(out)


def test_bench_json_records(tiny_run: tuple[dict, str]) -> None:
    result, _ = tiny_run
    records = {r["method"]: r for r in result["records"]}
    assert list(records) == ["plain", *bench.default_methods(), "norm (reference)", "tent (reference)"]
    for name, r in records.items():
        assert r["error"] is None, name
        for key in ("images_per_s", "ms_per_batch", "ratio_to_plain", "ms_p25", "ms_p75", "ms_min", "ms_max",
                    "peak_memory_mb", "forward_per_sample", "backward_per_sample", "first_batch_ms"):
            assert isinstance(r[key], float) and r[key] >= 0, (name, key)
        assert r["ms_min"] <= r["ms_p25"] <= r["ms_per_batch"] <= r["ms_p75"] <= r["ms_max"]
        assert r["images_per_s"] == pytest.approx(8 / r["ms_per_batch"] * 1e3)
        assert len(r["ms_all"]) == 2
        if name == "plain":
            assert r["reset_ms"] is None
        else:
            assert isinstance(r["reset_ms"], float) and r["reset_ratio_to_batch"] == pytest.approx(
                r["reset_ms"] / r["ms_per_batch"])
    assert records["plain"]["ratio_to_plain"] == 1.0 and records["plain"]["ratio_paired"] == 1.0
    tent_rounds = [t / p for t, p in zip(records["tent"]["ms_all"], records["plain"]["ms_all"])]
    assert records["tent"]["ratio_paired"] == pytest.approx(sum(tent_rounds) / 2)  # median of two rounds
    assert records["tent"]["ratio_to_plain"] == pytest.approx(records["tent"]["ms_per_batch"]
                                                              / records["plain"]["ms_per_batch"])
    expected = {"plain": (1, 0), "norm (reference)": (1, 0), "tent (reference)": (1, 1)}
    expected.update({m: (1, 1) if trains(m) else (1, 0) for m in bench.default_methods()})  # filters opened
    assert {n: (r["forward_per_sample"], r["backward_per_sample"]) for n, r in records.items()} == expected
    # batch 8 of ResNet-20: tent keeps every activation for the backward pass, plain inference does not
    assert records["tent"]["peak_memory_mb"] > records["plain"]["peak_memory_mb"] >= 0
    assert records["tent"]["peak_tensor_mb"] > records["plain"]["peak_tensor_mb"] > 0
    for r in records.values():
        assert r["tensor_ratio_to_plain"] == pytest.approx(r["peak_tensor_mb"] / records["plain"]["peak_tensor_mb"])


def test_bench_json_metadata(tiny_run: tuple[dict, str]) -> None:
    result, _ = tiny_run
    assert result["accel"]["batch_norm"] and result["accel"]["lean_graph"]  # the tta commands: on for CPU runs
    settings = result["settings"]
    assert (settings["batch_size"], settings["repeats"], settings["threads"], settings["device"]) == (8, 2, 1, "cpu")
    assert isinstance(result["versions"]["versions"]["torch"], str)
    assert result["versions"]["torch_threads"] == 1
    assert result["machine"]["start"]["cpu_count"] >= 1
    start = result["machine"]["start"]  # the tensor cache's settings while it is installed
    assert "malloc" not in start and (start["tensor_cache"] is not None) == result["accel"]["tensor_cache"]
    assert "random initialisation" in result["weights"]
    assert {g["goal"] for g in result["goals"]} >= {"norm <= 1.15x plain", "tent <= 2.5x plain"}
    assert set(result["accel"]) == {*tta.accel.PIECES, "notes"} and result["versions"]["accel"] == result["accel"]


def test_the_settings_line_describes_the_tensor_cache() -> None:
    from eval.bench_cli import tensor_cache_note

    assert tensor_cache_note(None) == "off"
    assert tensor_cache_note({"tensor_cache_threshold": 2**20, "tensor_cache_max_ratio": 2.0}) == \
        "tensors of 1 MiB and more, mapped memory within 2x the most bytes live"


def test_goals_use_paired_ratios() -> None:
    """Per round: norm / plain = 1.08, 1.25, 1.05 (median 1.08, met); the ratio of the medians, 147 / 120 = 1.225,
    compares rounds taken at different loads. Speedups likewise: reference / tent per round 2, 1.5, 1.2 -> 1.5."""
    def record(method: str, kind: str, ms: list[float]) -> dict:
        median = sorted(ms)[1]
        return {"method": method, "kind": kind, "ms_all": ms, "ms_per_batch": median, "ratio_to_plain": median / 120,
                "ratio_paired": None, "memory_ratio_to_plain": None, "reset_ratio_to_batch": None}
    plain = record("plain", "plain", [100.0, 120.0, 140.0])
    norm = record("norm", "tta", [108.0, 150.0, 147.0])
    tent = record("tent", "tta", [250.0, 260.0, 300.0])
    ref = record("tent (reference)", "reference", [500.0, 390.0, 360.0])
    for r in (norm, tent):
        r["ratio_paired"] = sorted(t / p for t, p in zip(r["ms_all"], plain["ms_all"]))[1]
    goals = {g["goal"]: g for g in bench.check_goals({"records": [plain, norm, tent, ref]})}
    assert norm["ratio_to_plain"] == pytest.approx(1.225)
    assert goals["norm <= 1.15x plain"]["value"] == pytest.approx(1.08) and goals["norm <= 1.15x plain"]["met"]
    assert goals["tent faster than tent (reference): speedup"]["value"] == pytest.approx(1.5)


def test_memory_probe_subprocess() -> None:
    config = BenchConfig(batch_size=8, warmup=1, threads=1, methods=["tent"])
    measured = bench.probe_memory(config, "tent")
    assert measured["memory_method"].startswith("peak RSS"), measured
    assert 0 < measured["peak_memory_mb"] < 500
    assert 0 < measured["peak_tensor_mb"] < measured["peak_memory_mb"] + measured["baseline_mb"]


def test_memory_server_forks_rows_that_measure_as_a_new_interpreter_does() -> None:
    """A row forked by the memory server (imports paid once) reports what a new interpreter reports for it; a row
    that fails, or a child that dies, is reported as failed and the server goes on."""
    config = BenchConfig(batch_size=8, warmup=1, threads=1, methods=["norm"])
    spawned = bench.probe_memory(config, "norm")
    server = bench.MemoryServer()
    try:
        forked = bench.probe_memory(config, "norm", server=server)
        failed = bench.probe_memory(BenchConfig(batch_size=8, threads=1), "no_such_method", server=server)
        killed = bench.probe_memory(config, "norm", timeout=0.0, server=server)
        again = bench.probe_memory(config, "norm", server=server)
    finally:
        server.close()
    assert forked["memory_method"] == spawned["memory_method"] and forked["memory_batches"] == bench.MEMORY_BATCHES
    assert forked["peak_tensor_mb"] == spawned["peak_tensor_mb"] == again["peak_tensor_mb"]  # bytes in tensors
    assert failed["peak_memory_mb"] is None and failed["memory_method"].startswith("subprocess failed:")
    assert "no_such_method" in failed["memory_method"]
    assert killed == {"peak_memory_mb": None, "memory_method": "subprocess timed out after 0 s"}


def test_peak_tensor_bytes_follows_allocations_and_frees_in_order() -> None:
    """4000 bytes, then 8000 more while they live (peak 12000), both freed, then 2000: the peak is 12000."""
    def run() -> None:
        a = torch.empty(1000)
        b = torch.empty(2000)
        del a, b
        torch.empty(500)
    assert bench.peak_tensor_bytes(run) == 12000


def test_the_lean_graph_lowers_tent_s_tensor_peak() -> None:
    """ResNet-20 at batch 48 (the lean graph's default from 43 CIFAR images): autograd keeps two maps per
    convolution unit, the lean graph one and a bit mask."""
    tta.accel.enable(tensor_cache=False)
    try:
        lean = bench.measure_row_tensors(BenchConfig(batch_size=48, warmup=1, threads=1), "tent")["peak_tensor_mb"]
    finally:
        tta.accel.disable()
    full = bench.measure_row_tensors(BenchConfig(batch_size=48, warmup=1, threads=1), "tent")["peak_tensor_mb"]
    assert lean < 0.75 * full


@pytest.mark.parametrize("flags, expected", [
    (["--no-accel"], {piece: False for piece in tta.accel.PIECES}),
    (["--accel-without", "lean_graph,tensor_cache"], {"lean_graph": False, "tensor_cache": False, "batch_norm": True}),
])
def test_bench_records_which_pieces_of_the_fast_path_were_on(flags, expected, tmp_path) -> None:
    argv = ["bench", "--methods", "tent", "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--memory", "off", "--out", str(tmp_path), *flags]
    assert tta_main(argv) == 0
    recorded = json.loads((tmp_path / "bench.json").read_text())["accel"]
    assert {piece: recorded[piece] for piece in expected} == expected


def test_an_unknown_accel_piece_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert tta_main(["bench", "--accel-without", "kernel", "--memory", "off"]) == 2
    assert f"unknown piece(s) kernel; the pieces are: {', '.join(tta.accel.PIECES)}\n" in capsys.readouterr().err


def test_the_removed_malloc_piece_is_accepted_with_a_warning(tmp_path) -> None:
    argv = ["bench", "--methods", "tent", "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--memory", "off", "--out", str(tmp_path), "--accel-without", "malloc,lean_graph"]
    with pytest.warns(FutureWarning, match="--accel-without malloc: the malloc piece of tta.accel was removed"):
        assert tta_main(argv) == 0
    recorded = json.loads((tmp_path / "bench.json").read_text())["accel"]
    assert "malloc" not in recorded and not recorded["lean_graph"] and recorded["batch_norm"]


# -- small pieces and errors ----------------------------------------------------------------------------------------
def test_time_rows_interleaves_and_drops_a_failing_row() -> None:
    order: list[str] = []

    def row(name: str, fail_at: int | None = None) -> bench.Row:
        def call(x: torch.Tensor) -> torch.Tensor:
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise RuntimeError("boom")
            return x

        return bench.Row(name, "tta", torch.nn.Identity(), call, None, {})

    errors: dict[str, str] = {}
    rows = [row("plain"), row("a"), row("b", fail_at=2)]
    times = bench.time_rows(rows, [torch.zeros(2)], BenchConfig(repeats=3), errors)
    assert order == ["plain", "a", "b", "a", "b", "plain", "plain", "a"]  # rotated each round; b dropped in round 2
    assert set(times) == {"plain", "a"} and len(times["plain"]) == len(times["a"]) == 3
    assert errors == {"b": "RuntimeError: boom (round 2)"}



def test_quantile_matches_linear_interpolation() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert [quantile(values, q) for q in (0.0, 0.25, 0.5, 0.75, 1.0)] == [1.0, 1.75, 2.5, 3.25, 4.0]


def test_row_names() -> None:
    assert row_names("all") == ["plain", *tta.methods(), "norm (reference)", "tent (reference)"]
    single = [m for m in tta.methods() if not tta.registry.method_class(m).multi_pass]
    assert row_names("default") == ["plain", *single, "norm (reference)", "tent (reference)"]
    assert row_names("tent,tent_ref_frozen,tent") == ["plain", "tent", "tent (reference, frozen)"]
    assert row_names(["plain"]) == ["plain"]


def test_unknown_method_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown method 'tnet'.*tent_ref"):
        row_names("norm,tnet")
    assert tta_main(["bench", "--methods", "tnet", "--memory", "off"]) == 2
    assert "unknown method 'tnet'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        BenchConfig(device="cuda").validate()
    assert tta_main(["bench", "--device", "cuda", "--memory", "off"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 1, "batch-size"), ("repeats", 0, "repeats"), ("memory", "rss", "memory"),
    ("device", "tpu", "device")])
def test_bad_settings_are_clear_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**{field: value}).validate()


def test_the_deprecated_lean_graph_flag_is_accepted_and_warns(tmp_path) -> None:
    argv = ["bench", "--methods", "tent", "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--memory", "off", "--tent-lean-graph", "off", "--out", str(tmp_path)]
    with pytest.warns(FutureWarning, match="lean_graph option is deprecated"):
        assert tta_main(argv) == 0
    tent = next(r for r in json.loads((tmp_path / "bench.json").read_text())["records"] if r["method"] == "tent")
    assert tent["options"]["lean_graph"] == "off"
