"""Batches made ahead in a background thread: same items in the same order, errors where they happened, the
thread stopped when the loop ends early, and runner results that do not depend on it."""
from __future__ import annotations

import threading

import pytest
import torch

from eval.records import ResultsLog
from eval.runner import _pinned, run_methods
from streams.prefetch import prefetch
from tests.test_eval_runner import _errors, _Interrupt, _InterruptingStream, _runs, _stream


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tta-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_same_items_in_the_same_order(depth):
    assert list(prefetch(range(23), depth)) == list(range(23))
    assert list(prefetch(range(5), depth, transform=lambda i: i * 10)) == [0, 10, 20, 30, 40]
    assert list(prefetch([], depth)) == []


def test_items_are_made_ahead_while_the_consumer_works():
    """While the consumer holds the first item, the producer makes items 1 and 2 (the queue's depth) without being
    asked; the wait only bounds a failure, it is not a timing assumption."""
    made: list[int] = []
    second_made = threading.Event()

    def items():
        for i in range(4):
            made.append(i)
            if i == 2:
                second_made.set()
            yield i

    iterator = prefetch(items(), depth=2)
    first = next(iterator)
    assert second_made.wait(timeout=60), "items 1 and 2 were not made ahead"
    assert first == 0 and made[:3] == [0, 1, 2]
    assert list(iterator) == [1, 2, 3]


def test_without_depth_nothing_is_made_ahead():
    made: list[int] = []

    def items():
        for i in range(4):
            made.append(i)
            yield i

    iterator = prefetch(items(), depth=0)
    assert next(iterator) == 0 and made == [0]
    assert list(iterator) == [1, 2, 3]


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_is_raised_at_its_position_with_its_type(depth):
    class Broken(RuntimeError):
        pass

    def items():
        yield 1
        yield 2
        raise Broken("batch 3 could not be made")

    seen = []
    with pytest.raises(Broken, match="batch 3"):
        for item in prefetch(items(), depth):
            seen.append(item)
    assert seen == [1, 2]


def test_leaving_the_loop_early_stops_the_thread():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    iterator = prefetch(endless(), depth=2)
    assert next(iterator) == 0
    iterator.close()
    assert not _prefetch_threads()  # joined: nothing can be made after the consumer left
    count = len(produced)
    assert count <= 4  # the first item, the queue's 2, and at most one being made when the consumer left
    with pytest.raises(ValueError, match="depth"):
        next(prefetch(range(3), -1))


def test_runner_results_do_not_depend_on_prefetch(tmp_path):
    results = {}
    for depth in (0, 3):
        path = tmp_path / str(depth)
        run_methods(_runs(), _stream("continual"), ResultsLog(path / "results.jsonl"),
                    context={"protocol": "continual"}, checkpoint_dir=path / "ckpt", progress=False, prefetch=depth)
        results[depth] = _errors(path)
    assert results[0] == results[3] and len(results[0]) == 9
    assert not _prefetch_threads()


def test_a_run_interrupted_in_the_producer_resumes_to_identical_results(tmp_path):
    """The stream fails while the thread makes batch 10: the batches before it are adapted on and recorded as in a
    loop without the thread, and the rerun completes to the same results."""
    def run(stream, path):
        return run_methods(_runs(), stream, ResultsLog(path / "results.jsonl"), context={"protocol": "continual"},
                           checkpoint_dir=path / "ckpt", progress=False, prefetch=2)

    run(_stream("continual"), tmp_path / "reference")
    with pytest.raises(_Interrupt):
        run(_InterruptingStream(_stream("continual"), 10), tmp_path / "interrupted")
    assert len(ResultsLog(tmp_path / "interrupted" / "results.jsonl").read()) == 3  # the first segment of 6 batches
    assert not _prefetch_threads()
    run(_stream("continual"), tmp_path / "interrupted")
    assert _errors(tmp_path / "interrupted") == _errors(tmp_path / "reference")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_keep_their_values():
    batch = next(_stream().batches(0))
    pinned = _pinned(batch)
    assert pinned.x.is_pinned() and torch.equal(pinned.x, batch.x) and pinned.index == batch.index
