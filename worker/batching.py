"""Batches across tasks: the images of the studies a worker holds, analysed together.

With ``coronet worker --batch N`` one worker process runs up to N tasks at once, in N threads
(Celery's ``threads`` pool, one message reserved per thread).  Each task reads its instances
as before and hands the images to the process's one :class:`Batcher`; the batcher's thread
gathers what the tasks hand in, up to N images, and analyses them in one call of
:func:`worker.pipeline.process_many` (one forward pass, one attribution optimisation), then
gives each task its own results.  The tasks then store and deliver their results in their
own threads, while the next batch runs.  Only the batcher's thread touches the model and the
decoder process.

When to start a batch: as soon as it holds N images, or every running task has handed in its
images (nothing more can come), or ``linger_s`` after the first image came, whichever is
first.  A light load therefore adds no waiting.

Isolation: a request made ``alone`` (an instance whose last analysis was lost with its worker
process, see :mod:`worker.processor`) runs in a batch of its own.

Time limits: Celery enforces no time limit in the ``threads`` pool.  A task waits at most
``wait_s`` for its results (then :class:`BatchTimeout`, which the task treats as its soft
time limit), and a batch that runs longer than ``overrun_s`` means the model is stuck: the
watchdog calls ``on_overrun``, by default ending the whole worker process at once, so that
the broker hands its unacknowledged tasks to another worker and a supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset

from worker.processor import AnalysisResult

logger = logging.getLogger(__name__)

Source = tuple[Dataset, Path]
Results = Sequence[AnalysisResult | Exception]
AnalyseBatch = Callable[[Sequence[Source]], Results]
"""Analyses one batch (:func:`worker.pipeline.process_many`)."""

#: Exit status of a worker process whose batch overran its time limit (EX_SOFTWARE).
OVERRUN_EXIT: Final = 70


class BatchTimeout(Exception):
    """A task waited longer than its time limit for its batch."""


def end_process() -> None:
    """The default reaction to a stuck batch: end the worker process now (see module doc)."""
    logger.critical("a batch ran past the hard time limit; ending the worker process")
    logging.shutdown()
    os._exit(OVERRUN_EXIT)


@dataclass
class _Request:
    """One task's images, waiting for their batch."""

    sources: list[Source]
    alone: bool
    done: threading.Event = field(default_factory=threading.Event)
    results: Results = ()
    error: BaseException | None = None


class Batcher:
    """Analyses the images that concurrent tasks hand in, in shared batches (module doc).

    An instance is an :data:`~worker.processor.AnalyseMany`: call it from task threads.
    """

    def __init__(
        self,
        analyse: AnalyseBatch,
        max_images: int,
        *,
        linger_s: float = 0.05,
        wait_s: float = 840.0,
        overrun_s: float = 900.0,
        on_overrun: Callable[[], None] = end_process,
    ) -> None:
        if max_images < 1:
            raise ValueError("max_images must be at least 1")
        if not 0 < wait_s <= overrun_s:
            raise ValueError("need 0 < wait_s <= overrun_s")
        self.analyse = analyse
        self.max_images = max_images
        self.linger_s = linger_s
        self.wait_s = wait_s
        self.overrun_s = overrun_s
        self.on_overrun = on_overrun
        self._queue: deque[_Request] = deque()
        self._changed = threading.Condition()
        self._active = 0
        self._stopping = False
        self._busy_since: float | None = None
        self._halt = threading.Event()  # ends the watchdog
        self._threads: list[threading.Thread] = []
        self.batches = 0
        self.images = 0

    def start(self) -> None:
        """Start the batch thread and its watchdog (once)."""
        if self._stopping:
            raise RuntimeError("a stopped batcher does not start again")
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._serve, name="coronet-batcher", daemon=True),
            threading.Thread(target=self._watch, name="coronet-batch-watchdog", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the batches handed in, then stop the threads."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads[:1]:  # the batch thread first: it finishes what is queued
            thread.join(timeout)
        self._halt.set()
        for thread in self._threads[1:]:
            thread.join(timeout)
        self._threads = []

    @contextmanager
    def task(self) -> Iterator[None]:
        """Count a running task: while it runs, a batch may wait for its images."""
        with self._changed:
            self._active += 1
        try:
            yield
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()

    def __call__(self, sources: Sequence[Source], *, alone: bool = False) -> Results:
        """Hand in one task's images and wait for their results (at most ``wait_s``)."""
        if not sources:
            return []
        if not self._threads:
            raise RuntimeError("the batcher is not running")
        request = _Request(list(sources), alone)
        with self._changed:
            self._queue.append(request)
            self._changed.notify_all()
        if not request.done.wait(self.wait_s):
            with self._changed:  # still waiting for its batch: nobody wants its results now
                if request in self._queue:
                    self._queue.remove(request)
            raise BatchTimeout(f"no result for {len(sources)} images after {self.wait_s:g} s")
        if request.error is not None:
            raise request.error
        return request.results

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            sources = [source for request in batch for source in request.sources]
            began = self._busy_since = time.monotonic()
            try:
                results = list(self.analyse(sources))
                if len(results) != len(sources):
                    raise RuntimeError(f"{len(results)} results for {len(sources)} images")
            except BaseException as err:  # every task of the batch hears of it
                logger.exception("a batch of %d images failed", len(sources))
                for request in batch:
                    request.error = err
                    request.done.set()
                continue
            finally:
                self._busy_since = None
            self.batches += 1
            self.images += len(sources)
            logger.info(
                "batch of %d images from %d tasks analysed in %.2f s",
                len(sources), len(batch), time.monotonic() - began,
            )  # fmt: skip
            first = 0
            for request in batch:
                request.results = results[first : first + len(request.sources)]
                first += len(request.sources)
                request.done.set()

    def _next_batch(self) -> list[_Request] | None:
        """The requests of the next batch, in order; None once stopping with nothing left."""
        with self._changed:
            while not self._queue:
                if self._stopping:
                    return None
                self._changed.wait()
            deadline = time.monotonic() + self.linger_s
            while not self._ready() and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            return self._take()

    def _ready(self) -> bool:
        """Start now: the first request goes alone, the batch is full, every running task has
        handed in its images, or the batcher is stopping."""
        queued = sum(len(r.sources) for r in self._queue if not r.alone)
        return (
            self._stopping
            or self._queue[0].alone
            or queued >= self.max_images
            or len(self._queue) >= self._active
        )

    def _take(self) -> list[_Request]:
        """The first request and, unless it goes alone, the next ones that fit ``max_images``
        and need not go alone (a request larger than the batch goes on its own)."""
        first = self._queue.popleft()
        batch, size = [first], len(first.sources)
        if first.alone:
            return batch
        kept: deque[_Request] = deque()
        while self._queue:
            request = self._queue.popleft()
            if not request.alone and size + len(request.sources) <= self.max_images:
                batch.append(request)
                size += len(request.sources)
            else:
                kept.append(request)
        self._queue = kept
        return batch

    def _watch(self) -> None:
        """Call ``on_overrun`` when one batch runs longer than ``overrun_s``."""
        period = min(1.0, self.overrun_s / 10)
        while not self._halt.wait(period):
            busy_since = self._busy_since
            if busy_since is not None and time.monotonic() - busy_since > self.overrun_s:
                self.on_overrun()
                return
