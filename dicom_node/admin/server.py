"""The admin service's HTTP server: uvicorn on ``admin.host``/``admin.port`` in a thread of the
node process, over TLS when ``admin.tls`` is set.

The listening socket is bound here, before uvicorn starts, so that a port in use is a clear
error at start.  The settings already refuse a non-loopback address without TLS unless
``admin.allow_plain_http`` is true; :func:`check_binding` says it again here, so that no other
caller can skip it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Final

import uvicorn
from fastapi import FastAPI

from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import AdminSettings, is_loopback

logger = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 30.0


def check_binding(admin: AdminSettings) -> None:
    if admin.tls is None and not admin.allow_plain_http and not is_loopback(admin.host):
        raise ConfigError(
            f"admin.host {admin.host}: refusing plain HTTP on a non-loopback address; set "
            "admin.tls, or admin.allow_plain_http: true",
            [("admin.host", "not loopback without TLS")],
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"admin service cannot listen on {host}:{port}: {err.strerror or err}",
            [("admin.port", "in use")],
        ) from err
    sock.set_inheritable(True)
    return sock


class AdminServer:
    """``start()`` and ``stop()`` the admin service (see the module docstring)."""

    def __init__(self, app: FastAPI, admin: AdminSettings) -> None:
        check_binding(admin)
        self.admin = admin
        tls = admin.tls
        self.config = uvicorn.Config(
            app,
            host=admin.host,
            port=admin.port,
            ssl_certfile=str(tls.cert_file) if tls and tls.cert_file else None,
            ssl_keyfile=str(tls.key_file) if tls and tls.key_file else None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.admin.tls else "http"
        host = f"[{self.admin.host}]" if ":" in self.admin.host else self.admin.host
        return f"{scheme}://{host}:{self.admin.port}/"

    def start(self) -> None:
        self._socket = _bind(self.admin.host, self.admin.port)
        sock = self._socket
        self._thread = threading.Thread(
            target=lambda: self.server.run(sockets=[sock]), name="coronet-admin", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive():
                raise ConfigError(f"the admin service did not start on {self.url}")
            if time.monotonic() > deadline:
                raise ConfigError(f"the admin service did not start within {START_TIMEOUT_S} s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


__all__ = ["AdminServer", "check_binding"]
