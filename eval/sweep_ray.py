"""Running sweep cells on Ray: locally (Ray starts inside the command) or on a cluster (``--address``).

Each cell is one Ray task with ``max_calls=1``, so it runs in a fresh worker process (no state from an earlier
cell: imported plugins, torch threads, caches) with its own CPU and GPU request. A worker that dies (killed,
out of memory, its node lost) is retried by Ray up to ``MAX_RETRIES`` times; an exception inside a cell is not
retried but returned as a failed outcome (:func:`eval.sweep_cell.run_cell_outcome`).

Started locally, the workers get this checkout and the current folder on their ``PYTHONPATH`` (so plugins and
an uninstalled checkout import there as in the driver). On a cluster, every node needs this package (``pip
install tta-runtime[sweep]``), the plugin modules and the data at the same paths; nothing is copied.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from eval.sweep import Cell
from eval.sweep_cell import cell_from_dict, run_cell_outcome

MAX_RETRIES = 2  # a cell whose worker dies runs at most 1 + MAX_RETRIES times
_REPO = Path(__file__).resolve().parents[1]


def import_ray():
    """Ray, or the one-line error naming the ``[sweep]`` extra."""
    from tta._extras import require

    return require("ray", "tta sweep (its cells run on Ray)")


def _cell_task(cell: dict[str, Any], plugins: list[str], threads: int,
               accel: dict[str, bool] | None) -> dict[str, Any]:
    return run_cell_outcome(cell_from_dict(cell), plugins=plugins, threads=threads, accel=accel)


class RayExecutor:
    """Submits cells as Ray tasks and yields their outcomes as they finish.

    ``address``: None starts Ray here (``num_cpus``: the CPUs it may use; default all), or uses the Ray this
    process already started; ``"auto"`` or ``HOST:PORT`` joins a cluster. ``cell_env``: extra environment
    variables for particular cells (by key), for tests and debugging. ``accel``: the pieces of the CPU fast path
    each CPU cell turns on (as the ``tta`` commands do; ``tta sweep`` passes its --no-accel/--accel-without
    choice), None for plain PyTorch.
    """

    def __init__(self, *, address: str | None = None, cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0,
                 threads: int = 1, plugins: Sequence[str] = (), num_cpus: int | None = None,
                 cell_env: Mapping[str, Mapping[str, str]] | None = None,
                 accel: Mapping[str, bool] | None = None) -> None:
        if cpus_per_cell <= 0 or gpus_per_cell < 0:
            raise ValueError("--cpus-per-cell must be > 0 and --gpus-per-cell >= 0")
        self.ray = import_ray()
        self.address = address
        self.cpus_per_cell, self.gpus_per_cell = cpus_per_cell, gpus_per_cell
        self.threads, self.plugins = threads, list(plugins)
        self.num_cpus = num_cpus
        self.cell_env = {k: dict(v) for k, v in (cell_env or {}).items()}
        self.accel = None if accel is None else dict(accel)
        self._started = False
        self._remote = None

    def __enter__(self) -> "RayExecutor":
        ray = self.ray
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                       "configure_logging": False}
            if self.address is None:
                options["num_cpus"] = self.num_cpus
            ray.init(address=self.address, **options)
            self._started = True
        if self.address is None:  # a local Ray does not grow: a cell asking for more than it has would wait forever
            resources = ray.cluster_resources()
            for name, wanted in (("CPU", self.cpus_per_cell), ("GPU", self.gpus_per_cell)):
                if wanted > resources.get(name, 0):
                    self.__exit__()
                    raise ValueError(f"each cell asks for {wanted:g} {name}(s) but this machine's Ray has "
                                     f"{resources.get(name, 0):g}; lower --{name.lower()}s-per-cell (or raise "
                                     "--num-cpus), or run on a cluster with --address")
        self._remote = ray.remote(max_calls=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_cell_task)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self.ray.shutdown()

    def _env(self, cell: Cell) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.address is None:  # local workers: import this checkout and the caller's modules as the driver does
            paths = [str(_REPO), os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.update(self.cell_env.get(cell.key, {}))
        return env

    def capacity(self) -> int:
        """How many cells the cluster can run at once now (at least 1)."""
        resources = self.ray.cluster_resources()
        fits = [int(resources.get("CPU", 0) // self.cpus_per_cell)]
        if self.gpus_per_cell > 0:
            fits.append(int(resources.get("GPU", 0) // self.gpus_per_cell))
        return max(1, min(fits))

    def run(self, cells: Sequence[Cell], on_start=None) -> Iterator[tuple[Cell, dict[str, Any]]]:
        """Yield (cell, outcome) as cells finish; at most :meth:`capacity` cells are submitted at a time, so
        those in flight are running. ``on_start(n_running)`` is called whenever that number changes."""
        ray = self.ray
        queue = list(cells)
        running: dict[Any, Cell] = {}
        while queue or running:
            while queue and len(running) < self.capacity():
                cell = queue.pop(0)
                ref = self._remote.options(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell,
                                           runtime_env={"env_vars": self._env(cell)}
                                           ).remote(cell.to_dict(), self.plugins, self.threads, self.accel)
                running[ref] = cell
            if on_start is not None:
                on_start(len(running))
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                cell = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as error:  # the worker died 1 + MAX_RETRIES times, or Ray itself failed
                    import traceback

                    outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}".splitlines()[0],
                               "traceback": traceback.format_exc()}
                yield cell, outcome
