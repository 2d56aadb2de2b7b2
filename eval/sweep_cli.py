"""``tta sweep FILE --out DIR``: run a grid of ``tta corruption`` / ``tta domains`` cells and ``tta continual``
cells (a ``[continual]`` table) on Ray (docs/sweeps.md).

The sweep file (TOML) is read and validated by :mod:`eval.sweep`; the cells run on Ray (:mod:`eval.sweep_ray`),
started here unless ``--address`` names a cluster; the driver (:mod:`eval.sweep_driver`) writes the records, and
:mod:`eval.sweep_report` the tables and plots over the whole grid. A file with a ``[select]`` block runs as ``tta
select`` does (:mod:`eval.select_cli`): the validation cells and the choice first, then the test cells.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from eval.sweep import load_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="sweep file (TOML): methods with option grids, models, data, protocols, "
                                     "batch sizes, seeds; and/or a [continual] table (docs/sweeps.md)")
    parser.add_argument("--out", required=True, help="output folder; rerunning with the same folder skips "
                                                     "finished (and failed) cells")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on: HOST:PORT or auto (default: start Ray here, on this machine)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="without --address: CPUs the local Ray may use (default: all)")
    parser.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs each cell requests (default 1)")
    parser.add_argument("--gpus-per-cell", type=float, default=0.0,
                        help="GPUs each cell requests, fractions allowed (0.25: four cells share a GPU; default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in each cell (default: --cpus-per-cell, at least 1)")
    parser.add_argument("--retry-failed", action="store_true", help="run only the cells that failed before")
    parser.add_argument("--list", action="store_true", help="print the cells and their state, run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from eval.cli import accel_pieces
    from eval.sweep_driver import describe, latest_status, run_sweep
    from eval.sweep_ray import RayExecutor
    from eval.sweep_report import write_sweep_report

    # --plugin (every command's option) was imported by `tta` before parsing; the workers import it too
    sweep = load_sweep(args.file)
    if sweep.select is not None:  # choose on the validation corruptions first, as tta select does
        from eval.select_cli import run_selection_command

        return run_selection_command(args, sweep)
    out = Path(args.out)
    if args.list:
        status = latest_status(out)
        for cell in sweep.cells():
            print(f"{status.get(cell.key, {}).get('kind', 'todo'):6}  {cell.key}")
        return 0
    threads = args.threads or max(1, int(args.cpus_per_cell))
    with RayExecutor(address=args.address, cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell,
                     threads=threads, plugins=args.plugin, num_cpus=args.num_cpus,
                     accel=accel_pieces(args)) as executor:
        summary = run_sweep(sweep, out, executor, retry_failed=args.retry_failed, progress=not args.no_progress)
    from eval.records import ResultsLog

    records = ResultsLog(out / "results.jsonl").read()
    if records:
        for table in write_sweep_report(records, out, title=Path(args.file).stem):
            print(table.to_markdown())
    print(describe(summary, out))
    print(f"results: {out / 'results.jsonl'}   cells: {out / 'cells.jsonl'}   table: {out / 'results.md'}")
    return 1 if summary.still_failed else 0
