"""A guarded receive path for pynetdicom's acceptor: bounded PDUs, read deadlines, pending caps.

pynetdicom 3.0 reads a PDU by trusting its declared length (a 4 GB A-ASSOCIATE-RQ is buffered
in full), reads accepted sockets without a timeout (a peer that sends half a header holds its
thread and slot for ever) and does the TLS handshake on the listener thread (one silent client
stalls every accept).  It has no option for any of this, so this module adds the limits around
it without changing it:

* :class:`GuardedSocket` / :class:`GuardedSSLSocket` are the sockets pynetdicom reads from.
  Their ``recv`` follows the PDU stream (PS3.8 9.3): a PDU's declared length is checked the
  moment its 6-byte header has arrived, before pynetdicom asks for the body (A-ASSOCIATE-RQ
  against ``node.limits.max_associate_request_bytes``, P-DATA-TF against the maximum PDU length
  we announced); the data set bytes of one DIMSE message are counted across P-DATA-TF PDUs
  against ``node.limits.max_instance_bytes`` (PS3.8 E.2); and every read has a deadline: the
  ACSE timeout from connection until the A-ASSOCIATE-RQ is complete, then the network timeout
  for each PDU.  A breach raises :class:`GuardError` (an ``OSError``, which pynetdicom treats as
  a closed transport connection) after shutting the connection down.
* :class:`GuardedServer` accepts on the listener thread only; the TLS handshake and the wrapping
  into a guarded socket happen on the connection's own thread, with their own deadline.  It
  refuses a connection when too many are pending (connected, not yet associated) from its
  address or in all.  Pending connections take no association slot: ``node.max_associations``
  counts established associations (:mod:`dicom_node.scp.handlers`).

Every refused or failed connection is logged once, with the peer address and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.core.settings import NodeSettings

logger = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT_S: Final = 10.0
"""Longest TLS handshake, on the connection's own thread."""

_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length (PS3.8 9.3.1)
_PDV_HEADER = struct.Struct(">LBB")  # PDV item length, context ID, message control header
_A_ASSOCIATE_RQ: Final = 0x01
_P_DATA_TF: Final = 0x04
_OTHER_PDU_MAX: Final = 64 * 1024  # AC, RJ, release and abort PDUs are a few bytes
_COMMAND_MAX: Final = 64 * 1024  # a DIMSE command set is a few hundred bytes
_MCH_COMMAND: Final = 0x01  # PS3.8 E.2: message control header bits
_MCH_LAST: Final = 0x02


class GuardError(OSError):
    """A peer broke a limit of the receive path; its connection is closed."""


@dataclass(frozen=True)
class StreamLimits:
    """The limits of one connection's PDU stream (see the module docstring)."""

    max_associate_request: int
    max_pdu: int
    max_instance: int
    acse_timeout: float
    pdu_timeout: float

    @classmethod
    def from_settings(cls, node: NodeSettings, max_pdu: int) -> StreamLimits:
        return cls(
            max_associate_request=node.limits.max_associate_request_bytes,
            max_pdu=max_pdu,
            max_instance=node.limits.max_instance_bytes,
            acse_timeout=node.timeouts.acse,
            pdu_timeout=node.timeouts.network,
        )


class PDUStream:
    """Follows the bytes of one connection, PDU by PDU, and enforces :class:`StreamLimits`."""

    def __init__(self, limits: StreamLimits, now: float) -> None:
        self.limits = limits
        self._associate_deadline: float | None = now + limits.acse_timeout
        self._pdu_deadline: float | None = None
        self._header = bytearray()
        self._pdu_type = 0
        self._body_left = 0
        self._pdv_header = bytearray()
        self._pdv_left = 0
        self._pdv_is_data = False
        self._pdv_is_last = False
        self._command_bytes = 0
        self._data_bytes = 0

    @property
    def associating(self) -> bool:
        """The A-ASSOCIATE-RQ has not been received in full yet."""
        return self._associate_deadline is not None

    def time_left(self, now: float) -> float:
        """Seconds the next read may block; raises GuardError when a deadline has passed."""
        deadlines = [d for d in (self._associate_deadline, self._pdu_deadline) if d is not None]
        if not deadlines:
            return self.limits.pdu_timeout
        left = min(deadlines) - now
        if left <= 0:
            phase = "association" if self._associate_deadline is not None else "PDU"
            raise GuardError(f"{phase} not received in time")
        return left

    def feed(self, data: bytes, now: float) -> None:
        """Account for ``data`` just read; raises GuardError on a breach."""
        view = memoryview(data)
        while view:
            view = self._take_header(view, now) if self._body_left == 0 else self._take_body(view)

    def _take_header(self, view: memoryview, now: float) -> memoryview:
        if not self._header:
            self._pdu_deadline = now + self.limits.pdu_timeout
        take = min(len(view), _HEADER.size - len(self._header))
        self._header += view[:take]
        if len(self._header) == _HEADER.size:
            pdu_type, _, length = _HEADER.unpack(self._header)
            self._header.clear()
            self._check_length(pdu_type, length)
            self._pdu_type, self._body_left = pdu_type, length
            if length == 0:
                self._pdu_done()
        return view[take:]

    def _check_length(self, pdu_type: int, length: int) -> None:
        if pdu_type == _A_ASSOCIATE_RQ:
            cap, what = self.limits.max_associate_request, "A-ASSOCIATE-RQ"
        elif pdu_type == _P_DATA_TF:
            cap, what = self.limits.max_pdu, "P-DATA-TF"
        else:
            cap, what = _OTHER_PDU_MAX, f"PDU type 0x{pdu_type:02X}"
        if length > cap:
            raise GuardError(f"{what} declares {length} bytes, more than the {cap} allowed")

    def _take_body(self, view: memoryview) -> memoryview:
        take = min(len(view), self._body_left)
        if self._pdu_type == _P_DATA_TF:
            self._take_pdvs(view[:take])
        self._body_left -= take
        if self._body_left == 0:
            self._pdu_done()
        return view[take:]

    def _pdu_done(self) -> None:
        if self._pdu_type == _A_ASSOCIATE_RQ:
            self._associate_deadline = None
        if self._pdu_type == _P_DATA_TF and (self._pdv_left or self._pdv_header):
            raise GuardError("a presentation data value runs past the end of its P-DATA-TF")
        self._pdu_deadline = None

    def _take_pdvs(self, view: memoryview) -> None:
        """PDV items of a P-DATA-TF body (PS3.8 9.3.5.1, E.2)."""
        while view:
            if self._pdv_left == 0:
                take = min(len(view), _PDV_HEADER.size - len(self._pdv_header))
                self._pdv_header += view[:take]
                view = view[take:]
                if len(self._pdv_header) < _PDV_HEADER.size:
                    return
                item_length, _, control = _PDV_HEADER.unpack(self._pdv_header)
                self._pdv_header.clear()
                if item_length < 2 or item_length - 2 > self._body_left:
                    raise GuardError(f"malformed presentation data value ({item_length} bytes)")
                self._pdv_left = item_length - 2
                self._pdv_is_data = not control & _MCH_COMMAND
                self._pdv_is_last = bool(control & _MCH_LAST)
                self._count(0)
                continue
            take = min(len(view), self._pdv_left)
            self._pdv_left -= take
            self._count(take)
            view = view[take:]

    def _count(self, size: int) -> None:
        if self._pdv_is_data:
            self._data_bytes += size
            if self._data_bytes > self.limits.max_instance:
                raise GuardError(
                    f"data set larger than node.limits.max_instance_bytes "
                    f"({self.limits.max_instance} bytes)"
                )
        else:
            self._command_bytes += size
            if self._command_bytes > _COMMAND_MAX:
                raise GuardError(f"DIMSE command set larger than {_COMMAND_MAX} bytes")
        if self._pdv_left == 0 and self._pdv_is_last:
            if self._pdv_is_data:
                self._data_bytes = 0
            else:
                self._command_bytes = 0


_TRIPPED = threading.local()


class QuietTrippedConnections(logging.Filter):
    """Drops pynetdicom's DUL log records (an ERROR line and a traceback) for a connection
    the guard closed: the guard has logged it once already.  Attached to ``pynetdicom.dul``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_TRIPPED, "tripped", False)


def quiet_tripped_connections() -> None:
    """Attach :class:`QuietTrippedConnections` to pynetdicom's DUL logger (idempotent)."""
    dul = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, QuietTrippedConnections) for f in dul.filters):
        dul.addFilter(QuietTrippedConnections())


class _Guarded:
    """``recv`` with the checks of a :class:`PDUStream`; mixed into the socket classes."""

    _stream: PDUStream | None = None
    _tripped: bool = False
    _peer: str = "?"

    def guard(self, stream: PDUStream, peer: str) -> None:
        self._stream, self._peer = stream, peer

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._tripped:
            return b""  # the connection is closed for pynetdicom too
        stream = self._stream
        if stream is None:
            return super().recv(buflen, flags)  # type: ignore[misc]
        try:
            self.settimeout(stream.time_left(time.monotonic()))  # type: ignore[attr-defined]
            data: bytes = super().recv(buflen, flags)  # type: ignore[misc]
            stream.feed(data, time.monotonic())
        except TimeoutError:
            raise self._trip(GuardError("read timed out")) from None
        except GuardError as err:
            raise self._trip(err) from None
        return data

    def _trip(self, err: GuardError) -> GuardError:
        """Log the breach once and shut the connection down; returns ``err`` to raise."""
        logger.warning("closed connection from %s: %s", self._peer, err)
        associating = self._stream is not None and self._stream.associating
        self._stream, self._tripped = None, True
        _TRIPPED.tripped = True  # this thread is the connection's DUL thread
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        if associating:
            # pynetdicom's acceptor waits the whole ACSE timeout for the A-ASSOCIATE-RQ that
            # will never come; an empty item in its queue is what a timeout returns, so the
            # association thread ends now and frees its pending slot.
            to_user = getattr(threading.current_thread(), "to_user_queue", None)
            if to_user is not None:
                to_user.put(None)
        return err


class GuardedSocket(_Guarded, socket.socket):
    """A plain TCP connection with a guarded ``recv``."""

    @classmethod
    def adopt(cls, raw: socket.socket) -> GuardedSocket:
        """The same connection as ``raw`` (which is detached), as a guarded socket."""
        return cls(raw.family, raw.type, raw.proto, fileno=raw.detach())


class GuardedSSLSocket(_Guarded, ssl.SSLSocket):
    """A TLS connection with a guarded ``recv`` (set as the context's ``sslsocket_class``)."""


def guarded_tls_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context``, wrapping into :class:`GuardedSSLSocket`."""
    context.sslsocket_class = GuardedSSLSocket
    return context


@dataclass(frozen=True)
class PendingLimits:
    """How many connections may wait for association, from one address and in all."""

    per_peer: int
    total: int


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the guarded receive path (module docstring).

    Built by ``AE.make_server(..., server_class=GuardedServer, stream_limits=...,
    pending_limits=...)``.
    """

    daemon_threads = True

    def __init__(
        self,
        *args: Any,
        stream_limits: StreamLimits,
        pending_limits: PendingLimits,
        **kwargs: Any,
    ) -> None:
        self.stream_limits = stream_limits
        self.pending_limits = pending_limits
        self._handshaking: Counter[str] = Counter()
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only; TLS happens on the connection's thread (:meth:`process_request_thread`)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def pending(self, peer: str | None = None) -> int:
        """Connections not yet associated (in a TLS handshake or negotiating), from ``peer``
        or from anyone."""
        waiting = [
            a
            for a in self.active_associations
            if not a.is_established and (peer is None or a.requestor.address == peer)
        ]
        with self._lock:
            shaking = self._handshaking[peer] if peer else sum(self._handshaking.values())
        return len(waiting) + shaking

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0])
        if self.pending(peer) >= self.pending_limits.per_peer:
            logger.warning(
                "refused connection from %s: %d connections of it wait for association "
                "(node.limits.max_pending_per_peer)",
                peer,
                self.pending_limits.per_peer,
            )
            return False
        if self.pending() >= self.pending_limits.total:
            logger.warning(
                "refused connection from %s: %d connections wait for association "
                "(node.limits.max_pending_connections)",
                peer,
                self.pending_limits.total,
            )
            return False
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            with self._lock:
                self._handshaking[str(client_address[0])] += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """On the connection's thread: TLS handshake, guarded socket, then pynetdicom."""
        peer = str(client_address[0])
        try:
            guarded = self._guarded(request, peer)
        finally:
            if self.ssl_context is not None:
                with self._lock:
                    self._handshaking[peer] -= 1
        if guarded is not None:
            guarded.guard(PDUStream(self.stream_limits, time.monotonic()), peer)
            super().process_request_thread(guarded, client_address)

    def _guarded(self, raw: socket.socket, peer: str) -> GuardedSocket | GuardedSSLSocket | None:
        context = self.ssl_context
        if context is None:
            return GuardedSocket.adopt(raw)
        raw.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        connection: socket.socket = raw
        try:
            connection = tls = context.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
            tls.do_handshake()
        except (OSError, ssl.SSLError) as err:  # timeouts included
            logger.warning("TLS handshake with %s failed: %s", peer, err or "timed out")
            connection.close()  # wrap_socket took the descriptor over from raw
            return None
        if not isinstance(tls, GuardedSSLSocket):  # the context was not made guarded
            raise TypeError("the TLS context must wrap into GuardedSSLSocket")
        tls.settimeout(None)
        return tls

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket.

        pynetdicom's own ``shutdown`` also unregisters the server from the AE's private list
        of servers that ``AE.start_server`` keeps; this server is made with ``make_server``.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()
