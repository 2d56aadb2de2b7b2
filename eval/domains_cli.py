"""``tta domains``: evaluate TTA methods on domain-shift data laid out as one ImageFolder per domain."""
from __future__ import annotations

import argparse

from eval.corruption_benchmark import needs_source_data, run_benchmark
from eval.corruption_cli import (_csv, add_common_arguments, apply_threads, config_from_args,
                                 print_tables)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="root folder: <root>/<domain>/<class>/<image> (PACS style)")
    parser.add_argument("--domains", default="", help="comma-separated domains in stream order (default: all)")
    parser.add_argument("--source-data", default=None,
                        help="labelled source data, for the methods that need some (`tta methods` lists them; they "
                             "cannot run on domain data without it)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    config = config_from_args(args, domains=_csv(args.domains), source_data=args.source_data)
    needing = [m for m in config.methods if needs_source_data(m)]
    if needing and not args.source_data:
        raise ValueError(f"{', '.join(needing)} need(s) labelled source data: pass --source-data PATH (an "
                         "ImageFolder of the training domain), or leave them out of --methods")
    print_tables(run_benchmark(config), config.out)
    return 0
