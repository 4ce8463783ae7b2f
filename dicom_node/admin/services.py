"""What the admin service works with, bound once by ``coronet node serve`` (the composition
root) and handed to the app: the running node, the configuration file, the users, the audit
trail, and the C-ECHO of a destination (the worker's Storage SCU, injected, since the admin
package does not import the worker).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from dicom_node.admin.config_edits import ConfigEditor
from dicom_node.admin.users import UserStore
from dicom_node.core.audit_trail import AuditTrail
from dicom_node.core.durable import replace_text
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Settings, load_settings
from dicom_node.scp.node import DicomNode

logger = logging.getLogger(__name__)

EchoFn = Callable[[Settings, str], tuple[bool, str]]
"""C-ECHO to the destination with this name; returns (success, message)."""

_SPOOL_BYTES_TTL_S = 30.0


def load_secret(path: Path) -> bytes:
    """The console's signing key: read, or made at the first start (mode 0600)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = ""
    if len(text) < 32:
        text = secrets.token_hex(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, text + "\n", new_mode=0o600)
    return text.encode("ascii")


def folder_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (0 when it does not exist)."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(stack.pop().iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir():
                    stack.append(entry)
                else:
                    total += entry.stat().st_size
            except OSError:
                continue
    return total


@dataclass
class AdminServices:
    """The admin service's dependencies (see the module docstring)."""

    node: DicomNode
    config_path: Path
    overrides: list[str]
    editor: ConfigEditor
    users: UserStore
    audit_trail: AuditTrail
    echo: EchoFn
    secret: bytes
    started: float = field(default_factory=time.time)
    _redis: redis.Redis | None = None
    _redis_url: str = ""
    _spool_bytes: tuple[float, int] = (0.0, 0)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def settings(self) -> Settings:
        return self.node.settings

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.settings.storage.outbox_dir)

    def reload(self) -> Settings:
        """Apply the configuration file (with the node's ``--set`` values) to the node."""
        settings = load_settings(self.config_path, self.overrides)
        self.node.reload(settings)
        return settings

    def redis(self) -> redis.Redis:
        """A client of the broker's Redis with short timeouts (health checks, metrics)."""
        with self._lock:
            url = self.settings.broker.url
            if self._redis is None or self._redis_url != url:
                self._redis = redis.Redis.from_url(
                    url, socket_connect_timeout=1.0, socket_timeout=2.0
                )
                self._redis_url = url
            return self._redis

    def spool_bytes(self) -> int:
        """Bytes in the spool, measured at most every 30 s (a walk of the folder)."""
        with self._lock:
            at, value = self._spool_bytes
            if time.monotonic() - at < _SPOOL_BYTES_TTL_S and at:
                return value
        value = folder_bytes(self.settings.storage.spool_dir)
        with self._lock:
            self._spool_bytes = (time.monotonic(), value)
        return value

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.settings.storage.spool_dir).free


__all__ = ["AdminServices", "EchoFn", "folder_bytes", "load_secret"]
