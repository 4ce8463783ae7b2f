"""The worker's Storage SCU: C-STORE of the SR and SC results to a destination (PS3.4 B).

:func:`send_files` opens one association per call with a destination from the configuration
(AE title, host, port, optional TLS 1.2+ per PS3.15 B.9), sends each file and classifies every
answer with :func:`classify_status`:

* ``DELIVERED``: Success, any warning (Bxxx) and Duplicate SOP Instance (the destination already
  holds this UID; our UIDs are deterministic, so it holds this result);
* ``TRANSIENT``: Out of Resources (A7xx), Resource Limitation, Processing Failure, Duplicate
  Invocation, Cancel, and no answer at all (timeout, aborted association): try again later;
* ``PERMANENT``: Data Set does not match SOP Class (A9xx), Cannot Understand (Cxxx), SOP Class
  not supported, Not Authorized, and any status we do not know: sending again will not help.

A failure to associate raises instead: :class:`~dicom_node.core.errors.TransientDeliveryError`
when it may go away (connection refused, timeout, A-ASSOCIATE-RJ "rejected-transient", aborted),
and :class:`~dicom_node.core.errors.PermanentDeliveryError` for "rejected-permanent" (e.g. our
calling AE title is not known there; PS3.8 9.3.4) or a destination that accepts none of our SOP
classes.

:class:`Sender` binds our AE title and timeouts once, so every caller sends the same way;
:func:`echo` opens the same kind of association for a C-ECHO (PS3.7 9.1.5).
"""

from __future__ import annotations

import enum
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.core import statuses
from dicom_node.core.errors import (
    PermanentDeliveryError,
    TransientDeliveryError,
)
from dicom_node.core.settings import Destination, Settings, Timeouts
from dicom_node.core.tls import client_context

logger = logging.getLogger(__name__)

RESULT_SOP_CLASSES: Final[tuple[str, ...]] = (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
)
"""Storage SOP Classes of our results: Comprehensive 3D SR and Secondary Capture (PS3.4 B.5)."""

UNCOMPRESSED: Final[tuple[str, ...]] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
"""Proposed for every result; pynetdicom converts between the two when needed."""

MAX_PDU_SIZE: Final = 1 << 20
"""Largest P-DATA PDU we accept from the destination (PS3.8 D.3.3.2.1)."""

VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"
"""Verification SOP Class (PS3.4 A.4)."""


class Disposition(enum.Enum):
    """What a C-STORE answer means for the result."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


_DELIVERED_CODES: Final = frozenset({statuses.SUCCESS, statuses.DUPLICATE_SOP_INSTANCE})
_TRANSIENT_CODES: Final = frozenset(
    {
        statuses.PROCESSING_FAILURE,
        statuses.DUPLICATE_INVOCATION,
        statuses.RESOURCE_LIMITATION,
        statuses.CANCEL,
    }
)


def classify_status(status: int | None) -> Disposition:
    """Map a C-STORE response status (``None``: no response) to a :class:`Disposition`."""
    if status is None:
        return Disposition.TRANSIENT
    if status in _DELIVERED_CODES or status in statuses.WARNING_RANGE:
        return Disposition.DELIVERED
    if status in _TRANSIENT_CODES or status in statuses.OUT_OF_RESOURCES_RANGE:
        return Disposition.TRANSIENT
    return Disposition.PERMANENT


def describe_status(status: int | None) -> str:
    """``0xA701 (Refused: Out of resources)``, naming ranges as well as single codes."""
    if status is None:
        return "no response"
    if status in statuses.NAMES:
        return statuses.describe(status)
    for codes, name in (
        (statuses.OUT_OF_RESOURCES_RANGE, "Refused: Out of resources"),
        (statuses.DATASET_DOES_NOT_MATCH_RANGE, "Error: Data Set does not match SOP Class"),
        (statuses.CANNOT_UNDERSTAND_RANGE, "Error: Cannot understand"),
        (statuses.WARNING_RANGE, "Warning"),
    ):
        if status in codes:
            return f"0x{status:04X} ({name})"
    return statuses.describe(status)


@dataclass(frozen=True)
class SendOutcome:
    """The answer to one C-STORE of one file."""

    path: Path
    disposition: Disposition
    status: int | None
    detail: str


def _where(destination: Destination) -> str:
    return f"{destination.name} ({destination.ae_title} at {destination.host}:{destination.port})"


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise TransientDeliveryError(f"cannot read result {path.name}: {err}") from err


def _application_entity(calling_ae: str, timeouts: Timeouts) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.maximum_pdu_size = MAX_PDU_SIZE
    return ae


def _associate(ae: AE, destination: Destination) -> Association:
    tls_args = None
    if destination.tls is not None:
        tls_args = (client_context(destination.tls), destination.host)
    where = _where(destination)
    try:
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
        )
    except (OSError, ssl.SSLError) as err:  # e.g. name resolution inside pynetdicom
        raise TransientDeliveryError(f"cannot reach {where}: {err}") from err
    if assoc.is_established:
        return assoc
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        reply = assoc.acceptor.primitive
        why = (
            f"association rejected by {where} (result {reply.result}, "
            f"source {reply.result_source}, reason {reply.diagnostic}; PS3.8 9.3.4)"
        )
        if reply.result == statuses.REJECTED_PERMANENT:
            raise PermanentDeliveryError(why)
        raise TransientDeliveryError(why)
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # The peer answered, accepting none of our presentation contexts; pynetdicom aborts.
        raise PermanentDeliveryError(f"{where} accepts none of the proposed SOP classes")
    raise TransientDeliveryError(f"no association with {where} (refused, unreachable or aborted)")


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeouts: Timeouts,
) -> list[SendOutcome]:
    """C-STORE ``paths`` (DICOM files) to ``destination`` in one association, in order.

    Returns one :class:`SendOutcome` per file.  Raises :class:`TransientDeliveryError` or
    :class:`PermanentDeliveryError` when no association can be made (see module doc).
    """
    if not paths:
        return []
    datasets = [(path, _read(path)) for path in paths]
    sop_classes = [str(ds.SOPClassUID) for _, ds in datasets]
    ae = _application_entity(calling_ae, timeouts)
    for sop_class in dict.fromkeys([*RESULT_SOP_CLASSES, *sop_classes]):
        ae.add_requested_context(sop_class, list(UNCOMPRESSED))
    assoc = _associate(ae, destination)
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    if not accepted & set(sop_classes):
        assoc.release()
        raise PermanentDeliveryError(
            f"{_where(destination)} accepts none of the result SOP classes (PS3.4 B.5)"
        )
    outcomes: list[SendOutcome] = []
    try:
        for path, ds in datasets:
            outcomes.append(_store_one(assoc, path, ds, accepted))
    finally:
        if assoc.is_established:
            assoc.release()
    for outcome in outcomes:
        level = logging.DEBUG if outcome.disposition is Disposition.DELIVERED else logging.WARNING
        logger.log(
            level,
            "C-STORE of %s to %s: %s (%s)",
            outcome.path.stem,
            destination.name,
            outcome.disposition.value,
            outcome.detail,
        )
    return outcomes


def _store_one(assoc: Association, path: Path, ds: Dataset, accepted: set[str]) -> SendOutcome:
    sop_class = UID(str(ds.SOPClassUID))
    if sop_class not in accepted:
        return SendOutcome(
            path,
            Disposition.PERMANENT,
            statuses.SOP_CLASS_NOT_SUPPORTED,
            f"the destination did not accept a presentation context for {sop_class.name}",
        )
    if not assoc.is_established:
        return SendOutcome(path, Disposition.TRANSIENT, None, "association lost before sending")
    response = assoc.send_c_store(ds)
    status = response.get("Status") if response else None
    code = None if status is None else int(status)
    return SendOutcome(path, classify_status(code), code, describe_status(code))


SendFn = Callable[[Destination, Sequence[Path]], list[SendOutcome]]
"""Sends files to one destination; :class:`Sender` is the real one."""


@dataclass(frozen=True)
class Sender:
    """C-STORE of result files with our AE title and timeouts (the one send binding)."""

    calling_ae: str
    timeouts: Timeouts

    @classmethod
    def from_settings(cls, settings: Settings) -> Sender:
        return cls(settings.node.ae_title, settings.node.timeouts)

    def __call__(self, destination: Destination, paths: Sequence[Path]) -> list[SendOutcome]:
        return send_files(destination, paths, calling_ae=self.calling_ae, timeouts=self.timeouts)


def echo(settings: Settings, name: str, timeout: float) -> tuple[bool, str]:
    """C-ECHO (PS3.7 9.1.5) to the configured destination ``name``; return (ok, message)."""
    destination = settings.destination(name)
    ae = _application_entity(
        settings.node.ae_title, Timeouts(acse=timeout, dimse=timeout, network=timeout)
    )
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    where = _where(destination)
    try:
        assoc = _associate(ae, destination)
    except (TransientDeliveryError, PermanentDeliveryError) as err:
        return False, f"C-ECHO to {where}: {err}"
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    status = response.get("Status") if response else None
    if status is None:
        return False, f"C-ECHO to {where}: no response within {timeout:g} s"
    ok = status == statuses.SUCCESS
    return ok, f"C-ECHO to {where}: {statuses.describe(int(status))}"


__all__ = [
    "RESULT_SOP_CLASSES",
    "Disposition",
    "SendFn",
    "SendOutcome",
    "Sender",
    "classify_status",
    "describe_status",
    "echo",
    "send_files",
]
