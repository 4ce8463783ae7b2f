"""The node's lifecycle: build the Storage SCP from settings, start, reload and stop it.

:class:`DicomNode` is built from :class:`~dicom_node.core.settings.Settings` and explicit
dependencies (a :class:`~dicom_node.core.spool.Spool` and a
:class:`~dicom_node.scp.queueing.StudyQueue`).  Received data sets are streamed to a temporary
file by pynetdicom (``STORE_RECV_CHUNKED_DATASET``) and only their header is decoded
(:mod:`dicom_node.scp.ingest`).
"""

from __future__ import annotations

import getpass
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE, _config, evt

from dicom_node.core import audit
from dicom_node.core.audit_trail import AuditTrail
from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import NodeSettings, Settings
from dicom_node.core.spool import Spool
from dicom_node.core.tls import server_context
from dicom_node.scp.auditing import AssociationAudit
from dicom_node.scp.contexts import MAX_PDU_SIZE, build_contexts
from dicom_node.scp.guard import (
    GuardedServer,
    PendingLimits,
    StreamLimits,
    guarded_tls_context,
    quiet_tripped_connections,
)
from dicom_node.scp.handlers import (
    AssociationLog,
    handle_aborted,
    handle_accepted,
    handle_connection_close,
    handle_connection_open,
    handle_released,
    handle_requested,
    handle_store,
)
from dicom_node.scp.header import HeaderLimits
from dicom_node.scp.ingest import Ingest
from dicom_node.scp.metrics import NodeMetrics
from dicom_node.scp.queueing import CeleryQueue, Locate, StudyQueue
from dicom_node.scp.tempfiles import TempFiles
from dicom_node.scp.tempfiles import install as install_temp_files

logger = logging.getLogger(__name__)

TEMP_FOLDER = "tmp"
"""Inside the spool: where pynetdicom streams data sets being received."""


def _pending_limits(node: NodeSettings) -> PendingLimits:
    return PendingLimits(node.limits.max_pending_per_peer, node.limits.max_pending_connections)


def launcher() -> str:
    """The operating-system user running this process (the audit's Application Launcher)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _listen_key(node: NodeSettings) -> tuple[object, ...]:
    return (node.host, node.port, node.tls)


class DicomNode:
    """The Storage and Verification SCP: ``start()``, ``reload(settings)``, ``stop()``.

    ``start()`` also starts the study queue (with recovery of pending spooled studies) and
    ``stop()`` stops it.  ``metrics`` counts associations and instances (a fresh registry by
    default); ``audit`` records associations, stored instances, start and stop (none by
    default).
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        queue: StudyQueue,
        *,
        metrics: NodeMetrics | None = None,
        audit_trail: AuditTrail | None = None,
        locate: Locate | None = None,
    ) -> None:
        self._settings = settings
        self.locate = locate
        self.spool = spool
        self.queue = queue
        self.temp_files = TempFiles(spool.root / TEMP_FOLDER)
        self.ingest = Ingest(
            spool,
            queue,
            settings.selection,
            HeaderLimits.from_settings(settings.node.limits),
            self.temp_files,
            settings.storage.min_free_bytes,
        )
        self.metrics = metrics or NodeMetrics()
        self.metrics.watch_queue(lambda: self.queue.published)
        self.audit_trail = audit_trail or AuditTrail(None, audit.AuditSource("-"))
        self.log = AssociationLog(
            self.metrics, AssociationAudit(self.audit_trail, lambda: self.settings.node.ae_title)
        )
        self.ae = AE(ae_title=settings.node.ae_title)
        self.ae.maximum_pdu_size = MAX_PDU_SIZE
        self._server: GuardedServer | None = None
        self._apply_limits(settings.node)
        self._stopped = threading.Event()
        self._stopped.set()  # not started
        self._reload_lock = threading.Lock()
        self._chunked_before = _config.STORE_RECV_CHUNKED_DATASET

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        metrics: NodeMetrics | None = None,
        audit_trail: AuditTrail | None = None,
        locate: Locate | None = None,
        **queue_options: float,
    ) -> DicomNode:
        """Build the spool, the Celery producer and the study queue from ``settings``;
        ``locate`` adds each task's fetch URL (:class:`dicom_node.core.fetch.Locator`)."""
        spool = Spool(settings.storage.spool_dir)
        publisher = CeleryQueue.from_settings(settings.broker, locate)
        queue = StudyQueue(spool, publisher, settings.grouping, **queue_options)
        return cls(settings, spool, queue, metrics=metrics, audit_trail=audit_trail, locate=locate)

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the listener is bound to."""
        if self._server is None:
            raise RuntimeError("the node is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _apply_limits(self, node: NodeSettings) -> None:
        # pynetdicom counts connections still negotiating against its own limit; ours
        # (handle_requested) counts established associations only, so pynetdicom's is set
        # above everything the guarded server lets in.
        self.ae.maximum_associations = (
            node.max_associations + node.limits.max_pending_connections + 1
        )
        self.ae.acse_timeout = node.timeouts.acse
        self.ae.dimse_timeout = node.timeouts.dimse
        self.ae.network_timeout = node.timeouts.network
        self.ingest.limits = HeaderLimits.from_settings(node.limits)
        if self._server is not None:
            self._server.stream_limits = StreamLimits.from_settings(node, MAX_PDU_SIZE)
            self._server.pending_limits = _pending_limits(node)

    @property
    def listening(self) -> bool:
        """Whether the DICOM listener is up."""
        return self._server is not None and not self._stopped.is_set()

    def established(self) -> int:
        """Associations established with the current listener."""
        server = self._server
        if server is None:
            return 0
        return sum(1 for a in server.active_associations if a.is_established)

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, handle_connection_open, [self.temp_files]),
            (evt.EVT_CONN_CLOSE, handle_connection_close, [self.temp_files]),
            (
                evt.EVT_REQUESTED,
                handle_requested,
                [lambda: self.settings, self.established, self.log],
            ),
            (evt.EVT_ACCEPTED, handle_accepted, [self.log]),
            (evt.EVT_C_STORE, handle_store, [self.ingest, self.log]),
            (evt.EVT_RELEASED, handle_released, [self.log]),
            (evt.EVT_ABORTED, handle_aborted, [self.log]),
        ]

    def _listen(self, settings: Settings) -> GuardedServer:
        node = settings.node
        ssl_context = None
        if node.tls is not None:
            ssl_context = guarded_tls_context(server_context(node.tls))
        try:
            server = self.ae.make_server(  # returns an instance of server_class
                (node.host, node.port),
                ae_title=node.ae_title,
                contexts=build_contexts(node),
                ssl_context=ssl_context,
                evt_handlers=self._handlers(),
                server_class=GuardedServer,
                stream_limits=StreamLimits.from_settings(node, MAX_PDU_SIZE),
                pending_limits=_pending_limits(node),
            )
        except OSError as err:
            raise ConfigError(f"cannot listen on {node.host}:{node.port}: {err}") from err
        assert isinstance(server, GuardedServer)
        thread = threading.Thread(
            target=server.serve_forever, name=f"coronet-listener-{node.port}", daemon=True
        )
        thread.start()
        return server

    def start(self, block: bool = False) -> None:
        """Recover the spool, start the queue and listen; with ``block`` wait for stop()."""
        # Stream each received data set to a temporary file instead of memory.
        self._chunked_before = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        install_temp_files()
        quiet_tripped_connections()
        self.spool.prepare()
        removed = self.spool.remove_temporary() + self.temp_files.sweep()
        if removed:
            logger.info("removed %d partial writes from the spool", removed)
        self._stopped.clear()
        self.queue.start(recover=True)
        try:
            self._server = self._listen(self._settings)
        except BaseException:
            self.queue.stop()
            _config.STORE_RECV_CHUNKED_DATASET = self._chunked_before
            raise
        node = self._settings.node
        self.audit_trail.record(
            audit.application_activity(True, node.ae_title, launcher(), node.host)
        )
        logger.info(
            "%s listening on %s:%d (%s)",
            node.ae_title,
            node.host,
            self.address[1],
            "TLS" if node.tls else "no TLS",
        )
        if block:
            self._stopped.wait()

    def stop(self) -> None:
        """Stop listening, abort open associations and stop the queue."""
        with self._reload_lock:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
            for assoc in self.ae.active_associations:
                assoc.abort()
            self.queue.stop()
            _config.STORE_RECV_CHUNKED_DATASET = self._chunked_before
            was_running = not self._stopped.is_set()
            self._stopped.set()
        if was_running:
            node = self._settings.node
            self.audit_trail.record(
                audit.application_activity(False, node.ae_title, launcher(), node.host)
            )
        logger.info("stopped")

    def reload(self, settings: Settings) -> None:
        """Apply new settings to new associations; open associations are kept.

        Callers, our AE title, SOP classes, limits, timeouts, selection, grouping and broker
        apply at once; a new host, port or TLS setting opens a new listener before the old
        one closes.  ``storage.spool_dir`` needs a restart.
        """
        with self._reload_lock:
            old = self._settings
            if settings.storage.spool_dir != old.storage.spool_dir:
                logger.warning("storage.spool_dir changed: restart the node to apply it")
            if self._server is not None and _listen_key(settings.node) != _listen_key(old.node):
                new_server = self._listen(settings)
                self._server.shutdown()
                self._server = new_server
            elif self._server is not None:
                self._server.ae_title = settings.node.ae_title
                self._server.contexts = build_contexts(settings.node)
            self.ae.ae_title = settings.node.ae_title
            self._apply_limits(settings.node)
            self.ingest.rules = settings.selection
            self.ingest.min_free_bytes = settings.storage.min_free_bytes
            publisher = None
            if settings.broker != old.broker:
                publisher = CeleryQueue.from_settings(settings.broker, self.locate)
            self.queue.reload(settings.grouping, publisher)
            self._settings = settings
        logger.info(
            "configuration reloaded: %s on port %d, %d allowed callers",
            settings.node.ae_title,
            settings.node.port,
            len(settings.callers),
        )

    def active_associations(self) -> Sequence[Any]:
        return list(self.ae.active_associations)
