"""The one child-process runner: a command in its own process group, its output read on a
thread, stopped (and its whole group killed) when the test ends.

    with ChildProcess.coronet(["node", "serve", "--config", str(path)]) as node:
        node.wait_for_line("listening on")
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType


def coronet_env() -> dict[str, str]:
    """Our environment without ``CORONET_*`` overrides, unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORONET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ChildProcess:
    """One child process (see the module docstring)."""

    def __init__(
        self, argv: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.argv = list(argv)
        self.output: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env if env is not None else coronet_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def coronet(cls, args: Sequence[str], *, cwd: Path | None = None) -> ChildProcess:
        """``coronet ARGS`` (``python -m dicom_node.cli``)."""
        return cls([sys.executable, "-m", "dicom_node.cli", *args], cwd=cwd)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.output.append(line)
            self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        """Everything it printed so far."""
        with self._lock:
            return "".join(self.output)

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        """Block until a line contains ``text``; fail with the output if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (not self.alive() and self.lines.empty()):
                raise AssertionError(f"no line with {text!r}; output:\n{self.text()}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if text in line:
                return line

    def follow(self, timeout: float = 120.0) -> Iterator[str]:
        """Each line as it comes, until the process exits and its output is read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                yield self.lines.get(timeout=0.2)
            except queue.Empty:
                if not self.alive() and not self._reader.is_alive() and self.lines.empty():
                    return
        raise AssertionError(f"still running after {timeout} s:\n{self.text()}")

    def wait_for(self, probe: Callable[[str], bool], what: str, timeout: float = 120.0) -> None:
        """Block until ``probe(output so far)`` holds; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while not probe(self.text()):
            if not self.alive():
                raise AssertionError(f"exited while waiting for {what}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.text()}")
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout=10)
        return int(code)

    def kill_group(self) -> None:
        """kill -9 the process and everything in its group (e.g. worker pool processes)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> int:
        """Ask it to stop with ``sig``; kill the group if it lingers.  Returns the exit status."""
        if self.alive():
            self.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        code = self.process.poll()
        self.kill_group()
        self._reader.join(timeout=10)
        return int(code if code is not None else self.process.returncode)

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
