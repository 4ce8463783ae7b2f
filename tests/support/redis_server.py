"""A throw-away ``redis-server`` on a free loopback port, for tests that need a real broker.

Persistence is off (``--save "" --appendonly no``) and it listens on 127.0.0.1 only.  Readiness
is polled with PING, never waited for with a fixed sleep.

    with RedisServer(tmp_path) as redis:
        app = Celery(broker=redis.url)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import TracebackType

import redis

from tests.support.polling import wait_until
from tests.support.ports import free_port
from tests.support.processes import ChildProcess

REDIS_BINARY = "redis-server"


def redis_available() -> bool:
    """Whether the ``redis-server`` binary is on PATH."""
    return shutil.which(REDIS_BINARY) is not None


class RedisServer:
    """Start and stop one ``redis-server`` process bound to 127.0.0.1."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port if port is not None else free_port()
        self.process: ChildProcess | None = None
        self._log = self.workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        """The broker URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A new redis-py client for this server."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and return once it answers PING."""
        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = ChildProcess(
            [
                *(REDIS_BINARY, "--save", "", "--appendonly", "no"),
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.workdir), "--logfile", str(self._log)),
            ]
        )
        wait_until(self._answers, timeout, "redis-server to answer PING")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            raise RuntimeError(f"redis-server exited early:\n{self.log_text()}")
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False
        finally:
            client.close()

    def log_text(self) -> str:
        """The server log, for failure messages."""
        try:
            return self._log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Terminate the server and wait for it to exit."""
        if self.process is not None:
            self.process.stop(timeout=10)
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
