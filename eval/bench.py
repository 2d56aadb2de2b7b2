"""Measurement core of ``tta bench``: speed, memory and pass counts of each method against plain inference.

Everything is measured in one process and one run, so ratios compare like with like:

- Timing: every row (plain inference, each method, the reference-style rows) holds its own copy of the model;
  after warm-up, each repeat times one batch of every row, interleaved (the order rotates each repeat), so a
  change in machine load hits all rows alike. ``ratio_to_plain`` = median ms of the row / median ms of plain.
- Passes: a forward hook on the model counts forward samples; gradient hooks on its trainable parameters count
  a backward pass when gradients reach the model after a forward (one un-timed counting batch, hooks removed
  before timing).
- Memory (CPU): in a fresh process per row (``memory="subprocess"``; as many at once as there are CPU cores,
  each process's peak being its own; forked from a server process that has imported the runtime and nothing else,
  or a new interpreter where the platform cannot fork): over ``MEMORY_BATCHES`` batches, the peak RSS (the kernel's
  counter reset before each batch through ``/proc/self/clear_refs``) minus the RSS before the row was built
  (model loaded, inputs made, cafa's statistics computed, code paged in by a throwaway 2-image run); the median
  over batches is reported. In-process RSS would be distorted by the rows measured before (a process-wide
  high-water mark, memory freed to the allocator but not to the system). CUDA: in process, ``max_memory_allocated``
  after ``reset_peak_memory_stats``, minus the allocation before the row was built.
- Tensor memory (CPU, ``peak_tensor_mb``): in the same subprocess, the peak bytes held in PyTorch's CPU tensors
  from the profiler's allocation records, above those before the row was built: CUDA's measure, on CPU. The RSS
  adds what glibc's heap does with freed blocks (holes between live maps, pages kept), which depends on the order
  of allocations more than on their sizes; the tensor figure is what the method itself holds.
- Reset: median ms of ``reset()``, after the timed batches; its cost does not depend on the data.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import queue
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import tta
from eval.bench_reference import ReferenceNorm, ReferenceTent
from eval.environment import versions
from eval.models import NormalizedModel, load_model, model_entry
from eval.runner import autocast, check_amp
from tta import accel
from tta.accel.allocator import release_free_memory, settings as allocator_settings
from tta.base import PARAMETER_FREE

PLAIN = "plain"
REFERENCE_ROWS = {"norm_ref": "norm (reference)", "tent_ref": "tent (reference)",
                  "tent_ref_frozen": "tent (reference, frozen)"}
ALL_REFERENCES = ["norm_ref", "tent_ref"]


def default_methods() -> list[str]:
    """The methods of the default rows: every registered method with one forward pass per batch (forward-only
    and one-step methods); multi-pass methods (augmentations, teachers, SAM) only on request."""
    return [name for name in tta.methods() if not tta.registry.method_class(name).multi_pass]


def row_names(methods: str | list[str]) -> list[str]:
    """Rows to measure, plain first: ``default`` = the single-pass methods (:func:`default_methods`) plus the
    reference rows ``norm_ref`` and ``tent_ref``; ``all`` = every registered method plus those reference rows;
    ``tent_ref_frozen`` (reference tent with the other parameters frozen) only when named."""
    parts = [methods] if isinstance(methods, str) else list(methods)
    given = [m.strip() for part in parts for m in part.split(",") if m.strip()]
    names: list[str] = []
    for name in given:
        expanded = ([*tta.methods(), *ALL_REFERENCES] if name == "all" else
                    [*default_methods(), *ALL_REFERENCES] if name == "default" else [name])
        for item in expanded:
            if item in REFERENCE_ROWS.values():  # accept the display name too
                item = next(k for k, v in REFERENCE_ROWS.items() if v == item)
            if item not in (PLAIN, *tta.methods(), *REFERENCE_ROWS):
                raise ValueError(f"unknown method {item!r}; choose from: default, all, {', '.join(tta.methods())}, "
                                 f"{', '.join(REFERENCE_ROWS)} (plain inference is always measured)")
            label = REFERENCE_ROWS.get(item, item)
            if label not in names and label != PLAIN:
                names.append(label)
    return [PLAIN, *names]


@dataclass
class BenchConfig:
    """What ``tta bench`` measures and how; every field is written to bench.json as ``settings``."""

    model: str = "cifar10_resnet20"
    weights: str | None = None
    methods: list[str] = field(default_factory=lambda: ["default"])
    batch_size: int = 200
    device: str = "cpu"
    # autocast of every row, plain included: "bf16", "fp16" (gradient methods scale the loss on CUDA; the reference
    # rows take unscaled steps, as paper code does) or None; True and False, as bench.json recorded them before
    # fp16 existed, mean "bf16" and None.
    amp: str | bool | None = None
    channels_last: bool = False
    compile: bool = False
    repeats: int = 5  # a quick look (its wall time: docs/performance.md); the published tables use 30
    warmup: int = 3
    threads: int | None = None
    seed: int = 0
    check_inputs: bool = True
    memory: str = "subprocess"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.amp, bool):
            self.amp = "bf16" if self.amp else None

    def validate(self) -> list[str]:
        """Check the settings (clear errors before any work) and return the rows to measure."""
        rows = row_names(self.methods)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        check_amp(self.amp, self.device)
        if self.batch_size < 2:
            raise ValueError("--batch-size must be at least 2 (norm, tent and cafa need batch statistics)")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("--repeats must be at least 1 and --warmup at least 0")
        if self.memory not in ("subprocess", "inprocess", "off"):
            raise ValueError(f"memory must be subprocess, inprocess or off, got {self.memory!r}")
        return rows


# -- model, inputs, rows ------------------------------------------------------------------------------------------
def build_model(config: BenchConfig) -> tuple[nn.Module, str]:
    """The model on its device (eval mode) and a note on its weights; without weights, a seeded random init."""
    entry = model_entry(config.model)
    if config.weights is not None:
        model, note = load_model(config.model, config.weights), f"weights: {config.weights}"
    else:
        torch.manual_seed(config.seed)
        model = NormalizedModel(entry.build(), entry.mean, entry.std).eval()
        note = "random initialisation (no --weights): timing and memory only, predictions are meaningless"
    model = model.to(config.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, note


def make_inputs(config: BenchConfig, count: int = 4) -> list[torch.Tensor]:
    """``count`` batches of uniform random images of the model's input size, seeded (cycled over the repeats)."""
    size = model_entry(config.model).input_size
    generator = torch.Generator().manual_seed(config.seed)
    batches = [torch.rand(config.batch_size, 3, size, size, generator=generator) for _ in range(count)]
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    return [x.to(config.device).contiguous(memory_format=memory_format) for x in batches]


def random_source_options(name: str, model: nn.Module, config: BenchConfig) -> dict[str, Any]:
    """What a method that needs source data computes from it (its class's ``source_options``), here from seeded
    random images with labels cycling over the classes (timing only): two batches, or enough images for every
    class to appear twice. {} for a source-free method or a reference row."""
    if name not in tta.methods() or tta.registry.method_class(name).source_data is None:
        return {}
    entry = model_entry(config.model)
    n = max(2 * config.batch_size, 2 * entry.num_classes + 1)
    generator = torch.Generator().manual_seed(config.seed + 1)
    labels = torch.arange(n) % entry.num_classes
    batches = []
    for start in range(0, n, config.batch_size):
        y = labels[start:start + config.batch_size]
        x = torch.rand(len(y), 3, entry.input_size, entry.input_size, generator=generator).to(config.device)
        batches.append((x, y))
    options = tta.method_options(name)(**config.method_options.get(name, {}))
    return tta.registry.method_class(name).source_options(model, batches, options)


@dataclass
class Row:
    """One measured row: the module whose passes are counted, a call ``x -> logits``, and ``reset`` if any."""

    name: str
    kind: str  # plain | tta | reference
    module: nn.Module
    call: Callable[[torch.Tensor], torch.Tensor]
    reset: Callable[[], None] | None
    options: dict[str, Any]


def _autocast(config: BenchConfig) -> contextlib.AbstractContextManager:
    return autocast(config.device, config.amp)  # type: ignore[arg-type]  # a str or None after __post_init__


def build_row(name: str, model: nn.Module, config: BenchConfig, source: dict[str, Any] | None = None) -> Row:
    """Wrap ``model`` (used in place) for one row. Calls run as an evaluation loop would: plain inference under
    ``torch.inference_mode()``, adapters and references under ``torch.no_grad()`` (gradient methods enable
    gradients inside, as tent's ``forward_and_adapt`` does). ``source``: the options a method computes from source
    data (:func:`random_source_options`)."""
    if name == PLAIN:
        model.eval()

        def plain(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), _autocast(config):
                return model(x)

        return Row(name, "plain", model, plain, None, {})
    if name in REFERENCE_ROWS.values():
        key = next(k for k, v in REFERENCE_ROWS.items() if v == name)
        if key == "norm_ref":
            wrapped: nn.Module = ReferenceNorm(model)
            options: dict[str, Any] = {}
        else:
            given = config.method_options.get("tent", {})
            tent_options = tta.method_options("tent")(**given)
            wrapped = ReferenceTent(model, tent_options, freeze_other_params=key == "tent_ref_frozen")
            options = _public_options(tent_options)
        kind = "reference"
    else:
        given = dict(config.method_options.get(name, {}))
        if config.weights is None:
            # A randomly initialised model is uncertain on every sample, so entropy and confidence filters would
            # select none and the row would time a forward pass only: open them (the method's declaration).
            given = {**tta.registry.method_class(name).select_all_options, **given}
        given.setdefault("check_inputs", config.check_inputs)
        given.update(source or {})
        wrapped = tta.adapt(model, name, **given)
        options = _public_options(wrapped.options)
        kind = "tta"

    def adapt(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _autocast(config):
            return wrapped(x)

    return Row(name, kind, wrapped.model, adapt, wrapped.reset, options)


def _public_options(options: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if isinstance(v, (int, float, str, bool, type(None)))}


# -- pass counting ------------------------------------------------------------------------------------------------
class PassCounter:
    """Counts samples through the model: forward by a forward hook; backward by gradient hooks on the trainable
    parameters (a forward whose graph later delivers gradients to the model counts as one backward pass)."""

    def __init__(self, model: nn.Module) -> None:
        self.forward_samples = 0
        self.backward_samples = 0
        self._pending = 0
        self._handles = [model.register_forward_hook(self._on_forward)]
        self._handles += [p.register_hook(self._on_gradient) for p in model.parameters() if p.requires_grad]

    def _on_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        n = len(args[0])
        self.forward_samples += n
        self._pending = n if torch.is_grad_enabled() else 0

    def _on_gradient(self, grad: torch.Tensor) -> None:
        self.backward_samples += self._pending
        self._pending = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def count_passes(row: Row, x: torch.Tensor) -> tuple[float, float]:
    """(forward, backward) passes per sample over one batch, counted with hooks."""
    counter = PassCounter(row.module)
    try:
        row.call(x)
    finally:
        counter.remove()
    return counter.forward_samples / len(x), counter.backward_samples / len(x)


# -- timing -------------------------------------------------------------------------------------------------------
def _sync(config: BenchConfig) -> None:
    if config.device.startswith("cuda"):
        torch.cuda.synchronize(config.device)


def timed(fn: Callable[[], Any], config: BenchConfig) -> float:
    """Milliseconds of one call (synchronised on CUDA)."""
    _sync(config)
    start = time.perf_counter()
    fn()
    _sync(config)
    return (time.perf_counter() - start) * 1e3


def compile_row(row: Row) -> None:
    """``torch.compile`` the row's model forward in place (module.compile keeps hooks and parameters)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    row.module.compile()


def interleaved_rounds(rows: list[Any], repeats: int, time_one: Callable[[Any, int], float],
                       required: Callable[[Any], bool], errors: dict[str, str] | None,
                       log: Callable[[str], None], label: str = "round") -> dict[str, list[float]]:
    """Per-row times, interleaved: each of ``repeats`` rounds times every live row once (``time_one(row, round)``,
    rows named by ``row.name``), the order rotated each round, so a change of machine load hits all rows alike;
    ``log`` gets a line per round. A row that raises is dropped from the remaining rounds and its error stored in
    ``errors``; a ``required`` row (plain inference), or any row when ``errors`` is None, re-raises."""
    times: dict[str, list[float]] = {row.name: [] for row in rows}
    live = list(rows)
    for r in range(repeats):
        shift = r % len(live)
        started = time.perf_counter()
        for row in live[shift:] + live[:shift]:
            try:
                times[row.name].append(time_one(row, r))
            except Exception as error:
                if required(row) or errors is None:
                    raise
                errors[row.name] = describe_error(error, f"round {r + 1}")
                live.remove(row)
                del times[row.name]
        log(f"{label} {r + 1}/{repeats}: {len(live)} rows in {time.perf_counter() - started:.1f} s")
    return times


def time_rows(rows: list[Row], inputs: list[torch.Tensor], config: BenchConfig,
              errors: dict[str, str] | None = None,
              log: Callable[[str], None] = lambda s: None) -> dict[str, list[float]]:
    """Per-row batch times (ms) of :func:`interleaved_rounds`, round ``r`` on ``inputs[r % len(inputs)]``; plain
    re-raises."""
    def time_one(row: Row, r: int) -> float:
        x = inputs[r % len(inputs)]
        return timed(lambda: row.call(x), config)

    return interleaved_rounds(rows, config.repeats, time_one, lambda row: row.name == PLAIN, errors, log,
                              "timed round")


def describe_error(error: BaseException, where: str = "") -> str:
    """The first line of an error (at most 300 characters), and where it happened."""
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return f"{text} ({where})" if where else text


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# -- memory -------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


#: Batches each memory measurement runs: the first creates what a method keeps between batches (optimizer moments,
#: moving averages, memory banks), the other two are steady; the median of the three peaks is reported.
MEMORY_BATCHES = 3


def _release_free_memory() -> None:
    """Collect garbage and hand free memory back to the system (the tensor cache's free blocks, glibc's free heap
    pages through ``malloc_trim``), so that memory allocated afterwards shows up in the RSS instead of reusing pages
    the process already holds."""
    gc.collect()
    release_free_memory()


def _warmed_up_setup(config: BenchConfig, name: str) -> tuple[nn.Module, list[torch.Tensor], Any]:
    """The model, inputs and source-data options for measuring one row's memory, after a throwaway copy of the row has
    run a 2-image batch (so code pages and one-time runtime allocations are not counted as the row's)."""
    model, _ = build_model(config)
    inputs = make_inputs(config)
    source = random_source_options(name, model, config)
    build_row(name, copy.deepcopy(model), config, source).call(inputs[0][:2])
    return model, inputs, source


def measure_row_memory(config: BenchConfig, name: str) -> dict[str, Any]:
    """Peak memory increase (MB) of running one row for ``MEMORY_BATCHES`` batches, from before the adapter is
    built; on CPU also the tensor peak (:func:`measure_row_tensors`) of a second copy of the row.

    Before the baseline, a throwaway copy of the row runs a 2-image batch, so that code pages and one-time
    runtime allocations (kernels, autograd, optimizer code: tens of MB of RSS) are not counted as the row's memory.
    """
    model, inputs, source = _warmed_up_setup(config, name)
    cuda = config.device.startswith("cuda")
    untouched = None if cuda else copy.deepcopy(model)  # for the tensor peak (the row adapts ``model`` in place)
    batches = MEMORY_BATCHES
    _release_free_memory()
    if cuda:
        torch.cuda.synchronize(config.device)
        baseline = torch.cuda.memory_allocated(config.device)
    else:
        baseline = _status_kb("VmRSS")
        if baseline is None:
            return {"peak_memory_mb": None, "memory_method": "unavailable (no /proc/self/status)"}
        baseline *= 1024
    row = build_row(name, model, config, source)
    peaks, exact = [], True
    for i in range(batches):  # the peak of each batch, from the same baseline; the median is reported
        if cuda:
            torch.cuda.reset_peak_memory_stats(config.device)
        else:
            release_free_memory()  # garbage was collected before the baseline; a batch's graph is freed on return
            exact = _reset_peak_rss() and exact
        row.call(inputs[i % len(inputs)])
        if cuda:
            torch.cuda.synchronize(config.device)
            peaks.append(torch.cuda.max_memory_allocated(config.device) - baseline)
        else:
            peaks.append(_status_kb("VmHWM") * 1024 - baseline)
    if cuda:
        method = "cuda max_memory_allocated - allocated before the adapter was built"
    else:
        method = ("peak RSS (VmHWM reset before each batch) - RSS before the adapter was built" if exact else
                  "peak RSS (VmHWM, not resettable: process-wide high-water mark) - RSS before the adapter was built")
    result = {"peak_memory_mb": max(statistics.median(peaks), 0) / 2**20, "peak_memory_max_mb": max(peaks) / 2**20,
              "memory_batches": batches, "memory_method": method, "baseline_mb": baseline / 2**20}
    if cuda:  # the caching allocator's figure already counts tensor bytes
        result.update(peak_tensor_mb=max(peaks) / 2**20, tensor_method=method)
    else:
        del row, model
        gc.collect()
        result.update(measure_row_tensors(config, name, (untouched, inputs, source)))
    return result


def peak_tensor_bytes(run: Callable[[], None]) -> int | None:
    """Peak of the bytes held in CPU tensors while ``run()`` runs, above what they held when it started.

    From the profiler's allocation records (``profile_memory=True``): every allocation and free of PyTorch's CPU
    allocator, summed in time order. This is the CPU counterpart of CUDA's ``max_memory_allocated``: what the
    computation holds, whatever the allocator does with freed blocks (the RSS also counts the heap's holes and pages
    freed but kept). None where the profiler's records cannot be read.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        cpu = torch._C._autograd.DeviceType.CPU
        changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]" and e.device_type() == cpu)
    except (AttributeError, RuntimeError):  # the profiler's private records changed shape
        return None
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return peak


def measure_row_tensors(config: BenchConfig, name: str,
                        setup: tuple[nn.Module, list[torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """Peak bytes in CPU tensors (see :func:`peak_tensor_bytes`) while the row is built and runs ``MEMORY_BATCHES``
    batches, above those held before it was built, as CUDA's figure is. ``setup``: the (model, inputs, source
    options) of :func:`_warmed_up_setup` when the caller has them (the model is adapted in place)."""
    model, inputs, source = setup if setup is not None else _warmed_up_setup(config, name)

    def run() -> None:
        row = build_row(name, model, config, source)
        for i in range(MEMORY_BATCHES):
            row.call(inputs[i % len(inputs)])

    peak = peak_tensor_bytes(run)
    return {"peak_tensor_mb": None if peak is None else peak / 2**20,
            "tensor_method": "profiler allocation records: peak bytes in CPU tensors - bytes before the row was built"}


class MemoryServer:
    """A Python process that has imported the runtime and run nothing; it forks one child per row measured, so each
    row starts as a fresh process would, without paying for the imports again (where ``os.fork`` exists).

    Protocol: one JSON spec per line on its stdin (see :func:`probe_spec`), one JSON result per line on its stdout.
    The server is single-threaded and never runs a model, so forking it is safe.
    """

    def __init__(self) -> None:
        code = "import sys; from eval.bench import serve_memory; sys.exit(serve_memory())"
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=_child_environment())

    def measure(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            self.process.stdin.write(json.dumps({"spec": spec, "timeout": timeout}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            return {"peak_memory_mb": None, "memory_method": "subprocess failed: the memory server stopped"}
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve_memory() -> int:
    """The loop of :class:`MemoryServer`: for each spec, fork a child that measures the row (its output discarded:
    the profiler prints lines of its own) and writes the result on a pipe; a child that dies or overruns its
    timeout is reported as failed."""
    import select
    import signal

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer, exit without running the server's cleanup
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                result = probe_spec(request["spec"])
            except BaseException as error:
                result = {"peak_memory_mb": None,
                          "memory_method": f"subprocess failed: {type(error).__name__}: {error}"}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(write_end, data):]
            os._exit(0)
        os.close(write_end)
        chunks, deadline, timed_out = [], time.monotonic() + request["timeout"], False
        while True:
            ready, _, _ = select.select([read_end], [], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        if timed_out:
            result = {"peak_memory_mb": None, "memory_method": f"subprocess timed out after {request['timeout']:.0f} s"}
        elif chunks:
            result = json.loads(b"".join(chunks))
        else:
            how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit code {os.waitstatus_to_exitcode(status)}")
            result = {"peak_memory_mb": None, "memory_method": f"subprocess failed: {how}"}
        print(json.dumps(result), flush=True)
    return 0


def _child_environment() -> dict[str, str]:
    """The environment of a memory process: this one's, with this repository on the import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}


def probe_memory(config: BenchConfig, name: str, timeout: float = 900.0,
                 server: MemoryServer | None = None) -> dict[str, Any]:
    """:func:`measure_row_memory` in a fresh process (CPU), so no earlier row distorts the RSS: forked by
    ``server`` when given, else a new interpreter."""
    pieces = {piece: on for piece, on in accel.state().items() if piece in accel.PIECES}
    spec = {"config": asdict(config), "row": name, "accel": pieces if any(pieces.values()) else None}
    if server is not None:
        return server.measure(spec, timeout)
    return _probe_in_new_interpreter(spec, timeout)


def _probe_in_new_interpreter(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """:func:`probe_main` in a new Python interpreter (where there is no fork server)."""
    code = "import sys; from eval.bench import probe_main; sys.exit(probe_main())"
    env = _child_environment()
    try:
        done = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"peak_memory_mb": None, "memory_method": f"subprocess timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"peak_memory_mb": None, "memory_method": f"subprocess failed: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """One row's memory in this (fresh) process: ``spec`` is ``{"config", "row", "accel"}`` (``accel``: the pieces
    of :mod:`tta.accel` the parent had on, or None)."""
    config = BenchConfig(**spec["config"])
    if spec.get("accel"):
        accel.enable(**spec["accel"])  # the same fast path as the parent
    if config.threads:
        torch.set_num_threads(config.threads)
    return measure_row_memory(config, spec["row"])


def probe_main() -> int:
    """Entry of the memory subprocess in a new interpreter: reads the spec of :func:`probe_spec` as JSON on stdin,
    prints the result as JSON."""
    print(json.dumps(probe_spec(json.loads(sys.stdin.read()))))
    return 0


# -- the whole run ------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Facts about this machine beyond :func:`eval.environment.versions` (``tensor_cache``: the caching CPU
    allocator's threshold and bound while installed, else None)."""
    cpu = None
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average": load, "tensor_cache": allocator_settings(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every row; returns ``{"records": [...], "settings", "weights", "versions", "machine", "date"}``."""
    names = config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = machine()
    base, weights_note = build_model(config)
    inputs = make_inputs(config)
    log(f"model {config.model}, batch {config.batch_size}, {config.device}, {weights_note}")

    rows: list[Row] = []
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        record: dict[str, Any] = {"method": name, "error": None}
        records[name] = record
        try:
            row = build_row(name, copy.deepcopy(base), config, random_source_options(name, base, config))
            record.update(kind=row.kind, options=row.options)
            record["forward_per_sample"], record["backward_per_sample"] = count_passes(row, inputs[0])
            if config.compile:
                compile_row(row)
            first = [timed(lambda: row.call(inputs[0]), config)]
            first += [timed(lambda: row.call(inputs[i % len(inputs)]), config)
                      for i in range(1, config.warmup)]
            record["first_batch_ms"] = first[0]
            rows.append(row)
            log(f"{name}: ready (first batch {first[0]:.0f} ms{', compiled' if config.compile else ''})")
        except Exception as error:  # a row that cannot run (e.g. compile failure) is reported, not fatal
            if name == PLAIN:
                raise
            record["error"] = describe_error(error, "set-up, pass counting or warm-up")
            log(f"{name}: failed: {record['error']}")

    log(f"timing {len(rows)} rows x {config.repeats} repeats, interleaved")
    errors: dict[str, str] = {}
    times = time_rows(rows, inputs, config, errors, log)
    for name, error in errors.items():
        records[name]["error"] = error
        log(f"{name}: failed while timed: {error}")
    rows = [row for row in rows if row.name not in errors]
    plain_ms = statistics.median(times[PLAIN])
    for row in rows:
        ms = times[row.name]
        paired = [t / p for t, p in zip(ms, times[PLAIN])]
        median = statistics.median(ms)
        records[row.name].update(
            ms_per_batch=median, images_per_s=config.batch_size / median * 1e3, ratio_to_plain=median / plain_ms,
            ms_p25=quantile(ms, 0.25), ms_p75=quantile(ms, 0.75), ms_min=min(ms), ms_max=max(ms),
            ratio_paired=statistics.median(paired), ratio_paired_p25=quantile(paired, 0.25),
            ratio_paired_p75=quantile(paired, 0.75), ms_all=ms)
        if row.reset is not None:
            reset_ms = [timed(row.reset, config) for _ in range(max(config.repeats, 5))]
            records[row.name].update(reset_ms=statistics.median(reset_ms),
                                     reset_ratio_to_batch=statistics.median(reset_ms) / median)
    del rows
    gc.collect()

    measure_memory(config, records, log)
    plain_mb = records[PLAIN].get("peak_memory_mb")
    plain_tensor_mb = records[PLAIN].get("peak_tensor_mb")
    for record in records.values():
        record.setdefault("peak_memory_mb", None)
        record.setdefault("peak_tensor_mb", None)
        mb, tensor_mb = record["peak_memory_mb"], record["peak_tensor_mb"]
        record["memory_ratio_to_plain"] = mb / plain_mb if mb is not None and plain_mb else None
        record["tensor_ratio_to_plain"] = (tensor_mb / plain_tensor_mb if tensor_mb is not None and plain_tensor_mb
                                           else None)
        if mb is not None and record.get("baseline_mb") is not None:
            record["peak_total_mb"] = record["baseline_mb"] + mb  # the process (CPU) / allocated (CUDA) peak
        if config.compile and mb is not None:
            record["memory_method"] += " (eager: not compiled)"
        for key in ("ms_per_batch", "images_per_s", "ratio_to_plain", "forward_per_sample", "backward_per_sample",
                    "reset_ms", "reset_ratio_to_batch", "first_batch_ms"):
            record.setdefault(key, None)
    result = {"records": list(records.values()), "settings": {**asdict(config), "rows": names},
              "accel": accel.state(),
              "weights": weights_note, "versions": versions(), "machine": {"start": started, "end": machine()},
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    result["goals"] = check_goals(result)
    return result


def measure_memory(config: BenchConfig, records: dict[str, dict[str, Any]], log: Callable[[str], None]) -> None:
    """Peak memory of every row that ran, into its record; a line per row as each finishes. CPU subprocesses run
    as many at once as there are cores (each measures its own peak, so they do not disturb one another)."""
    names = [name for name, record in records.items() if config.memory != "off" and not record["error"]]
    if not names:
        return
    if config.memory == "subprocess" and not config.device.startswith("cuda"):
        from concurrent.futures import ThreadPoolExecutor, as_completed

        workers = min(len(names), os.cpu_count() or 1)
        # Side by side, the processes would oversubscribe the cores with torch's default thread count: one thread
        # each unless --threads says otherwise (the peaks do not depend on it beyond a few per-thread buffers).
        probe_config = config if config.threads else replace(config, threads=1)
        log(f"memory: {len(names)} rows, each in a fresh process ({probe_config.threads} thread"
            f"{'s' if probe_config.threads > 1 else ''} each)")
        servers: queue.Queue[MemoryServer | None] = queue.Queue()
        for _ in range(workers):  # a server per worker where processes can fork, else a new interpreter per row
            servers.put(MemoryServer() if hasattr(os, "fork") else None)

        def probe(name: str) -> dict[str, Any]:
            server = servers.get()
            try:
                return probe_memory(probe_config, name, server=server)
            finally:
                servers.put(server)

        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(probe, name): name for name in names}
                for done, future in enumerate(as_completed(futures), 1):
                    records[futures[future]].update(future.result())
                    log(f"memory {done}/{len(names)}: {futures[future]}")
        finally:
            while not servers.empty():
                server = servers.get()
                if server is not None:
                    server.close()
        return
    for done, name in enumerate(names, 1):
        records[name].update(measure_row_memory(config, name))
        if config.memory == "inprocess" and not config.device.startswith("cuda"):
            records[name]["memory_method"] += " (in process: earlier rows may hide part of the peak)"
        log(f"memory {done}/{len(names)}: {name}")


# -- goals ---------------------------------------------------------------------------------------------------------
# forward-only methods (they update nothing; source aside): at most 1.15x plain inference; one-step methods on norm
# affine parameters: at most 2.5x, and faster than the reference-style tent in the same run.
GOALS = {"forward_only_ratio": 1.15, "gradient_ratio": 2.5, "reset_fraction": 0.01, "gradient_memory_ratio": 3.0}


def _paired_median(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    """Median over the timed rounds of ``numerator / denominator`` (each round times every row once, close in
    time, so a change of machine load cancels); the ratio of the two medians for records without ``ms_all``."""
    a, b = numerator.get("ms_all"), denominator.get("ms_all")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return numerator["ms_per_batch"] / denominator["ms_per_batch"]


def check_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each with the measured value and whether it is met (None where not measured).

    Time ratios are paired: the median over rounds of the per-round ratio (``ratio_paired``), not the ratio of the
    medians (``ratio_to_plain``), which compares medians taken in different rounds and so moves with the load (in
    one run on a shared 2-core machine, ``source``, which does no work beyond plain inference, came out 1.07x by
    medians and 1.02x paired)."""
    by_name = {r["method"]: r for r in result["records"]}
    references = {label: by_name[label] for label in (REFERENCE_ROWS["tent_ref"], REFERENCE_ROWS["tent_ref_frozen"])
                  if by_name.get(label, {}).get("ms_per_batch") is not None}
    goals = []

    def add(goal: str, value: float | None, met: bool | None, unit: str = "x") -> None:
        shown = "-" if value is None else (f"{100 * value:.2f} %" if unit == "%" else f"{value:.2f}x")
        goals.append({"goal": goal, "value": value, "shown": shown, "met": met})

    for name, record in by_name.items():
        if record.get("kind") != "tta" or record.get("ratio_to_plain") is None:
            continue
        ratio = record.get("ratio_paired", record["ratio_to_plain"])
        cls = tta.registry.method_class(name)
        if cls.updates in PARAMETER_FREE and not cls.multi_pass and name != "source":
            add(f"{name} <= {GOALS['forward_only_ratio']:.2f}x plain", ratio, ratio <= GOALS["forward_only_ratio"])
        if cls.updates == "norm affine" and not cls.multi_pass:
            add(f"{name} <= {GOALS['gradient_ratio']}x plain", ratio, ratio <= GOALS["gradient_ratio"])
            for label, reference in references.items():
                speedup = _paired_median(reference, record)
                add(f"{name} faster than {label}: speedup", speedup, speedup > 1.0)
            mem = record.get("memory_ratio_to_plain")
            cuda = str(result.get("settings", {}).get("device", "cpu")).startswith("cuda")
            add(f"{name} peak memory <= {GOALS['gradient_memory_ratio']:.0f}x plain"
                + ("" if cuda else " (RSS)"), mem, None if mem is None else mem <= GOALS["gradient_memory_ratio"])
            tensors = record.get("tensor_ratio_to_plain")
            if not cuda:  # on CUDA the figure above already counts tensor bytes
                add(f"{name} peak tensor memory <= {GOALS['gradient_memory_ratio']:.0f}x plain", tensors,
                    None if tensors is None else tensors <= GOALS["gradient_memory_ratio"])
        if record.get("reset_ratio_to_batch") is not None and name != "source":
            fraction = record["reset_ratio_to_batch"]
            add(f"{name} reset <= 1 % of a batch", fraction, fraction <= GOALS["reset_fraction"], unit="%")
    return goals
