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

import tta._compat  # noqa: F401
from eval.errors import AdviceError
from tta.cpu_memory import retain_freed_memory

# name -> (module, one-line help). The module provides add_arguments(parser) and run(args).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("eval.demo", "the whole pipeline on an embedded dataset (no download), in under two minutes"),
    "corruption": ("eval.corruption_cli", "evaluate TTA methods on corrupted images (CIFAR-10-C / ImageNet-C style)"),
    "domains": ("eval.domains_cli", "evaluate TTA methods on domain-shift datasets (one ImageFolder per domain)"),
    "continual": ("continual.cli", "run continual-learning task streams (AdaB2N, NaP, NMC) on Avalanche"),
    "make-c": ("streams.write_c", "write a CIFAR-10-C-layout folder of corrupted images from a dataset"),
    "bench": ("eval.bench_cli", "throughput and memory of each method against plain inference"),
}
RESUMABLE = {"corruption", "domains", "continual", "make-c"}  # rerunning the same command continues the run
INTERRUPTED = 130  # the shell's exit status for a process stopped by Ctrl-C (128 + SIGINT)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tta", description="Test-time adaptation and continual-learning runtime.",
        epilog="Environment: TTA_MALLOC chooses how freed CPU memory is kept (tta/cpu_memory.py): retain (default) "
               "gives tensors of 1 MB and more a caching allocator (tta/tensor_cache.py: reused by size class, no page "
               "faults after the first batch, resident memory close to the bytes held) and makes glibc's malloc keep "
               "the rest; glibc keeps glibc's malloc for all tensors, with those settings; default changes nothing. "
               "TTA_NATIVE=0 uses PyTorch's ops and allocator instead of the C and C++ code built with the system's "
               "compilers on first use into TTA_CACHE_DIR (default ~/.cache/tta). TTA_DEBUG=1 shows tracebacks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        command = None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        retain_freed_memory()  # before any model runs: see tta/cpu_memory.py (TTA_MALLOC chooses)
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, AdviceError) as error:
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
