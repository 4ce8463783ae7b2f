"""The node's Storage SCP (PS3.4 Annex B) and Verification SCP (PS3.4 Annex A).

:class:`DicomNode` is built from :class:`~dicom_node.config.Settings` and explicit
dependencies (a :class:`~dicom_node.spool.Spool` and a
:class:`~dicom_node.queueing.StudyQueue`).  Its event handlers are small functions that get
their dependencies bound by pynetdicom (``(evt.EVT_C_STORE, handle_store, [ingest, log])``).

A C-STORE is answered Success only after the instance is on disk (write, fsync, rename, fsync
of the folder: see :mod:`dicom_node.spool`); the data set is streamed to a temporary file by
pynetdicom (``STORE_RECV_CHUNKED_DATASET``) and only its header is decoded here.

Association requests are checked against the *current* settings on every request, so
``reload()`` (SIGHUP) changes the allowed callers without dropping open associations.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import statuses
from dicom_node.config import NodeSettings, Settings, TLSSettings
from dicom_node.errors import ConfigError, IngestError
from dicom_node.queueing import CeleryQueue, StudyQueue
from dicom_node.selection import Decision, select
from dicom_node.spool import Spool, StoredInstance

logger = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
"""Verification SOP Class (PS3.4 A.4)."""

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
"""CR Image Storage and both DX Image Storage SOP Classes (PS3.4 B.5)."""

# Explicit VR Big Endian is retired (PS3.5 A.3) and not accepted: every sender must also
# offer Implicit VR Little Endian, the DICOM default (PS3.5 10.1), so nothing is lost.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    JPEGLSNearLossless,
    JPEG2000,
    JPEGExtended12Bit,
    JPEGBaseline8Bit,
)
"""Transfer syntaxes accepted for storage; Deflate is added when ``node.accept_deflate``."""

VERIFICATION_TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

MAX_PDU_SIZE = 1 << 20
"""Largest P-DATA PDU we accept (PS3.8 D.3.3.2.1); larger PDUs mean fewer per image."""

TLS_HANDSHAKE_TIMEOUT_S = 10.0


def transfer_syntaxes(node: NodeSettings) -> list[str]:
    """The storage transfer syntaxes for these settings, preferred first."""
    syntaxes = list(TRANSFER_SYNTAXES)
    if node.accept_deflate:
        syntaxes.insert(2, DeflatedExplicitVRLittleEndian)
    return syntaxes


def build_contexts(node: NodeSettings) -> list[PresentationContext]:
    """Storage contexts (CR, DX and ``node.extra_sop_classes``) plus Verification."""
    syntaxes = transfer_syntaxes(node)
    sop_classes = dict.fromkeys([*STORAGE_SOP_CLASSES, *node.extra_sop_classes])
    contexts = [build_context(uid, syntaxes) for uid in sop_classes]
    contexts.append(build_context(VERIFICATION_SOP_CLASS, list(VERIFICATION_TRANSFER_SYNTAXES)))
    return contexts


class _ServerTLSContext(ssl.SSLContext):
    """Bounds the handshake, which pynetdicom runs on the listener thread."""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        wrapped.settimeout(None)
        return wrapped


def build_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A server-side TLS context, TLS 1.2 at least (PS3.15 B.9)."""
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("node.tls needs cert_file and key_file", [("node.tls", "no certificate")])
    context = _ServerTLSContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"node.tls: cannot load certificates: {err}") from err
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


# --------------------------------------------------------------------------- access control


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source and reason."""

    result: int
    source: int
    reason: int
    why: str


def _addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as err:
        logger.warning("cannot resolve caller host %s: %s", host, err)
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}


def _normalise(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def check_association(
    settings: Settings, calling_ae: str, called_ae: str, peer_address: str
) -> Rejection | None:
    """Decide on an association request from the current settings; None means accept."""
    if called_ae.strip() != settings.node.ae_title:
        return Rejection(
            statuses.REJECTED_PERMANENT,
            statuses.SOURCE_SERVICE_USER,
            statuses.REASON_CALLED_AE_NOT_RECOGNISED,
            f"called AE title {called_ae.strip()!r} is not ours",
        )
    caller = settings.caller(calling_ae)
    if caller is None:
        return Rejection(
            statuses.REJECTED_PERMANENT,
            statuses.SOURCE_SERVICE_USER,
            statuses.REASON_CALLING_AE_NOT_RECOGNISED,
            f"calling AE title {calling_ae.strip()!r} is not an allowed caller",
        )
    if caller.host is not None:
        peer = _normalise(peer_address)
        if peer is None or peer not in _addresses(caller.host):
            return Rejection(
                statuses.REJECTED_PERMANENT,
                statuses.SOURCE_SERVICE_USER,
                statuses.REASON_CALLING_AE_NOT_RECOGNISED,
                f"caller {caller.ae_title!r} is allowed from {caller.host}, not {peer_address}",
            )
    return None


# --------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one C-STORE request."""

    status: int
    stored: StoredInstance | None = None
    decision: Decision | None = None
    problem: str = ""


class UndecodableError(ValueError):
    """The received data set cannot be decoded (answered with DATA_UNDECODABLE)."""


def _check_decodable(dataset: Dataset) -> None:
    """Decode every element of the header; raise UndecodableError on truncated values."""
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != 0xFFFFFFFF
            and raw.value is not None
            and len(raw.value) != raw.length
        ):
            raise UndecodableError(f"element {tag} is truncated")
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value:
                _check_decodable(item)


def read_header(path: Path) -> Dataset:
    """Decode the header (everything before Pixel Data) of a received instance."""
    with path.open("rb") as handle:  # OSError here is ours, not the peer's
        try:
            dataset = pydicom.dcmread(handle, stop_before_pixels=True)
            _check_decodable(dataset)
        except UndecodableError:
            raise
        except Exception as err:  # pydicom raises many types on malformed input
            # pydicom's message may quote element values (PHI): keep it at DEBUG only.
            logger.debug("undecodable data set: %s", err)
            raise UndecodableError(f"{type(err).__name__} while parsing") from err
    if "SOPClassUID" not in dataset and "SOPInstanceUID" not in dataset:
        raise UndecodableError("no SOP Class UID and no SOP Instance UID")
    return dataset


class Ingest:
    """The work behind a C-STORE: check, persist, select and schedule one instance."""

    def __init__(self, spool: Spool, queue: StudyQueue, settings: Settings) -> None:
        self.spool = spool
        self.queue = queue
        self.rules = settings.selection

    def receive(self, path: Path, sop_class_uid: str, sop_instance_uid: str) -> StoreOutcome:
        """Store the received file at ``path`` (it is moved into the spool)."""
        try:
            header = read_header(path)
        except UndecodableError as err:
            return StoreOutcome(statuses.DATA_UNDECODABLE, problem=f"cannot decode: {err}")
        except OSError as err:
            return StoreOutcome(statuses.OUT_OF_RESOURCES, problem=f"cannot read: {err}")
        mismatch = self._mismatch(header, sop_class_uid, sop_instance_uid)
        if mismatch:
            return StoreOutcome(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, problem=mismatch)
        decision = select(header, self.rules)
        try:
            stored = self.spool.store(
                path,
                sop_instance_uid,
                str(header.StudyInstanceUID),
                sop_class_uid=sop_class_uid,
                selected=decision.selected,
                reason=decision.reason,
                move=True,
            )
        except IngestError as err:
            return StoreOutcome(statuses.OUT_OF_RESOURCES, problem=str(err))
        if not stored.duplicate and decision.selected:
            self.queue.notify(stored.study_key, stored.instance_key)
        return StoreOutcome(statuses.SUCCESS, stored, decision)

    @staticmethod
    def _mismatch(header: Dataset, sop_class_uid: str, sop_instance_uid: str) -> str:
        """Why the data set does not match the request (PS3.4 B.2.3), or ''."""
        if str(header.get("SOPClassUID", "")).strip() != sop_class_uid.strip():
            return "SOP Class UID differs from the request's Affected SOP Class UID"
        if str(header.get("SOPInstanceUID", "")).strip() != sop_instance_uid.strip():
            return "SOP Instance UID differs from the request's Affected SOP Instance UID"
        if not str(header.get("StudyInstanceUID", "")).strip():
            return "no Study Instance UID"
        return ""


# --------------------------------------------------------------------------- association log


@dataclass
class _Counts:
    caller: str
    address: str
    stored: int = 0
    duplicates: int = 0
    not_selected: int = 0
    failed: int = 0
    bytes: int = 0
    failures: dict[int, int] = field(default_factory=dict)


class AssociationLog:
    """Per-association counters, summarised at INFO when the association ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: weakref.WeakKeyDictionary[Any, _Counts] = weakref.WeakKeyDictionary()

    def _get(self, assoc: Any) -> _Counts:
        counts = self._counts.get(assoc)
        if counts is None:
            counts = _Counts(assoc.requestor.ae_title.strip(), assoc.requestor.address)
            self._counts[assoc] = counts
        return counts

    def record(self, assoc: Any, outcome: StoreOutcome) -> None:
        with self._lock:
            counts = self._get(assoc)
            if outcome.status != statuses.SUCCESS:
                counts.failed += 1
                counts.failures[outcome.status] = counts.failures.get(outcome.status, 0) + 1
            elif outcome.stored is not None and outcome.stored.duplicate:
                counts.duplicates += 1
            else:
                counts.stored += 1
                counts.bytes += outcome.stored.bytes if outcome.stored else 0
                if outcome.decision is not None and not outcome.decision.selected:
                    counts.not_selected += 1

    def finish(self, assoc: Any, how: str) -> None:
        with self._lock:
            counts = self._counts.pop(assoc, None)
        if counts is None:
            counts = _Counts(assoc.requestor.ae_title.strip(), assoc.requestor.address)
        failures = ", ".join(
            f"{statuses.describe(s)} x{n}" for s, n in sorted(counts.failures.items())
        )
        logger.info(
            "association from %s (%s) %s: %d stored (%d not selected), %d duplicates, "
            "%d failed%s, %.1f MB",
            counts.caller,
            counts.address,
            how,
            counts.stored,
            counts.not_selected,
            counts.duplicates,
            counts.failed,
            f" [{failures}]" if failures else "",
            counts.bytes / 1e6,
        )


# --------------------------------------------------------------------------- handlers


def handle_requested(event: Event, node: DicomNode) -> None:
    """EVT_REQUESTED: reject unknown callers and wrong called AE titles (PS3.8 9.3.4)."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    try:
        assert request is not None
        rejection = check_association(
            node.settings,
            str(request.calling_ae_title),
            str(request.called_ae_title),
            assoc.requestor.address,
        )
    except Exception:  # fail closed: a bug here must not let a caller in
        logger.exception("cannot check an association request; rejecting it")
        rejection = Rejection(
            statuses.REJECTED_PERMANENT,
            statuses.SOURCE_SERVICE_USER,
            statuses.REASON_NO_REASON,
            "internal error while checking the request",
        )
    if rejection is None:
        return
    logger.info("rejected association from %s: %s", assoc.requestor.address, rejection.why)
    assoc.acse.send_reject(rejection.result, rejection.source, rejection.reason)
    assoc.kill()  # returns once the A-ASSOCIATE-RJ is out and the peer closed (PS3.8 9.1.4)


def handle_store(event: Event, ingest: Ingest, log: AssociationLog) -> int:
    """EVT_C_STORE: persist, then answer; never Success unless the instance is on disk."""
    request = cast(C_STORE, event.request)
    try:
        outcome = ingest.receive(
            event.dataset_path,
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
        )
    except Exception:  # a bug must not kill the association: answer a failure status
        logger.exception("unexpected error while storing an instance")
        outcome = StoreOutcome(statuses.PROCESSING_FAILURE, problem="internal error")
    log.record(event.assoc, outcome)
    if outcome.status != statuses.SUCCESS:
        logger.warning(
            "C-STORE from %s refused with %s: %s",
            event.assoc.requestor.ae_title.strip(),
            statuses.describe(outcome.status),
            outcome.problem,
        )
    elif outcome.stored is not None and outcome.decision is not None:
        stored = outcome.stored
        if not outcome.decision.selected:
            logger.info(
                "stored %s/%s, not queued: %s",
                stored.study_key,
                stored.instance_key,
                outcome.decision.reason,
            )
        else:
            logger.debug("stored %s/%s", stored.study_key, stored.instance_key)
    return outcome.status


def handle_released(event: Event, log: AssociationLog) -> None:
    log.finish(event.assoc, "released")


def handle_aborted(event: Event, log: AssociationLog) -> None:
    log.finish(event.assoc, "aborted")


# --------------------------------------------------------------------------- the node


def _listen_key(node: NodeSettings) -> tuple[object, ...]:
    return (node.host, node.port, node.tls)


class DicomNode:
    """The Storage and Verification SCP: ``start()``, ``reload(settings)``, ``stop()``.

    ``start()`` also starts the study queue (with recovery of pending spooled studies) and
    ``stop()`` stops it.
    """

    def __init__(self, settings: Settings, spool: Spool, queue: StudyQueue) -> None:
        self._settings = settings
        self.spool = spool
        self.queue = queue
        self.ingest = Ingest(spool, queue, settings)
        self.log = AssociationLog()
        self.ae = AE(ae_title=settings.node.ae_title)
        self.ae.maximum_pdu_size = MAX_PDU_SIZE
        self._apply_limits(settings.node)
        self._server: ThreadedAssociationServer | None = None
        self._stopped = threading.Event()
        self._reload_lock = threading.Lock()
        self._chunked_before = _config.STORE_RECV_CHUNKED_DATASET

    @classmethod
    def from_settings(cls, settings: Settings, **queue_options: float) -> DicomNode:
        """Build the spool, the Celery producer and the study queue from ``settings``."""
        spool = Spool(settings.storage.spool_dir)
        publisher = CeleryQueue.from_settings(settings.broker)
        queue = StudyQueue(spool, publisher, settings.grouping, **queue_options)
        return cls(settings, spool, queue)

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
        self.ae.maximum_associations = node.max_associations
        self.ae.acse_timeout = node.timeouts.acse
        self.ae.dimse_timeout = node.timeouts.dimse
        self.ae.network_timeout = node.timeouts.network

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, handle_requested, [self]),
            (evt.EVT_C_STORE, handle_store, [self.ingest, self.log]),
            (evt.EVT_RELEASED, handle_released, [self.log]),
            (evt.EVT_ABORTED, handle_aborted, [self.log]),
        ]

    def _listen(self, settings: Settings) -> ThreadedAssociationServer:
        node = settings.node
        ssl_context = build_ssl_context(node.tls) if node.tls is not None else None
        try:
            server = self.ae.start_server(
                (node.host, node.port),
                block=False,
                ssl_context=ssl_context,
                evt_handlers=self._handlers(),
                ae_title=node.ae_title,
                contexts=build_contexts(node),
            )
        except OSError as err:
            raise ConfigError(f"cannot listen on {node.host}:{node.port}: {err}") from err
        assert server is not None
        return server

    def start(self, block: bool = False) -> None:
        """Recover the spool, start the queue and listen; with ``block`` wait for stop()."""
        # Stream each received data set to a temporary file instead of memory.
        self._chunked_before = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        removed = self.spool.remove_temporary()
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
            self._stopped.set()
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
            publisher = None
            if settings.broker != old.broker:
                publisher = CeleryQueue.from_settings(settings.broker)
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
