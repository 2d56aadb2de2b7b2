"""Produce a stream's next batches in a background thread while the current one is adapted on.

Why: a corruption stream makes each batch on the fly (decoding, then the corruption, 0.02-0.5 ms per 32 px image
on CPU, far more at 224 px), and in a plain loop the model waits for it. PyTorch's own ops release the GIL, so a
producer thread overlaps the making of batch i + 1 with the adaptation on batch i (on a multi-core CPU, or with a
GPU doing the model's work). Batches are made by the same code in the same order, so results do not change.
With ``pin`` (for CUDA), each batch's images are copied to page-locked memory in the thread, so that the transfer
``x.to(device, non_blocking=True)`` can overlap too.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")

_END = object()


class _Failure:
    """An exception raised by the producer, handed to the consumer to raise at that point of the sequence."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[Item], depth: int = 2, transform: Callable[[Item], Item] | None = None) -> Iterator[Item]:
    """Iterate over ``items`` with up to ``depth`` of them made ahead by a background thread.

    ``depth=0`` iterates in the calling thread (no thread). ``transform`` (e.g. pinning memory) runs in the thread
    on each item. An exception raised while making an item is re-raised here at that item's position, with its own
    type and traceback. Closing the iterator early (``break``, an exception in the loop, garbage collection) stops
    the thread after the item it is making.
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    if depth == 0:
        for item in items:
            yield transform(item) if transform is not None else item
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        """Hand over a value, waiting for room; False once the consumer has gone."""
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set() or not put(transform(item) if transform is not None else item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(error))
            return
        put(_END)

    thread = threading.Thread(target=produce, name="tta-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = ready.get()
            if value is _END:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=60)
