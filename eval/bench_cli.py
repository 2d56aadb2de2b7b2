"""``tta bench``: images/s, ms per batch, peak memory, passes per image and reset cost of each method, as ratios
to plain inference (``model.eval()`` under ``torch.inference_mode()``) of the same model and batch, one run.

    tta bench --model cifar10_resnet20 --weights resnet20-12fca82f.th --methods all --batch-size 200 \\
        --device cpu --threads 1 --repeats 30 --out runs/bench
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import tta
from eval.bench import BenchConfig, check_goals, run_bench
from eval.method_cli import add_method_options, method_options_from_args
from eval.records import write_json_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cifar10_resnet20",
                        help="registered model (cifar10_resnet20/32/44/56) or torchvision:<arch> (224 px)")
    parser.add_argument("--weights", default=None,
                        help="checkpoint file; without it the model is randomly initialised (fine for timing)")
    parser.add_argument("--methods", default="default",
                        help="'default' (the single-pass methods: forward-only and one-step, plus norm_ref,tent_ref), "
                             "'all' (every registered method, multi-pass ones such as augmentation or teacher methods "
                             "included) or a comma-separated list; tent_ref_frozen = reference tent with the other "
                             "parameters frozen. Plain inference is always measured")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                        help="autocast for every row (plain included): bf16 (also --amp alone) or fp16 (gradient "
                             "methods scale the loss on CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs, every row")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each row's model forward (compile time shows as first_batch_ms; a row "
                             "that fails to compile is reported and skipped)")
    parser.add_argument("--repeats", type=int, default=BenchConfig.repeats,
                        help="timed batches per row, after warm-up (default %(default)s: a quick look, the spread "
                             "shown as IQR; the published tables use 30)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="un-timed batches per row before timing (at least 1, after one hook-counting batch)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images (and of a random init)")
    parser.add_argument("--no-check-inputs", action="store_true",
                        help="check_inputs=False for every method (measures the validation's cost)")
    parser.add_argument("--memory", default="subprocess", choices=["subprocess", "inprocess", "off"],
                        help="CPU peak memory: in a fresh process per row (default), in this process (faster; earlier "
                             "rows can hide part of a peak), or not at all. CUDA always measures in process")
    parser.add_argument("--out", default=None, help="folder for bench.json")
    add_method_options(parser)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(result: dict[str, Any]) -> str:
    """The records as a Markdown table, then the goals."""
    lines = ["| method | images/s | ms/batch (median) | IQR ms | x plain | x plain, paired (IQR) | fwd/bwd per image | "
             "peak MB | x plain mem | tensor MB | x plain tensors | reset ms | reset / batch |",
             "|---|" + "---:|" * 12]
    for r in result["records"]:
        if r["error"]:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * 11)
            continue
        iqr = "-" if r.get("ms_p25") is None else f"{r['ms_p25']:.1f}-{r['ms_p75']:.1f}"
        paired = ("-" if r.get("ratio_paired") is None else
                  f"{r['ratio_paired']:.2f} ({r['ratio_paired_p25']:.2f}-{r['ratio_paired_p75']:.2f})")
        passes = ("-" if r["forward_per_sample"] is None
                  else f"{r['forward_per_sample']:g} / {r['backward_per_sample']:g}")
        lines.append(
            f"| {r['method']} | {_fmt(r['images_per_s'], '.0f')} | {_fmt(r['ms_per_batch'], '.1f')} | {iqr} | "
            f"{_fmt(r['ratio_to_plain'], '.2f')} | {paired} | {passes} | {_fmt(r['peak_memory_mb'], '.1f')} | "
            f"{_fmt(r['memory_ratio_to_plain'], '.2f')} | {_fmt(r.get('peak_tensor_mb'), '.1f')} | "
            f"{_fmt(r.get('tensor_ratio_to_plain'), '.2f')} | {_fmt(r['reset_ms'], '.3f')} | "
            f"{_fmt(None if r['reset_ratio_to_batch'] is None else 100 * r['reset_ratio_to_batch'], '.2f', ' %')} |")
    goals = result.get("goals") or check_goals(result)
    if goals:
        lines += ["", "| goal (time ratios: paired medians) | measured | met |", "|---|---:|---|"]
        for g in goals:
            met = "not measured" if g["met"] is None else ("yes" if g["met"] else "NO")
            lines.append(f"| {g['goal']} | {g['shown']} | {met} |")
    return "\n".join(lines)


def write_json(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``bench.json`` (atomically) in ``out`` and return its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.json"
    write_json_atomic(path, result)
    return path


def tensor_cache_note(settings: dict[str, int | float] | None) -> str:
    """The caching CPU allocator's settings in words (``settings``: bench.json's ``machine.start.tensor_cache``)."""
    if not settings:
        return "off"
    return (f"tensors of {settings['tensor_cache_threshold'] / 2**20:g} MiB and more, mapped memory within "
            f"{settings['tensor_cache_max_ratio']:g}x the most bytes live")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model, weights=args.weights, methods=[args.methods], batch_size=args.batch_size,
        device=args.device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        repeats=args.repeats, warmup=args.warmup, threads=args.threads, seed=args.seed,
        check_inputs=not args.no_check_inputs, memory=args.memory,
        method_options={m: method_options_from_args(args, m) for m in tta.methods()})


def accel_note(state: dict[str, Any] | None) -> str:
    """Which pieces of the CPU fast path (tta.accel) were on, in words."""
    if not state:
        return "unknown"
    on = [piece for piece in tta.accel.PIECES if state.get(piece)]
    off = [f"{piece} ({state['notes'][piece]})" if piece in state.get("notes", {}) else piece
           for piece in tta.accel.PIECES if not state.get(piece)]
    if not on:
        return "off (plain PyTorch)"
    return "on: " + ", ".join(on) + (f"; off: {', '.join(off)}" if off else "")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as error:
        print(f"tta bench: error: {error}", file=sys.stderr)
        return 2
    result = run_bench(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    settings = (f"{config.model}, batch {config.batch_size}, {config.device}, threads "
                f"{result['versions']['torch_threads']}, amp {config.amp or 'off'}, channels_last "
                f"{config.channels_last}, compile {config.compile}, repeats {config.repeats}, warm-up {config.warmup}, "
                f"load average {result['machine']['start']['load_average']}, tensor cache "
                f"{tensor_cache_note(result['machine']['start'].get('tensor_cache'))}, CPU fast path "
                f"{accel_note(result.get('accel'))}")
    print(f"{settings}\n{result['weights']}\n")
    print(format_table(result))
    if args.out:
        print(f"\nwritten: {write_json(result, args.out)}")
    return 1 if any(r["error"] for r in result["records"]) else 0
