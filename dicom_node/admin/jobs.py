"""A job the node runs every N seconds on a thread of its own (the retention prune)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class PeriodicJob:
    """Runs ``job`` every ``interval()`` seconds until :meth:`stop`; a failing run is logged."""

    def __init__(self, name: str, interval: Callable[[], float], job: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self.job = job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"coronet-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval()):
            try:
                self.job()
            except Exception:  # the next run may succeed; the node goes on
                logger.exception("%s failed", self.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


__all__ = ["PeriodicJob"]
