"""Supervised child processes of ``coronet run``, and waiting for them by polling.

Each child's output goes to its log file, and optionally to our stdout; it runs in its own
process group, so Ctrl-C reaches only the supervisor, which stops the children in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Final

from dicom_node.core.errors import CoronetError
from dicom_node.stack.plan import LOOPBACK

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.1
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SupervisorError(CoronetError):
    """A part of the system did not start, or stopped on its own."""


def wait_for(
    probe: Callable[[], bool], what: str, alive: Callable[[], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if not alive():
            raise SupervisorError(f"{what} exited while starting")
        if time.monotonic() > deadline:
            raise SupervisorError(f"{what} not ready after {timeout:g} s")
        time.sleep(POLL_S)


def http_ok(url: str) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def tcp_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class Child:
    """One supervised process; its output goes to a log file (and optionally to our stdout)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        echo: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._log: IO[str] = log_path.open("a", encoding="utf-8")
        self.process = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        self._echo = echo
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            with self._lock:
                self.lines.append(line)
            if self._echo:
                sys.stdout.write(f"[{self.name}] {line}")
                sys.stdout.flush()

    def tail(self, count: int) -> list[str]:
        with self._lock:
            return self.lines[-count:]

    def saw(self, text: str) -> int:
        with self._lock:
            return sum(1 for line in self.lines if text in line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Signal the process, wait, and kill its whole process group if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %g s; killing it", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT_S)
        # Pool processes of a worker live in its process group: none may outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._reader.join(timeout=5)
        self._log.close()
        return self.process.returncode


def child_env() -> dict[str, str]:
    """Our environment without CORONET_* overrides (already in the effective config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORONET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def coronet_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicom_node.cli", *args]
