"""Mixed precision (``--amp bf16|fp16``) and ``--channels-last`` on the CPU: every method runs under autocast and
its records say so, the runner's settings reach the adapters, a folder resumes only with the same settings, the
loss-scaling wiring of every gradient method (with a GradScaler forced on the CPU, where scaling is otherwise never
taken), and the sweep and ``tta bench`` options. The CUDA side (float16 with the real scaler) is in
tests/test_cuda.py, skipped without a GPU."""
from __future__ import annotations

import json
import math
import types

import pytest
import torch
from torch import nn

import tta
from eval.cli import main
from tests.method_cases import adapt_case, method_class, methods_where
from tests.tta_nets import conv_net
from tta.base import GradientAdapter

GRADIENT_METHODS = methods_where(lambda cls: issubclass(cls, GradientAdapter))
# (memo and cotta take n_augmentations=4 below, not their 32: the same code paths, a fraction of the time)
CPU_FP16 = True
try:
    from eval.runner import check_amp

    check_amp("fp16", "cpu")
except ValueError:
    CPU_FP16 = False  # this torch cannot autocast to float16 on the CPU: --amp fp16 --device cpu is refused


@pytest.fixture(scope="module")
def digits_model() -> nn.Module:
    """A digits CNN trained for two epochs: errors well below chance, so the comparisons below mean something."""
    from eval.demo import train_digits_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_digits_cnn(epochs=2, log=False)
    finally:
        torch.set_num_threads(threads)


def _run(tmp_path, name: str, model: nn.Module, methods: list[str], **settings) -> dict[tuple[str, str], dict]:
    """Run ``methods`` (filters opened) on two corruptions of digits with ``settings``; the records by (method,
    corruption)."""
    from eval.corruption_benchmark import BenchmarkConfig, run_benchmark
    from eval.records import ResultsLog

    config = BenchmarkConfig(out=str(tmp_path / name), model="digits_cnn", data="digits", methods=methods,
                             method_options={m: dict(method_class(m).select_all_options) for m in methods},
                             corruptions=["gaussian_noise", "contrast"], severity=3, batch_size=32, n_images=64,
                             source_images=100, progress=False, **settings)
    run_benchmark(config, model=model)
    return {(r["method"], r["corruption"]): r for r in ResultsLog(tmp_path / name / "results.jsonl").read()}


# -- every method under autocast, through the runner ------------------------------------------------------------------
def test_bf16_autocast_runs_every_method_and_the_records_say_so(tmp_path, digits_model, one_thread):
    methods = list(tta.methods())
    plain = _run(tmp_path, "fp32", digits_model, methods)
    bf16 = _run(tmp_path, "bf16", digits_model, methods, amp="bf16")
    assert bf16.keys() == plain.keys() and len(bf16) == 2 * len(methods)
    for key, record in bf16.items():
        assert record["amp"] == "bf16" and "channels_last" not in record, key
        assert 0.0 <= record["error"] <= 1.0 and math.isfinite(record["ece"]), key
        # bfloat16 rounds the activations, and a prediction near a tie may flip: at most 4 of the 64 differ (each
        # method adapted; memo, whose weights autocast once cached across its steps, now within this as well)
        assert abs(record["error"] - plain[key]["error"]) <= 4 / 64, (key, record["error"], plain[key]["error"])
        assert "amp" not in plain[key], "a float32 record carries no amp key, as records always did"
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())["config"]
    assert (config["amp"], config["channels_last"]) == ("bf16", False)
    assert "bf16 autocast" in (tmp_path / "bf16" / "results.md").read_text().splitlines()[0]


def test_channels_last_gives_the_contiguous_errors_within_rounding(tmp_path, digits_model, one_thread):
    methods = ["source", "norm", "tent", "sar", "cotta", "lame", "memo"]
    plain = _run(tmp_path, "contiguous", digits_model, methods)
    last = _run(tmp_path, "channels_last", digits_model, methods, channels_last=True)
    assert last.keys() == plain.keys()
    for key, record in last.items():
        assert record["channels_last"] is True and "amp" not in record, key
        # the same arithmetic in another summation order: a prediction at a tie may flip, nothing more
        assert abs(record["error"] - plain[key]["error"]) <= 1 / 64, (key, record["error"], plain[key]["error"])


class _Probe(nn.Module):
    """The model with a note, at each forward, of the autocast state and the memory format of input and weights."""

    seen: list[tuple] = []

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = next(m for m in self.inner.modules() if isinstance(m, nn.Conv2d))
        channels_last = torch.channels_last
        _Probe.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                            x.is_contiguous(memory_format=channels_last) and not x.is_contiguous(),
                            conv.weight.is_contiguous(memory_format=channels_last) and not conv.weight.is_contiguous()))
        return self.inner(x)


@pytest.mark.parametrize("amp, channels_last", [(None, False), ("bf16", True), ("fp16", False)])
def test_the_runner_calls_each_adapter_under_the_autocast_and_layout_asked_for(tmp_path, amp, channels_last):
    if amp == "fp16" and not CPU_FP16:
        pytest.skip("no float16 autocast on the CPU in this torch")
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    _Probe.seen.clear()
    _run(tmp_path, "probe", _Probe(digits_cnn()), ["source", "tent"], amp=amp, channels_last=channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    calls = [s for s in _Probe.seen if s[0]]  # the check of model and data runs outside autocast
    assert len(_Probe.seen) > 8
    if amp is None:
        assert not calls
    else:
        assert len(calls) == 8 and all(s[1] == dtype for s in calls)  # 2 methods x 2 corruptions x 2 batches
    runs = _Probe.seen[-8:]
    assert all(s[2] == channels_last and s[3] == channels_last for s in runs), runs


# -- float16 on the CPU: autocast without loss scaling ----------------------------------------------------------------
@pytest.mark.skipif(not CPU_FP16, reason="no float16 autocast on the CPU in this torch")
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_fp16_on_the_cpu_takes_the_unscaled_step_and_stays_finite(method, monkeypatch):
    class NoScaler:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("a GradScaler was made for a CPU step")

    monkeypatch.setattr(torch.amp, "GradScaler", NoScaler)
    adapted = adapt_case(method, conv_net(), input_shape=(3, 12, 12), n_augmentations=4)
    start = [p.detach().clone() for p in adapted.params]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        outputs = [adapted(torch.rand(16, 3, 12, 12, generator=g)) for _ in range(3)]
    assert all(o.dtype == torch.float16 and bool(torch.isfinite(o).all()) for o in outputs)
    assert adapted._scaler is None and "loss_scaler" not in adapted.get_extra_state()
    assert all(bool(torch.isfinite(p).all()) for p in adapted.params)
    if method_class(method).may_skip_update is False or adapted.skipped_steps == 0:
        assert any(not torch.equal(p, s) for p, s in zip(adapted.params, start)), "no step was taken"


@pytest.mark.skipif(CPU_FP16, reason="this torch autocasts to float16 on the CPU (the test above covers it)")
def test_fp16_on_a_cpu_without_float16_autocast_is_refused(tmp_path, capsys):
    assert main(["corruption", "--data", "digits", "--methods", "source", "--amp", "fp16", "--random-weights",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "cannot autocast to torch.float16 on cpu" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fp16_corruption_run_on_the_cpu_records_finite_errors(tmp_path, digits_model, one_thread):
    if not CPU_FP16:
        pytest.skip("no float16 autocast on the CPU in this torch")
    records = _run(tmp_path, "fp16", digits_model, ["tent", "sar", "eta", "deyo"], amp="fp16")
    assert len(records) == 8
    assert all(r["amp"] == "fp16" and 0 <= r["error"] <= 1 and math.isfinite(r["ece"]) for r in records.values())


def test_a_callers_single_autocast_region_sees_the_weights_of_each_step():
    """shot_im trains convolution weights, which autocast casts once per region and then reuses: a caller's loop
    under one region must give what one region per call gives (the adapter drops autocast's cached weights after
    each step and at each call)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 3, 12, 12, generator=g) for _ in range(3)]
    outputs = []
    for one_region in (False, True):
        adapted = adapt_case("shot_im", conv_net(), input_shape=(3, 12, 12))
        if one_region:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs.append([adapted(x) for x in batches])
        else:
            outputs.append([])
            for x in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    outputs[-1].append(adapted(x))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CPU_FP16, reason="no float16 autocast on the CPU in this torch")
def test_the_backward_runs_outside_autocast_so_float32_parts_keep_float32_gradients():
    """cafa's distances run in float32 under autocast (a precision matrix's entries overflow float16), and so must
    their gradients: autograd would run the backward under the caller's autocast, in float16, to NaN, and every
    step would be skipped as non-finite."""
    adapted = adapt_case("cafa", conv_net(), input_shape=(3, 12, 12))
    start = [p.detach().clone() for p in adapted.params]
    g = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.float16):
        for _ in range(3):
            adapted(torch.rand(16, 3, 12, 12, generator=g))
    assert adapted.skipped_steps == 0
    assert all(bool(torch.isfinite(p).all()) for p in adapted.params)
    assert any(not torch.equal(p, s) for p, s in zip(adapted.params, start))


# -- the loss-scaling wiring, with a GradScaler forced on the CPU -----------------------------------------------------
def _force_scaler(adapted: GradientAdapter, init_scale: float) -> None:
    """Make ``adapted`` scale every step, on the CPU, as it does under float16 autocast on CUDA."""

    def forced(self) -> torch.amp.GradScaler:
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return self._scaler

    adapted._loss_scaler = types.MethodType(forced, adapted)


def _state(adapted: tta.Adapted) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapted.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_a_power_of_two_loss_scale_gives_the_unscaled_steps_exactly(method):
    """Scaling by 2**8 and unscaling are exact in float32, so a method whose every step goes through the helpers
    (``_backward``, ``_step_optimizer``, SAR's ``_unscaled_gradients``) adapts exactly as without scaling: a
    backward or step that bypassed them would leave the gradients 256 times too large."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 3, 12, 12, generator=g) for _ in range(3)]
    runs = []
    for scaled in (False, True):
        adapted = adapt_case(method, conv_net(), input_shape=(3, 12, 12), n_augmentations=4)
        if scaled:
            _force_scaler(adapted, 2.0 ** 8)
        outputs = [adapted(x).detach() for x in batches]
        runs.append((outputs, _state(adapted), adapted))
    (plain, plain_state, _), (scaled, scaled_state, adapted) = runs
    for a, b in zip(plain, scaled):
        assert torch.equal(a, b), (a - b).abs().max()
    assert plain_state.keys() == scaled_state.keys()
    assert all(torch.equal(plain_state[k], scaled_state[k]) for k in plain_state)
    steps_taken = adapted._scaler is not None
    if steps_taken:  # rotta steps once its memory holds enough samples; the others step on every batch
        assert adapted._scaler.get_scale() == 2.0 ** 8 and adapted.get_extra_state()["loss_scaler"]["scale"] == 256.0
    adapted.reset()
    assert adapted._scaler is None and "loss_scaler" not in adapted.get_extra_state()


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_an_overflowed_scaled_step_is_skipped_and_the_scale_backs_off(method):
    adapted = adapt_case(method, conv_net(), input_shape=(3, 12, 12), n_augmentations=4)
    _force_scaler(adapted, 2.0 ** 8)
    backward = adapted._backward

    def overflowing(loss: torch.Tensor) -> None:  # as if float16 gradients had overflowed
        backward(loss)
        for p in adapted.params:
            if p.grad is not None:
                p.grad.fill_(float("inf"))

    adapted._backward = overflowing
    start = [p.detach().clone() for p in adapted.params]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        adapted(torch.rand(16, 3, 12, 12, generator=g))
    assert adapted.skipped_steps > 0 and adapted._scaler.get_scale() < 2.0 ** 8
    assert all(torch.equal(p, s) for p, s in zip(adapted.params, start)), "a step with overflowed gradients moved"


def test_the_loss_scaler_state_round_trips_through_a_state_dict():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 3, 12, 12, generator=g) for _ in range(3)]
    first = adapt_case("tent", conv_net(), input_shape=(3, 12, 12))
    _force_scaler(first, 2.0 ** 8)
    first(batches[0])
    first._scaler.update(2.0 ** 5)  # a scale another than the initial one
    state = first.state_dict()
    assert state["_extra_state"]["loss_scaler"]["scale"] == 2.0 ** 5
    second = adapt_case("tent", conv_net(), input_shape=(3, 12, 12))
    second.load_state_dict(state)
    assert second._scaler is not None and second._scaler.get_scale() == 2.0 ** 5
    _force_scaler(second, 2.0 ** 8)  # the loaded scaler is kept: the forced factory only makes one when none is
    assert torch.equal(first(batches[1]), second(batches[1]))
    plain = adapt_case("tent", conv_net(), input_shape=(3, 12, 12))
    plain.load_state_dict(adapt_case("tent", conv_net(), input_shape=(3, 12, 12)).state_dict())
    assert plain._scaler is None  # a state dict without a scaler leaves none


# -- the command line: options, records, resume -----------------------------------------------------------------------
def test_tta_corruption_amp_and_channels_last_are_part_of_the_run(tmp_path, capsys, monkeypatch, digits_model):
    import eval.corruption_benchmark as bench

    monkeypatch.setattr(bench, "model_factory", lambda config, m=None: bench._fresh_copy(digits_model, config))
    out = tmp_path / "run"
    argv = ["corruption", "--data", "digits", "--methods", "source,tent", "--corruptions", "contrast", "--severity",
            "3", "--batch-size", "32", "--n-images", "64", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main([*argv, "--amp", "bf16"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["amp"] == "bf16" for r in records)
    assert main([*argv, "--amp", "bf16"]) == 0  # resumes: nothing recomputed
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(argv) == 2
    assert "different run (amp differ)" in capsys.readouterr().err
    assert main([*argv, "--amp", "fp16"]) == 2
    assert "different run (amp differ)" in capsys.readouterr().err
    assert main([*argv, "--amp", "bf16", "--channels-last"]) == 2
    assert "different run (channels_last differ)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--amp", "fp32"])
    assert "invalid choice: 'fp32'" in capsys.readouterr().err
    # a folder written before the options existed resumes as float32 and contiguous, and only so
    old = tmp_path / "old"
    assert main([*argv[:argv.index("--out") + 1], str(old), *argv[argv.index("--out") + 2:]]) == 0
    saved = json.loads((old / "config.json").read_text())
    del saved["config"]["amp"], saved["config"]["channels_last"]
    (old / "config.json").write_text(json.dumps(saved))
    old_argv = [*argv[:argv.index("--out") + 1], str(old), *argv[argv.index("--out") + 2:]]
    assert main(old_argv) == 0
    (old / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main([*old_argv, "--amp", "bf16"]) == 2
    assert "different run (amp differ)" in capsys.readouterr().err


def test_amp_settings_are_checked_before_anything_is_written(tmp_path):
    from eval.corruption_benchmark import BenchmarkConfig, run_benchmark
    from eval.runner import check_amp

    with pytest.raises(ValueError, match="--amp must be one of bf16, fp16"):
        run_benchmark(BenchmarkConfig(out=str(tmp_path / "a"), methods=["source"], amp="fp8", random_weights=True))
    assert not (tmp_path / "a").exists()
    check_amp(None, "cpu")
    check_amp("bf16", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot autocast to torch.bfloat16 on cuda"):
            check_amp("bf16", "cuda")


def test_tta_bench_amp_takes_bf16_fp16_or_stands_alone_for_bf16():
    import argparse

    from eval.bench import BenchConfig
    from eval.bench_cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for given, amp in (([], None), (["--amp"], "bf16"), (["--amp", "bf16"], "bf16"), (["--amp", "fp16"], "fp16"),
                       (["--amp", "--channels-last"], "bf16")):
        assert config_from_args(parser.parse_args(given)).amp == amp, given
    with pytest.raises(SystemExit):
        parser.parse_args(["--amp", "fp32"])
    assert BenchConfig(amp=True).amp == "bf16" and BenchConfig(amp=False).amp is None  # bench.json before fp16
    with pytest.raises(ValueError, match="--amp must be one of"):
        BenchConfig(amp="fp8").validate()


@pytest.mark.skipif(not CPU_FP16, reason="no float16 autocast on the CPU in this torch")
def test_tta_bench_runs_a_gradient_row_under_fp16_autocast(one_thread):
    from eval.bench import BenchConfig, run_bench

    config = BenchConfig(methods=["tent,sar"], batch_size=8, amp="fp16", channels_last=True, repeats=1, warmup=1,
                         memory="off")
    result = run_bench(config, log=lambda line: None)
    rows = {r["method"]: r for r in result["records"]}
    assert not [m for m, r in rows.items() if r["error"]], {m: r["error"] for m, r in rows.items()}
    assert result["settings"]["amp"] == "fp16" and rows["tent"]["ms_per_batch"] > 0


# -- sweep cells ------------------------------------------------------------------------------------------------------
def _sweep(**top) -> dict:
    return {"methods": {"tent": {}}, "models": [{"name": "m", "model": "cifar10_resnet20"}],
            "data": [{"name": "d", "path": "digits", "corruptions": ["contrast"]}], **top}


def test_sweep_amp_and_channels_last_reach_each_cell_and_its_result_fields():
    from eval.sweep import SweepError, parse_sweep
    from eval.sweep_cell import cell_config, result_fields

    plain = parse_sweep(_sweep()).cells()[0]
    assert (cell_config(plain, "x").amp, cell_config(plain, "x").channels_last) == (None, False)
    assert "amp" not in result_fields(plain) and "channels_last" not in result_fields(plain)  # older cells resume
    cell = parse_sweep(_sweep(amp="fp16", channels_last=True)).cells()[0]
    assert (cell_config(cell, "x").amp, cell_config(cell, "x").channels_last) == ("fp16", True)
    assert (result_fields(cell)["amp"], result_fields(cell)["channels_last"]) == ("fp16", True)
    for bad, message in ((dict(amp="fp32"), "amp: 'fp32' is not allowed; allowed: 'bf16', 'fp16'"),
                         (dict(amp=True), "amp: True is not allowed; allowed: a single str"),
                         (dict(channels_last="yes"), "channels_last: 'yes' is not allowed; allowed: a single bool")):
        with pytest.raises(SweepError, match=message):
            parse_sweep(_sweep(**bad))
