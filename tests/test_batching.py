"""The batcher that lets concurrent tasks share batches (:mod:`worker.batching`).

The analysis is a recording stand-in here: these tests are about which images go together,
who gets which result, and the time limits.  ``tests/test_pipeline_batch.py`` runs the real
model in batches; ``tests/test_worker.py`` runs ``coronet worker --batch``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.support.polling import wait_until
from worker.batching import Batcher, BatchTimeout, Results, Source


def _sources(name: str, count: int) -> list[Source]:
    """``count`` images of the task ``name`` (the path says whose image it is)."""
    return [(Dataset(), Path(f"{name}/{index}")) for index in range(count)]


class Recorder:
    """Analyses a batch by naming each image, and remembers each batch it was given."""

    def __init__(self, *, hold: threading.Event | None = None, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.hold = hold
        self.fail = fail
        self.started = threading.Event()

    def __call__(self, sources: Sequence[Source]) -> Results:
        self.batches.append([str(path) for _, path in sources])
        self.started.set()
        if self.hold is not None:
            self.hold.wait(30)
        if self.fail:
            raise RuntimeError("the model failed")
        return [ValueError(f"result of {path}") for _, path in sources]


def _names(results: Results) -> list[str]:
    return [str(result) for result in results]


@pytest.fixture(name="pool")
def pool_fixture() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        yield pool


def _batcher(
    analyse: Recorder,
    max_images: int = 4,
    *,
    linger_s: float = 0.05,
    wait_s: float = 30.0,
    overrun_s: float = 60.0,
    on_overrun: Callable[[], None] | None = None,
) -> Batcher:
    def unexpected() -> None:
        raise AssertionError("the watchdog fired")

    batcher = Batcher(
        analyse,
        max_images,
        linger_s=linger_s,
        wait_s=wait_s,
        overrun_s=overrun_s,
        on_overrun=on_overrun or unexpected,
    )
    batcher.start()
    return batcher


def _wait_queued(batcher: Batcher, count: int) -> None:
    wait_until(lambda: len(batcher._queue) == count, 10, f"{count} requests to queue")


def _task(batcher: Batcher, name: str, count: int, *, alone: bool = False) -> Results:
    with batcher.task():
        return batcher(_sources(name, count), alone=alone)


def test_concurrent_tasks_share_one_batch_and_each_gets_its_own_results(
    pool: ThreadPoolExecutor,
) -> None:
    recorder = Recorder()
    batcher = _batcher(recorder, max_images=4, linger_s=30.0)
    ready = threading.Barrier(3)

    def task(name: str, count: int) -> Results:
        with batcher.task():
            ready.wait(10)  # all three tasks are running before any hands in its images
            return batcher(_sources(name, count))

    futures = [pool.submit(task, name, count) for name, count in (("a", 1), ("b", 2), ("c", 1))]
    results = [f.result(20) for f in futures]
    batcher.stop()
    assert len(recorder.batches) == 1 and sorted(recorder.batches[0]) == sorted(
        ["a/0", "b/0", "b/1", "c/0"]
    )
    assert [_names(r) for r in results] == [
        ["result of a/0"],
        ["result of b/0", "result of b/1"],
        ["result of c/0"],
    ]
    assert (batcher.batches, batcher.images) == (1, 4)


def test_a_lone_task_does_not_wait_for_the_linger() -> None:
    """Every running task has handed in its images: the batch starts at once."""
    recorder = Recorder()
    batcher = _batcher(recorder, linger_s=60.0)
    began = time.monotonic()
    assert _names(_task(batcher, "a", 2)) == ["result of a/0", "result of a/1"]
    assert time.monotonic() - began < 30.0  # it did not wait the 60 s linger
    batcher.stop()


def test_a_batch_waits_for_a_running_task_until_the_linger_ends(
    pool: ThreadPoolExecutor,
) -> None:
    """A running task that has not handed in its images (still reading, or delivering) keeps
    the batch open for ``linger_s`` only."""
    recorder = Recorder()
    batcher = _batcher(recorder, linger_s=0.3)
    idle = threading.Event()

    def busy_task() -> None:
        with batcher.task():
            idle.wait(20)

    busy = pool.submit(busy_task)
    assert _names(_task(batcher, "a", 1)) == ["result of a/0"]
    idle.set()
    busy.result(10)
    batcher.stop()
    assert recorder.batches == [["a/0"]]


def test_batches_hold_at_most_max_images_and_keep_the_order(pool: ThreadPoolExecutor) -> None:
    hold = threading.Event()
    recorder = Recorder(hold=hold)
    batcher = _batcher(recorder, max_images=3, linger_s=30.0)
    first = pool.submit(_task, batcher, "first", 1)
    assert recorder.started.wait(10)  # the batcher is busy: the next requests queue up
    queued = []
    for name, count in (("big", 5), ("x", 2), ("y", 1)):  # queued in this order
        queued.append(pool.submit(_task, batcher, name, count))
        _wait_queued(batcher, len(queued))
    hold.set()
    assert _names(first.result(10)) == ["result of first/0"]
    big, x, y = (f.result(20) for f in queued)
    batcher.stop()
    assert len(big) == 5 and len(x) == 2 and len(y) == 1
    # the request larger than a batch goes alone, in its turn; the next two share one
    assert recorder.batches[1] == [f"big/{i}" for i in range(5)]
    assert recorder.batches[2] == ["x/0", "x/1", "y/0"]


def test_a_request_made_alone_never_shares_its_batch(pool: ThreadPoolExecutor) -> None:
    hold = threading.Event()
    recorder = Recorder(hold=hold)
    batcher = _batcher(recorder, max_images=8, linger_s=30.0)
    first = pool.submit(_task, batcher, "first", 1)
    assert recorder.started.wait(10)
    futures: list[Future[Results]] = [
        pool.submit(_task, batcher, "a", 1),
        pool.submit(_task, batcher, "suspect", 1, alone=True),
        pool.submit(_task, batcher, "b", 1),
    ]
    _wait_queued(batcher, 3)
    hold.set()
    first.result(10)
    for future in futures:
        future.result(20)
    batcher.stop()
    assert ["suspect/0"] in recorder.batches
    assert all(batch == ["suspect/0"] for batch in recorder.batches if "suspect/0" in batch)


def test_every_task_of_a_failed_batch_hears_of_it(pool: ThreadPoolExecutor) -> None:
    batcher = _batcher(Recorder(fail=True))
    with pytest.raises(RuntimeError, match="the model failed"):
        _task(batcher, "a", 2)
    assert _names(_task(batcher, "b", 0)) == []  # no images: no batch
    batcher.stop()


def test_a_task_waits_at_most_its_time_limit(pool: ThreadPoolExecutor) -> None:
    hold = threading.Event()
    overruns: list[float] = []
    recorder = Recorder(hold=hold)
    batcher = _batcher(recorder, wait_s=0.3, overrun_s=30.0, on_overrun=lambda: overruns.append(1))
    running = pool.submit(_task, batcher, "a", 1)
    assert recorder.started.wait(10)
    with pytest.raises(BatchTimeout, match=r"no result for 1 images after 0\.3 s"):
        _task(batcher, "queued", 1)  # waits behind the held batch
    with pytest.raises(BatchTimeout):
        running.result(10)
    hold.set()
    batcher.stop()
    assert overruns == []  # slow, but not stuck
    assert recorder.batches == [["a/0"]]  # the request that timed out was never analysed


def test_a_batch_stuck_past_the_hard_limit_triggers_the_watchdog() -> None:
    hold = threading.Event()
    overrun = threading.Event()
    batcher = _batcher(Recorder(hold=hold), wait_s=0.2, overrun_s=0.5, on_overrun=overrun.set)
    with pytest.raises(BatchTimeout):
        _task(batcher, "a", 1)
    assert overrun.wait(10), "the watchdog did not react to the stuck batch"
    hold.set()
    batcher.stop()


def test_stop_finishes_the_batches_handed_in(pool: ThreadPoolExecutor) -> None:
    hold = threading.Event()
    recorder = Recorder(hold=hold)
    batcher = _batcher(recorder, linger_s=30.0)
    future = pool.submit(_task, batcher, "a", 1)
    assert recorder.started.wait(10)
    stopping = pool.submit(batcher.stop, 20.0)
    hold.set()
    stopping.result(30)
    assert _names(future.result(10)) == ["result of a/0"]
    with pytest.raises(RuntimeError, match="not running"):
        batcher(_sources("late", 1))
    with pytest.raises(RuntimeError, match="does not start again"):
        batcher.start()


@pytest.mark.parametrize(
    ("max_images", "wait_s", "overrun_s"), [(0, 1.0, 2.0), (1, 0.0, 1.0), (1, 3.0, 2.0)]
)
def test_batcher_settings_are_checked(max_images: int, wait_s: float, overrun_s: float) -> None:
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_images, wait_s=wait_s, overrun_s=overrun_s)
