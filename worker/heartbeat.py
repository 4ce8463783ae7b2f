"""The worker's heartbeat: its name and the time, written to Redis every few seconds by a
thread of the main worker process (:mod:`dicom_node.core.telemetry`), so that the node's
``/healthz`` can tell when no worker has been seen for ``admin.worker_timeout``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Final

import redis

from dicom_node.core.telemetry import TelemetryWriter

logger = logging.getLogger(__name__)

INTERVAL_S: Final = 10.0


def worker_identity() -> str:
    """``host:pid`` of the main worker process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Writes ``name`` to Redis every ``interval`` seconds until :meth:`stop`."""

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        name: str | None = None,
        interval: float = INTERVAL_S,
    ) -> None:
        self.client_factory = client_factory
        self.name = name or worker_identity()
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="coronet-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        writer = TelemetryWriter(self.client_factory())
        while True:
            writer.heartbeat(self.name)
            if self._stop.wait(self.interval):
                break
        writer.forget(self.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


__all__ = ["Heartbeat", "worker_identity"]
