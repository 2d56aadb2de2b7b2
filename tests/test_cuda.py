"""The GPU path: every method, the stream with its corruption generator, the corruption runner and `tta bench`
on CUDA, checked against the CPU; float16 autocast with each gradient method's loss scaler, and the runner's
--amp and --channels-last. Skipped without a CUDA device (`benchmarks/gpu_check.sh` runs them on one). The same
logic runs on the CPU in tests/test_amp.py, with a GradScaler forced there (CUDA alone scales losses)."""
from __future__ import annotations

import pytest
import torch

import streams
import tta
from tests.method_cases import method_class, source_options
from tests.tta_nets import conv_net
from tta.base import GradientAdapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GRADIENT_METHODS = [m for m in tta.methods() if issubclass(method_class(m), GradientAdapter)]


def _adapt(method: str, model: torch.nn.Module, device: str) -> tta.Adapted:
    """The method on ``model`` (on ``device``), its source data computed on the CPU copy of the same weights."""
    options = source_options(method, conv_net(), input_shape=(3, 12, 12))
    chosen = {**method_class(method).select_all_options, **options}
    adapted = tta.adapt(model, method, **chosen)
    # Augmentations and restore masks drawn by a generator on the device differ between the CPU's and CUDA's
    # random streams: where a method draws them through a hook (cotta, rotta), use deterministic ones, so the
    # comparison is of the arithmetic.
    if "augment" in vars(adapted):
        adapted.augment = lambda x: x.flip(3)
    if "restore_mask" in vars(adapted):
        adapted.restore_mask = lambda p: torch.zeros_like(p, dtype=torch.bool)
    return adapted


def _state(adapted: tta.Adapted) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in adapted.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("method", tta.methods())
def test_every_method_on_cuda_matches_the_cpu_and_resets_exactly(method):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 3, 12, 12, generator=g) for _ in range(3)]
    outputs = {}
    for device in ("cpu", "cuda"):
        model = conv_net().to(device)
        adapted = _adapt(method, model, device)
        before = _state(adapted)
        outputs[device] = [adapted(x.to(device)).detach().cpu() for x in batches]
        if device == "cuda":
            adapted.reset()
            after = _state(adapted)
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before), "reset is not exact on CUDA"
            again = adapted(batches[0].cuda()).detach().cpu()
            assert torch.equal(again, outputs["cuda"][0])  # same input, same state: same output on the same GPU
    for cpu, gpu in zip(outputs["cpu"], outputs["cuda"]):
        assert torch.allclose(cpu, gpu, atol=2e-4, rtol=1e-4), (cpu - gpu).abs().max()


def test_stream_made_on_cuda_matches_the_cpu_stream():
    data = streams.load_digits(split="test")
    protocol = streams.make_protocol("mixed", corruptions=["gaussian_noise", "fog", "pixelate"], severity=3,
                                     batch_size=32, seed=0, n_images=64)
    cpu = list(streams.make_stream(data, protocol).batches(0))
    gpu = list(streams.make_stream(data, protocol, device="cuda").batches(0))
    assert len(cpu) == len(gpu) > 1
    for a, b in zip(cpu, gpu):
        assert b.x.device.type == "cuda" and b.y.device.type == "cpu"
        assert torch.equal(a.y, b.y) and torch.equal(a.domain_index, b.domain_index)
        assert (a.x - b.x.cpu()).abs().max() <= 1e-4


def test_corruption_run_on_cuda_gives_the_cpu_errors(tmp_path):
    from eval.corruption_benchmark import BenchmarkConfig, run_benchmark
    from eval.records import ResultsLog

    from eval.demo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn()
    errors = {}
    for run, device in enumerate(("cpu", "cuda")):
        config = BenchmarkConfig(out=str(tmp_path / f"run{run}"), model="digits_cnn", data="digits",
                                 methods=["source", "norm", "tent"], corruptions=["gaussian_noise", "contrast"],
                                 severity=3, batch_size=64, n_images=128, device=device, progress=False)
        run_benchmark(config, model=model)
        errors[run] = {(r["method"], r["corruption"]): r["error"]
                       for r in ResultsLog(tmp_path / f"run{run}" / "results.jsonl").read()}
    assert errors[0].keys() == errors[1].keys() and len(errors[0]) == 6
    for key, error in errors[0].items():
        assert abs(error - errors[1][key]) <= 100 * 2 / 128, key  # at most two of 128 predictions differ


@pytest.mark.parametrize("amp", [False, True, "fp16"])  # True: bf16, as bench.json recorded it before fp16
def test_bench_on_cuda_measures_every_row(amp):
    from eval.bench import BenchConfig, run_bench

    config = BenchConfig(model="cifar10_resnet20", methods=["all"], batch_size=32, device="cuda", amp=amp,
                         repeats=2, warmup=1, memory="inprocess")
    result = run_bench(config, log=lambda line: None)
    rows = {r["method"]: r for r in result["records"]}
    assert not [m for m, r in rows.items() if r["error"]], {m: r["error"] for m, r in rows.items()}
    for name in tta.methods():
        assert rows[name]["ms_per_batch"] > 0 and rows[name]["peak_memory_mb"] > 0


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_fp16_autocast_on_cuda_scales_the_loss_and_stays_near_float32(method):
    """Under float16 autocast on CUDA each gradient method steps through the GradScaler it owns: made at its first
    step, carried by state_dict, forgotten by reset(). Its outputs stay near float32's on the same GPU: float16
    rounding, and at most a first step skipped while the scale (2**16 at first) backs off to fit."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 3, 12, 12, generator=g) for _ in range(4)]
    outputs = {}
    for amp in (False, True):
        adapted = _adapt(method, conv_net().cuda(), "cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            outputs[amp] = [adapted(x.cuda()).detach().float().cpu() for x in batches]
    scaler = adapted._scaler
    assert scaler is not None and scaler.is_enabled(), "no loss scaling under float16 autocast on CUDA"
    assert adapted.get_extra_state()["loss_scaler"]["scale"] == scaler.get_scale() <= 2.0 ** 16
    assert all(bool(torch.isfinite(p).all()) for p in adapted.params)
    for plain, half in zip(outputs[False], outputs[True]):
        assert bool(torch.isfinite(half).all())
        assert torch.allclose(plain, half, atol=0.05, rtol=0.05), (plain - half).abs().max()
    adapted.reset()
    assert adapted._scaler is None and "loss_scaler" not in adapted.get_extra_state()


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_fp16_overflow_on_cuda_skips_the_step_and_backs_the_scale_off(method):
    """A loss scale of 2**60 overflows every float16 gradient: the step is skipped (SAR's already at its first,
    perturbing pass), counted, the parameters do not move, and the scale halves."""
    adapted = _adapt(method, conv_net().cuda(), "cuda")
    adapted._scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 60)
    start = [p.detach().clone() for p in adapted.params]
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        adapted(x)
    assert adapted.skipped_steps >= 1 and adapted._scaler.get_scale() < 2.0 ** 60
    assert all(torch.equal(p, s) for p, s in zip(adapted.params, start)), "a step with overflowed gradients moved"


def test_corruption_run_on_cuda_with_amp_and_channels_last_records_them(tmp_path):
    """The runner on CUDA under fp16 (loss scaling) with channels_last, and under bf16: every record says so,
    and the errors stay within a few predictions of float32's."""
    from eval.corruption_benchmark import BenchmarkConfig, run_benchmark
    from eval.demo import train_digits_cnn
    from eval.records import ResultsLog

    model = train_digits_cnn(epochs=2, log=False)
    errors = []
    for run, settings in enumerate(({}, {"amp": "fp16", "channels_last": True}, {"amp": "bf16"})):
        config = BenchmarkConfig(out=str(tmp_path / f"run{run}"), model="digits_cnn", data="digits",
                                 methods=["source", "norm", "tent", "sar", "memo"],
                                 corruptions=["gaussian_noise", "contrast"], severity=3, batch_size=64, n_images=128,
                                 method_n_images={"memo": 32}, device="cuda", progress=False, **settings)
        run_benchmark(config, model=model)
        records = ResultsLog(tmp_path / f"run{run}" / "results.jsonl").read()
        assert all(r.get("amp") == settings.get("amp") for r in records)
        assert all(r.get("channels_last", False) == settings.get("channels_last", False) for r in records)
        errors.append({(r["method"], r["corruption"]): (r["error"], r["n"]) for r in records})
    assert errors[0].keys() == errors[1].keys() == errors[2].keys() and len(errors[0]) == 10
    for key, (error, n) in errors[0].items():
        for other in errors[1:]:
            assert abs(other[key][0] - error) <= 6 / n, (key, error, other[key][0])


def test_lean_graph_on_cuda_gives_autograd_gradients():
    from tta.accel.lean_graph import LeanGraph

    model = conv_net().cuda()
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0)).cuda()
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)  # BatchNorm and bias vectors train; convolutions are frozen
    grads = []
    for lean in (False, True):
        model.zero_grad()
        if lean:
            with LeanGraph():
                loss = model(x).logsumexp(1).mean()
        else:
            loss = model(x).logsumexp(1).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
