"""One cell of a sweep, run in the current process: what a sweep worker does, and what a test compares against.

The cell runs exactly as ``tta corruption`` / ``tta domains`` would run it with one method (the same
:func:`eval.corruption_benchmark.run_benchmark`), in a scratch folder of the worker's own disk that is deleted
afterwards; the records come back to the caller (the sweep's driver writes them), each carrying the cell's key
(``record["cell"]``) and its place in the grid (``record["sweep"]``). A continual cell runs as ``tta continual``
does (:func:`eval.sweep_continual.run_continual_cell`).
"""
from __future__ import annotations

import importlib
import tempfile
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

from eval.sweep import Cell


def cell_from_dict(data: dict[str, Any]):
    """A cell from its :meth:`~eval.sweep.Cell.to_dict` (what a Ray task receives): corruption or continual."""
    if data.get("kind") == "continual":
        from eval.sweep_continual import ContinualCell

        return ContinualCell.from_dict(data)
    return Cell.from_dict(data)


def cell_config(cell: Cell, out: str):
    """The :class:`~eval.corruption_benchmark.BenchmarkConfig` of ``cell``, writing into ``out``."""
    from eval.corruption_benchmark import BenchmarkConfig

    model, data, settings = cell.model, cell.data, cell.settings
    domains = data.get("domains")
    return BenchmarkConfig(
        out=out, model=model.get("arch") or model.get("model", "cifar10_resnet20"), weights=model.get("weights"),
        arch=model.get("arch"), download=bool(model.get("download", False)),
        input_mean=model.get("input_mean"), input_std=model.get("input_std"), num_classes=model["num_classes"],
        data=data["path"], split=data.get("split", "test"), methods=[cell.method],
        method_options={cell.method: dict(cell.options)},
        corruptions=data.get("corruptions", "all"), severity=cell.severity or 5, protocol=cell.protocol,
        delta=settings.get("delta", 0.1), batch_size=cell.batch_size,
        n_images=data.get("n_images", settings.get("n_images")), seed=cell.seed, device=settings.get("device", "cpu"),
        domains=list(domains) if domains is not None else None, source_data=data.get("source_data"),
        source_split=settings.get("source_split", "train"), source_images=settings.get("source_images", 2000),
        progress=False, deterministic=bool(settings.get("deterministic", False)), amp=settings.get("amp"),
        channels_last=bool(settings.get("channels_last", False)))


def result_fields(cell: Cell) -> dict[str, Any]:
    """The settings of a cell that its records depend on: a rerun into the same folder must agree on them."""
    import dataclasses

    if getattr(cell, "kind", None) == "continual":
        from eval.sweep_continual import continual_result_fields

        return continual_result_fields(cell)

    from eval.corruption_benchmark import _RESULT_FIELDS, _RESULT_FIELDS_SINCE
    from eval.method_cli import resolved_options

    config = dataclasses.asdict(cell_config(cell, ""))
    fields = {k: config[k] for k in _RESULT_FIELDS}
    # fields added later, only where they differ from what a cell run before they existed had: those cells resume
    fields.update({k: config[k] for k, then in _RESULT_FIELDS_SINCE.items() if config[k] != then})
    fields["options"] = resolved_options(cell.method, dict(cell.options))
    fields["source"] = {k: config[k] for k in ("source_data", "source_split", "source_images")}
    return json_roundtrip(fields)


def json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def run_cell(cell: Cell, *, plugins: Sequence[str] = (), threads: int = 1,
             accel: Mapping[str, bool] | None = None) -> list[dict[str, Any]]:
    """Run ``cell`` here and return its records (raises what the run raises). ``plugins``: modules registering
    methods, imported first; ``threads``: torch's CPU threads, fixed so that records do not depend on the machine;
    ``accel``: the pieces of the CPU fast path to turn on for a CPU cell (``tta.accel.enable(**accel)``, as the
    ``tta`` commands do), None for plain PyTorch."""
    import torch

    from eval.corruption_benchmark import run_benchmark
    from eval.determinism import enable_deterministic
    from eval.records import ResultsLog
    from tta import accel as fast_path

    for module in plugins:
        importlib.import_module(module)
    if getattr(cell, "kind", None) == "continual":
        from eval.sweep_continual import run_continual_cell

        return run_continual_cell(cell, threads=threads, accel=accel)
    torch.set_num_threads(threads)
    if cell.settings.get("deterministic"):
        enable_deterministic()
    if accel is not None and str(cell.settings.get("device", "cpu")).startswith("cpu"):
        fast_path.enable(**accel)  # as the tta commands do before any model runs
    with tempfile.TemporaryDirectory(prefix="tta-cell-") as scratch:
        run_benchmark(cell_config(cell, scratch), report=False)
        records = ResultsLog(Path(scratch) / "results.jsonl").read()
    return [{**r, "cell": cell.key, "sweep": cell.axes()} for r in records]


def run_cell_outcome(cell: Cell, *, plugins: Sequence[str] = (), threads: int = 1,
                     accel: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """:func:`run_cell`, with an exception returned as data: ``{"status": "done", "records": [...]}`` or
    ``{"status": "failed", "error": ..., "traceback": ...}`` (a raising cell must not stop the others)."""
    try:
        return {"status": "done", "records": run_cell(cell, plugins=plugins, threads=threads, accel=accel)}
    except Exception as error:  # noqa: BLE001 - any error of a cell is recorded, and the sweep goes on
        return {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
