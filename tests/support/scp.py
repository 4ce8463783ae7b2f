"""A recording Storage SCP standing in for a PACS that receives our results.

:class:`RecordingSCP` is a pynetdicom Storage SCP on a loopback port that answers a scripted
sequence of statuses, can reject associations, speak TLS, and be stopped and started again on
the same port (a destination that goes down and comes back).
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.core.statuses import SUCCESS, WARNING_RANGE
from tests.support.ports import free_port

RESULT_CONTEXTS = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)


@dataclass(frozen=True)
class Received:
    sop_class_uid: str
    sop_instance_uid: str
    calling_ae: str


@dataclass
class RecordingSCP:
    """A Storage SCP on 127.0.0.1 that records what it stores (see module docstring)."""

    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)
    """Answers to the next C-STOREs, in order; Success once empty."""
    reject: tuple[int, int, int] | None = None
    """(result, source, reason) of an A-ASSOCIATE-RJ for every request, or None."""
    contexts: Sequence[str] = RESULT_CONTEXTS
    ssl_context: ssl.SSLContext | None = None
    received: list[Received] = field(default_factory=list)
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: Event) -> int:
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else SUCCESS
            if status == SUCCESS or status in WARNING_RANGE:
                ds = event.dataset
                self.received.append(
                    Received(
                        str(ds.SOPClassUID),
                        str(ds.SOPInstanceUID),
                        event.assoc.requestor.ae_title.strip(),
                    )
                )
        return status

    def _on_requested(self, event: Event) -> None:
        if self.reject is not None:
            event.assoc.acse.send_reject(*self.reject)
            event.assoc.kill()

    def start(self) -> RecordingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        for sop_class in self.contexts:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_REQUESTED, self._on_requested),
            ],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def stored(self, sop_class_uid: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if sop_class_uid in (None, r.sop_class_uid)]

    def destination(self, name: str = "pacs", **extra: Any) -> dict[str, Any]:
        """Configuration data of this SCP as a destination."""
        return {
            "name": name,
            "ae_title": self.ae_title,
            "host": "127.0.0.1",
            "port": self.port,
            **extra,
        }


@contextlib.contextmanager
def running_scp(**options: Any) -> Iterator[RecordingSCP]:
    scp = RecordingSCP(**options).start()
    try:
        yield scp
    finally:
        scp.stop()
