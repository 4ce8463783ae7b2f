"""Where audit messages go (``audit.sink``): a file, syslog, or nowhere.

* ``file``: one XML message per line, appended to ``audit.file`` (mode 0600, created with its
  folder).  Each message is one ``write`` to a file opened with ``O_APPEND``, so the node, the
  workers and the CLI can share the file.
* ``syslog``: RFC 5424 messages (facility 10 security/authorization, severity 5 notice, MSGID
  ``IHE+RFC-3881``, the XML as the message, as IHE ATNA's Record Audit Event transaction sends
  them) over UDP (RFC 5426, one datagram each) or TLS (RFC 5425, octet-counting framing, one
  connection kept open and made again when it breaks).
* ``off``: nothing is written.

Recording never raises: a sink that fails logs an error (the event is lost, and the log says
so).  An audit trail that silently stops is what ATNA warns about, so every failure is logged
at ERROR level.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Final, Protocol

from dicom_node.core.audit import AuditEvent, AuditSource, to_xml
from dicom_node.core.settings import AuditSettings, SyslogSettings
from dicom_node.core.tls import client_context

logger = logging.getLogger(__name__)

APP_NAME: Final = "coronet"
MSGID: Final = "IHE+RFC-3881"
PRIORITY: Final = 10 * 8 + 5
"""Facility 10 (security/authorization messages), severity 5 (notice), RFC 5424 6.2.1."""
_BOM: Final = "\ufeff"
_CONNECT_TIMEOUT_S: Final = 5.0


class Sink(Protocol):
    def write(self, message: str) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """One message per line, appended (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, message: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (message + "\n").encode("utf-8"))
        finally:
            os.close(fd)

    def close(self) -> None:
        return None


def syslog_frame(message: str, hostname: str, at: datetime.datetime) -> bytes:
    """One RFC 5424 message holding ``message`` (UTF-8, with the BOM RFC 5424 6.4 asks for)."""
    header = (
        f"<{PRIORITY}>1 {at.isoformat(timespec='milliseconds')} {hostname or '-'} "
        f"{APP_NAME} {os.getpid()} {MSGID} -"
    )
    return f"{header} {_BOM}{message}".encode()


class SyslogSink:
    """RFC 5424 over UDP or TLS (see the module docstring)."""

    def __init__(self, settings: SyslogSettings) -> None:
        self.settings = settings
        self.hostname = socket.gethostname()
        self._lock = threading.Lock()
        self._tls: ssl.SSLSocket | None = None
        self._context = (
            client_context(settings.tls, "audit.syslog.tls")
            if settings.transport == "tls" and settings.tls is not None
            else ssl.create_default_context()
        )

    def write(self, message: str) -> None:
        frame = syslog_frame(message, self.hostname, datetime.datetime.now().astimezone())
        if self.settings.transport == "udp":
            with socket.socket(_family(self.settings.host), socket.SOCK_DGRAM) as sock:
                sock.sendto(frame, (self.settings.host, self.settings.port))
            return
        framed = str(len(frame)).encode("ascii") + b" " + frame
        with self._lock:
            for attempt in (1, 2):  # a kept connection may have been closed by the peer
                try:
                    self._connection().sendall(framed)
                    return
                except OSError:
                    self._drop()
                    if attempt == 2:
                        raise

    def _connection(self) -> ssl.SSLSocket:
        if self._tls is None:
            raw = socket.create_connection(
                (self.settings.host, self.settings.port), timeout=_CONNECT_TIMEOUT_S
            )
            self._tls = self._context.wrap_socket(raw, server_hostname=self.settings.host)
        return self._tls

    def _drop(self) -> None:
        if self._tls is not None:
            try:
                self._tls.close()
            finally:
                self._tls = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class AuditTrail:
    """Records :class:`~dicom_node.core.audit.AuditEvent` s to the configured sink."""

    def __init__(self, sink: Sink | None, source: AuditSource) -> None:
        self.sink = sink
        self.source = source

    @classmethod
    def from_settings(cls, settings: AuditSettings, default_source: str) -> AuditTrail:
        """The trail of ``audit``; ``default_source`` is the AuditSourceID when none is set."""
        source = AuditSource(settings.source_id or default_source, settings.enterprise_site_id)
        sink: Sink | None = None
        if settings.sink == "file":
            sink = FileSink(settings.file)
        elif settings.sink == "syslog":
            assert settings.syslog is not None  # checked by the settings
            sink = SyslogSink(settings.syslog)
        return cls(sink, source)

    @property
    def enabled(self) -> bool:
        return self.sink is not None

    def record(self, event: AuditEvent) -> None:
        if self.sink is None:
            return
        try:
            self.sink.write(to_xml(event, self.source))
        except Exception as err:  # never fail the audited action; say that the trail has a gap
            logger.error(
                "audit message %s not recorded: %s", event.event_id.meaning, err, exc_info=False
            )

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def default_source_id(ae_title: str) -> str:
    """Our AuditSourceID when ``audit.source_id`` is not set: ``AE@host``."""
    return f"{ae_title}@{socket.gethostname()}"


__all__ = ["AuditTrail", "FileSink", "SyslogSink", "default_source_id", "syslog_frame"]
