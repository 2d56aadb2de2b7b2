"""``tta corruption``: evaluate TTA methods on corrupted images; prints the paper-style table at the end."""
from __future__ import annotations

import argparse
from pathlib import Path

import tta
from eval.corruption_benchmark import BenchmarkConfig, run_benchmark
from eval.determinism import enable_deterministic
from eval.method_cli import add_method_options, check_settings, method_options_from_args
from streams.protocols import KINDS
from tta._extras import installed


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str | None) -> list[float] | None:
    return None if text is None else [float(t) for t in _csv(text)]


def class_map(text: str | None) -> list[int] | None:
    """``--class-map``: the model's output index of each class of the data, in the data's class order, as a
    comma-separated list or a file holding such indices (separated by commas, spaces or new lines)."""
    if text is None:
        return None
    path = Path(text).expanduser()
    source = path.read_text() if path.is_file() else text
    items = source.replace(",", " ").split()
    try:
        indices = [int(item) for item in items]
    except ValueError:
        raise ValueError(f"--class-map must be integers (the model's output index of each class of the data) as "
                         f"a comma-separated list or a file of them; got {text!r}") from None
    if not indices:
        raise ValueError(f"--class-map {text!r} holds no indices")
    return indices


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``tta corruption`` and ``tta domains``."""
    parser.add_argument("--model", default="cifar10_resnet20",
                        help="registered model (cifar10_resnet20/32/44/56), torchvision:<arch>, or "
                             "robustbench:[<dataset>/]<name> (checkpoint in $TTA_ROBUSTBENCH_DIR/<dataset>/corruptions/)")
    parser.add_argument("--weights", default=None, help="checkpoint file (state dict, loaded with weights_only=True)")
    parser.add_argument("--download", action="store_true", help="download the model's published weights (network)")
    parser.add_argument("--random-weights", action="store_true",
                        help="evaluate a model without --weights as randomly initialised (refused otherwise)")
    parser.add_argument("--arch", default=None,
                        help="package.module:callable building the network, for a --weights state dict of a model "
                             "outside the registry (needs --input-mean and --input-std)")
    parser.add_argument("--input-mean", default=None, help="with --arch: per-channel mean, e.g. 0.485,0.456,0.406")
    parser.add_argument("--input-std", default=None, help="with --arch: per-channel std, e.g. 0.229,0.224,0.225")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="build the network for this many classes (passed to a constructor that takes "
                             "num_classes; default: the network's own)")
    parser.add_argument("--class-map", default=None,
                        help="the model's output index of each class of the data, in the data's class order "
                             "(comma-separated, or a file of them): evaluates e.g. a 1000-class ImageNet model on a "
                             "200-class subset")
    parser.add_argument("--methods", default=",".join(tta.methods()),
                        help=f"comma-separated methods (default: all: {','.join(tta.methods())})")
    parser.add_argument("--protocol", default="reset", choices=KINDS)
    parser.add_argument("--delta", type=float, default=0.1, help="Dirichlet concentration for the correlated protocols")
    parser.add_argument("--rounds", type=int, default=1,
                        help="stream the domain sequence this many times as one chain, without reset (continual, "
                             "gradual, correlated-continual only); each round is a new seeded pass over the same "
                             "images, and the report adds the error per round")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--n-images", type=int, default=None, help="seeded random subset per domain (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                        help="mixed precision: every method's call under torch.autocast with bfloat16 or float16 "
                             "(gradient methods scale float16 losses on CUDA); recorded, and part of the run: a "
                             "folder resumes only with the same setting (default: float32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and batches in channels_last memory format (faster convolutions on GPUs; on CPU "
                             "the same errors within rounding); recorded, and part of the run like --amp")
    parser.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")
    parser.add_argument("--source-images", type=int, default=2000,
                        help="labelled source images (from --source-split) for cafa's class statistics")
    parser.add_argument("--source-split", default="train", help="split holding cafa's labelled source images")
    parser.add_argument("--collapse-guard", action="store_true",
                        help="also run each BatchNorm method inside a collapse guard (rows '<method>+guard') that "
                             "resets it when its predictions collapse onto one class")
    parser.add_argument("--guard-window", type=int, default=1000, help="samples the guard looks back over")
    parser.add_argument("--guard-min-entropy", type=float, default=0.3,
                        help="reset when the predicted-class histogram's normalised entropy falls below this")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="batches made (decoded, corrupted) ahead in a background thread while the methods adapt; "
                             "0: in the loop (default: 2 on CUDA, 0 on CPU, where making a CIFAR batch is a few "
                             "percent of adapting on it). Results do not depend on it")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms (cuDNN, cuBLAS); CPU runs are deterministic without it; "
                             "see eval/determinism.py for what it covers on GPU")
    parser.add_argument("--corrupt-device", default=None,
                        help="where batches are made and corrupted (default: --device; e.g. cpu to keep the "
                             "corruption generator off the GPU)")
    parser.add_argument("--method-batch-size", action="append", default=[], metavar="METHOD=N",
                        help="a method's own batch size, e.g. memo=1 (repeatable; same data, protocol and seed)")
    parser.add_argument("--method-n-images", action="append", default=[], metavar="METHOD=N",
                        help="a method's own images per corruption or domain, e.g. memo=1000 (repeatable)")
    add_method_options(parser)


def per_method_counts(settings: list[str], flag: str, methods: list[str]) -> dict[str, int]:
    """``METHOD=N`` settings of a per-method flag; a method outside the run or a count below 1 is refused."""
    counts: dict[str, int] = {}
    for text in settings:
        method, _, value = text.partition("=")
        if method not in methods:
            raise ValueError(f"{flag} {text}: method {method!r} is not in this run's methods ({', '.join(methods)}); "
                             f"write {flag} METHOD=N")
        try:
            counts[method] = int(value)
        except ValueError:
            raise ValueError(f"{flag} {text}: give a whole number, e.g. {flag} {method}=1") from None
        if counts[method] < 1:
            raise ValueError(f"{flag} {text}: the number must be at least 1")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits",
                        help="clean data ('digits', an ImageFolder .zip/folder, a CIFAR python folder) corrupted on "
                             "the fly, or a pre-corrupted CIFAR-10-C / ImageNet-C folder")
    parser.add_argument("--split", default="test", help="split of --data to evaluate on (default: test)")
    parser.add_argument("--corruptions", default="all",
                        help="'all' (15 benchmark corruptions), 'extra' (4 validation ones) or names, comma-separated")
    parser.add_argument("--severity", type=int, default=5, help="1..5 (gradual: the 1..5..1 sequence)")
    parser.add_argument("--baseline", default=None, help="results.jsonl whose source rows are the mCE baseline")
    add_common_arguments(parser)


def config_from_args(args: argparse.Namespace, **overrides) -> BenchmarkConfig:
    methods = _csv(args.methods)
    check_settings(args, methods)
    return BenchmarkConfig(
        out=args.out, model=args.arch or args.model, weights=args.weights, arch=args.arch,
        download=args.download, input_mean=_floats(args.input_mean), input_std=_floats(args.input_std),
        num_classes=args.num_classes, class_map=class_map(args.class_map), random_weights=args.random_weights,
        data=getattr(args, "data", "digits"),
        split=getattr(args, "split", "test"), methods=methods,
        method_options={m: method_options_from_args(args, m) for m in methods if m in tta.methods()},
        corruptions=getattr(args, "corruptions", "all"), severity=getattr(args, "severity", 5),
        protocol=args.protocol, delta=args.delta, rounds=args.rounds, batch_size=args.batch_size,
        n_images=args.n_images, seed=args.seed,
        method_batch_size=per_method_counts(getattr(args, "method_batch_size", []), "--method-batch-size", methods),
        method_n_images=per_method_counts(getattr(args, "method_n_images", []), "--method-n-images", methods),
        device=args.device, source_split=args.source_split, source_images=args.source_images,
        baseline=getattr(args, "baseline", None), progress=not args.no_progress, prefetch=args.prefetch,
        guard=args.collapse_guard, guard_window=args.guard_window, guard_min_entropy=args.guard_min_entropy,
        deterministic=getattr(args, "deterministic", False), corrupt_device=getattr(args, "corrupt_device", None),
        amp=args.amp, channels_last=args.channels_last, **overrides)


def print_tables(tables, out: str) -> None:
    for table in tables.values():
        print(table.to_markdown(title=f"protocol: {table.protocol}"))
        if table.by_round is not None:
            print(table.by_round.to_markdown(title=f"error per round (protocol: {table.protocol})"))
    plots = f"   plots: {out}/*.png" if installed("matplotlib") else ""
    print(f"results: {Path(out) / 'results.jsonl'}   table: {Path(out) / 'results.md'}{plots}")


def apply_threads(args: argparse.Namespace) -> None:
    """Process-wide settings from the command line: CPU threads and deterministic algorithms."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "deterministic", False):
        enable_deterministic()


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    config = config_from_args(args)
    print_tables(run_benchmark(config), config.out)
    return 0
