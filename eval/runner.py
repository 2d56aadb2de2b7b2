"""The runner: joins an adapter factory and a stream, writes one record per finished segment, resumes.

Records are keyed by (method label, segment index, segment name) and carry the segment's round (a protocol with
several rounds numbers its segments through all of them, so resume needs nothing more). On a rerun with the same
results file, done segments are skipped. Inside a chain of segments without reset (continual, gradual, and every
round of a protocol with rounds), the adapter state after each segment is checkpointed atomically, so an
interrupted run continues from the last finished segment; if a checkpoint is missing, the chain is replayed
silently from its last reset (results are deterministic on CPU).

Mixed precision (``amp``): every adapter call runs under ``torch.autocast`` of the device with bfloat16 or float16
(gradient methods scale float16 losses on CUDA themselves, :class:`tta.base.GradientAdapter`); the metrics read the
logits in float32. ``channels_last`` puts each 4-D batch in that memory format (the model is the factory's to
convert, :func:`eval.corruption_benchmark.model_factory`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from eval import kill_points
from eval.metrics import CalibrationBins, online_error_curve
from eval.records import ResultsLog, remove_with_temporaries, replace_atomically
from streams.prefetch import prefetch
from tta.base import Adapted


@dataclass
class MethodRun:
    """One row of a results table: a label, a factory that builds a fresh adapter, the options to record."""

    label: str
    make_adapter: Callable[[], Adapted]
    options: dict[str, Any] = field(default_factory=dict)


#: ``--amp`` values and the autocast dtype each stands for.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str | None, device: torch.device | str) -> None:
    """Refuse an ``amp`` setting that is unknown, or that this torch cannot honour on ``device``: ``torch.autocast``
    turns itself off with a warning for a dtype the device type does not support, and a run would then be recorded
    as mixed precision while computing in float32."""
    if amp is None:
        return
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_DTYPES)} (or left out for float32), got {amp!r}")
    device_type = torch.device(device).type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning autocast gives when it turns itself off
        with torch.autocast(device_type, dtype=AMP_DTYPES[amp]):
            enabled = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == \
                AMP_DTYPES[amp]
    if not enabled:
        raise ValueError(f"--amp {amp}: torch {torch.__version__} cannot autocast to {AMP_DTYPES[amp]} on {device} "
                         f"(is the device there?); use --amp {'bf16' if amp == 'fp16' else 'fp16'} or leave --amp out")


def autocast(device: torch.device | str, amp: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` of ``device``'s type with the dtype ``amp`` names; a null context for None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])


def _save_checkpoint(path: Path, segment: int, adapter: Adapted) -> None:
    state = {"segment": segment, "state": adapter.state_dict()}
    replace_atomically(path, lambda handle: torch.save(state, handle))


def _load_checkpoint(path: Path, segment: int, adapter: Adapted) -> bool:
    """Load the adapter state saved after ``segment``; False when there is no usable checkpoint for it."""
    if not path.exists():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged checkpoint is not fatal: the chain is replayed instead
        return False
    if saved.get("segment") != segment:
        return False
    adapter.load_state_dict(saved["state"])
    return True


def _checkpoint_path(directory: Path, label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return directory / f"{safe}.pt"


class _SegmentResult:
    def __init__(self, n_domains: int) -> None:
        self.wrong: list[int] = []
        self.sizes: list[int] = []
        self.calibration = CalibrationBins()
        self.domain_wrong = torch.zeros(n_domains, dtype=torch.long)
        self.domain_count = torch.zeros(n_domains, dtype=torch.long)

    def update(self, logits: torch.Tensor, y: torch.Tensor, domain_index: torch.Tensor) -> None:
        wrong = (logits.argmax(1).cpu() != y)
        self.wrong.append(int(wrong.sum()))
        self.sizes.append(len(y))
        self.calibration.update(logits, y)
        self.domain_wrong.index_add_(0, domain_index, wrong.long())
        self.domain_count.index_add_(0, domain_index, torch.ones_like(domain_index))


def _pinned(batch):
    """The batch with its images in page-locked memory (CUDA copies from there can be asynchronous); a batch
    made on the GPU stays where it is."""
    if batch.x.device.type != "cpu":
        return batch
    return dataclasses.replace(batch, x=batch.x.pin_memory())


def _batches(stream, segment: int, progress: str | None, prefetch_depth: int = 0, pin: bool = False) -> Iterator:
    batches: Iterator = prefetch(stream.batches(segment), prefetch_depth, _pinned if pin else None)
    if progress is not None:
        batches = tqdm(batches, total=stream.num_batches(segment), desc=progress, leave=False, unit="batch")
    return batches


def _run_segment(adapters: dict[str, Adapted], stream, segment: int, device: torch.device,
                 progress: str | None, prefetch_depth: int = 0, amp: str | None = None,
                 channels_last: bool = False) -> dict[str, tuple[_SegmentResult, float]]:
    """Feed every batch of the segment to every adapter (each batch is produced, i.e. corrupted, once, up to
    ``prefetch_depth`` batches ahead in a background thread), each call under ``amp``'s autocast."""
    results = {label: _SegmentResult(len(stream.domains)) for label in adapters}
    seconds = dict.fromkeys(adapters, 0.0)
    for batch in _batches(stream, segment, progress, prefetch_depth, pin=device.type == "cuda"):
        x = batch.x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for label, adapter in adapters.items():
            start = time.perf_counter()
            with autocast(device, amp):
                logits = adapter(x).detach()
            logits = logits.float()  # float16/bfloat16 under autocast; the metrics work in float32
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[label] += time.perf_counter() - start
            results[label].update(logits.cpu(), batch.y, batch.domain_index)
    return {label: (results[label], seconds[label]) for label in adapters}


def run_methods(runs: list[MethodRun], stream, log: ResultsLog, *, context: dict[str, Any], checkpoint_dir: Path,
                device: torch.device | str = "cpu", progress: bool = True,
                prefetch: int | None = None, amp: str | None = None,
                channels_last: bool = False) -> list[dict[str, Any]]:
    """Evaluate several methods side by side over every segment; returns the records written now.

    ``amp``: ``"bf16"`` or ``"fp16"`` runs every adapter call under that autocast (:data:`AMP_DTYPES`; checked
    with :func:`check_amp`), None in float32. ``channels_last``: batches in channels_last memory format (the
    adapters' models should be too). Neither is recorded here: the caller's ``context`` says so.

    ``prefetch``: batches made ahead in a background thread (0: made in the loop; None: 2 on CUDA, where the CPU is
    otherwise idle while the GPU adapts, 0 on CPU, where the thread would compete with the model's own threads).
    The results do not depend on it.

    Segment by segment, every method that has not finished the segment gets the same batches. Before a segment
    that continues a chain (no reset), a method's adapter must hold its state after the previous segment: it
    does when it ran that segment in this process; otherwise its checkpoint is loaded, or the chain is replayed.
    """
    device = torch.device(device)
    check_amp(amp, device)
    if prefetch is None:
        prefetch = 2 if device.type == "cuda" else 0
    timings = ResultsLog(log.path.with_name("timings.jsonl"))
    done = {(r["method"], r["segment"]) for r in log.read() if r.get("protocol") == context.get("protocol")}
    segments = stream.segments
    pending = [run for run in runs if any((run.label, s) not in done for s in range(len(segments)))]
    adapters = {run.label: run.make_adapter() for run in pending}
    by_label = {run.label: run for run in pending}
    position = dict.fromkeys(adapters, -1)  # each adapter holds its state after this segment (-1: source)
    chain_start = 0
    written = []
    for s, segment in enumerate(segments):
        if segment.reset_before:
            chain_start = s
        active = {label: a for label, a in adapters.items() if (label, s) not in done}
        for label, adapter in active.items():
            if segment.reset_before:
                adapter.reset()
            elif position[label] != s - 1 and not _load_checkpoint(_checkpoint_path(checkpoint_dir, label), s - 1,
                                                                    adapter):
                adapter.reset()  # replay the chain from its last reset, recording nothing
                for replay in range(chain_start, s):
                    _run_segment({label: adapter}, stream, replay, device,
                                 f"{label} {segments[replay].name} (replay)" if progress else None, prefetch,
                                 amp, channels_last)
        if not active:
            continue
        results = _run_segment(active, stream, s, device, f"{segment.name} [{s + 1}/{len(segments)}]"
                               if progress else None, prefetch, amp, channels_last)
        for label, (result, seconds) in results.items():
            position[label] = s
            if s + 1 < len(segments) and not segments[s + 1].reset_before:
                _save_checkpoint(_checkpoint_path(checkpoint_dir, label), s, active[label])
                kill_points.reached("checkpoint")
            record = _record(by_label[label], stream, s, result, context)
            if hasattr(active[label], "resets"):
                record["guard_resets"] = active[label].resets
            log.append(record, kill_points_here=True)
            n = sum(result.sizes)
            timings.append({"method": label, "protocol": context.get("protocol"), "segment": s,
                            "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1) if seconds else None})
            written.append(record)
    for run in runs:  # every label: a kill after the last record can leave a finished method's checkpoint
        remove_with_temporaries(_checkpoint_path(checkpoint_dir, run.label))
    return written


def _record(run: MethodRun, stream, s: int, result: _SegmentResult, context: dict[str, Any]) -> dict[str, Any]:
    """The deterministic record of one finished segment (timings go to timings.jsonl, so that the same command
    with the same seed gives an identical results.jsonl on CPU)."""
    segment = stream.segments[s]
    n = sum(result.sizes)
    record: dict[str, Any] = {
        **context,
        "method": run.label,
        "segment": s,
        "round": getattr(segment, "round", 0),  # 0-based round of the protocol's domain sequence
        "domain": segment.name,
        "n": n,
        "error": sum(result.wrong) / n if n else float("nan"),
        "ece": result.calibration.ece(),
        "online_error": online_error_curve(result.wrong, result.sizes),
        "reset_before": segment.reset_before,
        "options": run.options,
    }
    if len(segment.domains) == 1:
        record["corruption"] = segment.domains[0].corruption or segment.domains[0].name
        record["severity"] = segment.domains[0].severity
    else:  # mixed: per-domain errors from the samples' domain labels
        record["corruption"] = "mixed"
        record["severity"] = None
        record["per_domain_error"] = {
            stream.domains[d].name: float(result.domain_wrong[d] / result.domain_count[d])
            for d in range(len(stream.domains)) if result.domain_count[d] > 0
        }
    return record
