"""``tta select FILE --out DIR``: choose hyper-parameters on the validation corruptions, then run the test grid.

The file is a sweep file (docs/sweeps.md) with a ``[select]`` block (:mod:`eval.sweep_select`: what it may hold
and the rule). Both stages run as sweep cells on Ray with ``tta sweep``'s options; ``tta sweep`` on such a file
does the same. ``--validation-only`` stops after the choice (``DIR/selection.json`` and ``DIR/validation/``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from eval import sweep_cli
from eval.sweep import load_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sweep_cli.add_arguments(parser)
    parser.add_argument("--validation-only", action="store_true",
                        help="choose and write selection.json, but do not run the test cells")


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.file)
    if sweep.select is None:
        raise ValueError(f"{args.file} has no [select] block: add one naming the options to choose, e.g. [select] "
                         "with methods = { tent = { lr = [0.0003, 0.001] } } (docs/sweeps.md), or run it with "
                         "tta sweep")
    return run_selection_command(args, sweep)


def run_selection_command(args: argparse.Namespace, sweep) -> int:
    """The two stages of a file with ``[select]``, with the terminal output of ``tta sweep``; returns the exit
    status (1 when a cell failed or a choice could not be made)."""
    from eval.cli import accel_pieces
    from eval.sweep_driver import latest_status
    from eval.sweep_ray import RayExecutor
    from eval.sweep_select import VALIDATION_DIR, run_selection, settle, test_cells, validation_sweep

    out = Path(args.out)
    validation_only = getattr(args, "validation_only", False)
    if args.list:
        grids, groups, _ = settle(sweep, out)
        status = latest_status(out / VALIDATION_DIR)
        for cell in validation_sweep(sweep, sweep.select, grids).cells():
            print(f"{status.get(cell.key, {}).get('kind', 'todo'):6}  validation  {cell.key}")
        if not validation_only:
            cells, waiting = test_cells(sweep, sweep.select, groups)
            status = latest_status(out)
            for cell in cells:
                print(f"{status.get(cell.key, {}).get('kind', 'todo'):6}  test        {cell.key}")
            if waiting:
                print(f"{len(waiting)} test cell(s) wait for the choice of their options (validation not finished)")
        return 0
    threads = args.threads or max(1, int(args.cpus_per_cell))
    with RayExecutor(address=args.address, cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell,
                     threads=threads, plugins=args.plugin, num_cpus=args.num_cpus,
                     accel=accel_pieces(args)) as executor:
        outcome = run_selection(sweep, out, executor, retry_failed=args.retry_failed, progress=not args.no_progress,
                                validation_only=validation_only)
    return report(sweep, out, outcome, title=Path(args.file).stem)


def report(sweep, out: Path, outcome, *, title: str) -> int:
    """Write the reports of both stages (the test's with the "Selected hyper-parameters" table first), print them
    with what ran, and return the exit status."""
    from eval.records import ResultsLog
    from eval.sweep_driver import describe
    from eval.sweep_report import write_sweep_report
    from eval.sweep_select import VALIDATION_DIR, selection_markdown, test_cells

    folder = out / VALIDATION_DIR
    records = ResultsLog(folder / "results.jsonl").read()
    if records:
        write_sweep_report(records, folder, title=f"{title}: validation")
    table = selection_markdown(outcome.groups, sweep.select)
    print(table)
    for summary in outcome.validation:
        print("validation " + describe(summary, folder))
    if outcome.test:
        current = {c.key for c in test_cells(sweep, sweep.select, outcome.groups)[0]}
        everything = ResultsLog(out / "results.jsonl").read()
        records = [r for r in everything if r["cell"] in current]  # not cells of an earlier choice
        stale = len({r["cell"] for r in everything} - current)
        if records:
            for t in write_sweep_report(records, out, title=title, preamble=table):
                print(t.to_markdown())
        for summary in outcome.test:
            print("test " + describe(summary, out))
        if stale:
            print(f"note: results.jsonl also holds {stale} cell(s) of an earlier choice; the report leaves them out")
    if outcome.waiting:
        print(f"{len(outcome.waiting)} test cell(s) were not run: a validation cell of their group failed "
              f"(see {folder / 'cells.jsonl'}; rerun with --retry-failed)")
    print(f"selection: {out / 'selection.json'}   validation: {folder / 'results.md'}"
          + (f"   test: {out / 'results.md'}" if outcome.test else ""))
    return 1 if outcome.failed or outcome.waiting or not all(g.complete for g in outcome.groups) else 0
