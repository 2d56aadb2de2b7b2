"""The ``tta`` command: a thin dispatcher over subcommands.

Each subcommand lives in the module that owns its job and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their subcommand runs, so
``tta --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from eval.errors import AdviceError
from tta import accel
from tta._extras import MissingExtraError

#: The subcommands that run models: on CPU they turn the fast path on (tta.accel) unless given --no-accel.
ACCEL_COMMANDS = frozenset({"demo", "corruption", "domains", "continual", "bench", "sweep", "select"})
# name -> (module, one-line help). The module provides add_arguments(parser) and run(args).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("eval.demo", "the whole pipeline on an embedded dataset (no download), in under two minutes"),
    "corruption": ("eval.corruption_cli", "evaluate TTA methods on corrupted images (CIFAR-10-C / ImageNet-C style)"),
    "domains": ("eval.domains_cli", "evaluate TTA methods on domain-shift datasets (one ImageFolder per domain)"),
    "continual": ("continual.cli", "run continual-learning task streams (AdaB2N, NaP, NMC) on Avalanche"),
    "make-c": ("streams.write_c", "write a CIFAR-10-C-layout folder of corrupted images from a dataset"),
    "bench": ("eval.bench_cli", "throughput and memory of each method against plain inference"),
    "methods": ("eval.methods_cli", "the registered methods (what each updates and needs); NAME: its options"),
    "sweep": ("eval.sweep_cli", "run a grid of corruption / domain runs (methods x options x models x data x "
                                "protocols x batch sizes x seeds) and of continual runs on Ray, locally or on a "
                                "cluster"),
    "select": ("eval.select_cli", "choose hyper-parameters (learning rate, alpha, ...) on the validation corruptions, "
                                  "then run a sweep file's test grid with the chosen values"),
}
RESUMABLE = {"corruption", "domains", "continual", "make-c"}  # rerunning the same command continues the run
INTERRUPTED = 130  # the shell's exit status for a process stopped by Ctrl-C (128 + SIGINT)


PLUGIN_GROUP = "tta.methods"  # entry-point group of installed packages that register methods


def plugin_modules(argv: Sequence[str]) -> list[str]:
    """The modules named by ``--plugin MODULE`` / ``--plugin=MODULE`` anywhere in ``argv``."""
    modules = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            modules.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            modules.append(arg.split("=", 1)[1])
    return modules


def load_plugins(modules: Sequence[str]) -> None:
    """Import the methods of installed packages (entry points of group ``tta.methods``), then ``modules``: their
    ``@tta.register`` methods then exist for the options, the help and the run."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"--plugin {module}: cannot import it ({error}); give an importable module name "
                             "(on PYTHONPATH or installed), e.g. --plugin my_methods") from error


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tta", description="Test-time adaptation and continual-learning runtime.",
        epilog="CPU runs of demo, corruption, domains, bench and continual use the CPU fast path (tta.accel: C "
               "kernels, a lean autograd graph, a caching allocator; the same results to rounding); --no-accel keeps "
               "plain PyTorch, --accel-without PIECE,... turns pieces off (--accel-without tensor_cache leaves every "
               "tensor to glibc's malloc instead of the caching allocator of tta/accel/tensor_cache.py, which reuses "
               "tensors of 1 MB and more by size class: no page faults after the first batch, resident memory close "
               "to the bytes held). Environment: TTA_NATIVE=0 uses PyTorch's ops and allocator instead of the C and "
               "C++ code built with the system's compilers into TTA_CACHE_DIR (default ~/.cache/tta). TTA_DEBUG=1 "
               "shows tracebacks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                                help="import MODULE first: a module that registers methods with @tta.register "
                                     "(repeatable); installed packages can also declare a 'tta.methods' entry point")
        if name == only:
            if name in ACCEL_COMMANDS:
                add_accel_arguments(sub_parser)
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def add_accel_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no-accel`` and ``--accel-without``: the CPU fast path (tta.accel) is on for CPU runs unless turned off."""
    group = parser.add_argument_group("CPU fast path (tta.accel)")
    group.add_argument("--no-accel", action="store_true",
                       help="keep plain PyTorch: no C kernels, lean graph or allocator change (without it, CPU runs "
                            "use the fast path)")
    group.add_argument("--accel-without", default="", metavar="PIECE[,PIECE]",
                       help=f"turn these pieces of the fast path off: {', '.join(accel.PIECES)} (malloc, a removed "
                            "piece, is accepted with a warning and ignored)")


def accel_pieces(args: argparse.Namespace) -> dict[str, bool] | None:
    """The pieces to turn on for this run (``tta.accel.enable(**pieces)``), or None to stay on the plain path:
    ``--no-accel``, or a device other than the CPU."""
    if getattr(args, "no_accel", True) or not str(getattr(args, "device", "cpu") or "cpu").startswith("cpu"):
        return None
    without = [p.strip() for p in args.accel_without.split(",") if p.strip()]
    for piece in sorted(set(without) & set(accel.REMOVED_PIECES)):
        accel.warn_removed_piece(piece, f"--accel-without {piece}", stacklevel=1)  # here: shown once per process
    unknown = sorted(set(without) - set(accel.PIECES) - set(accel.REMOVED_PIECES))
    if unknown:
        raise ValueError(f"--accel-without: unknown piece(s) {', '.join(unknown)}; the pieces are: "
                         f"{', '.join(accel.PIECES)}")
    return {piece: piece not in without for piece in accel.PIECES}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        load_plugins(plugin_modules(argv))
    except ValueError as error:
        print(f"tta: error: {error}", file=sys.stderr)
        return 2
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    try:
        parser = build_parser(only=command)
    except MissingExtraError as error:  # the subcommand's module needs an extra that is not installed
        print(f"tta {command}: error: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        pieces = accel_pieces(args)
        if pieces is not None:
            accel.enable(**pieces)  # before any model runs: see tta/accel/__init__.py
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, MissingExtraError, AdviceError) as error:
        # Errors we raise say what to do; a traceback adds nothing for a user (TTA_DEBUG=1 shows it).
        if os.environ.get("TTA_DEBUG"):
            raise
        print(f"tta {args.command}: error: {getattr(error, 'cli_message', error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("TTA_DEBUG"):
            raise
        then = ("rerun the same command to resume where it stopped" if args.command in RESUMABLE
                else "rerun it to start again")
        print(f"\ntta {args.command}: stopped (Ctrl-C); {then}", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
