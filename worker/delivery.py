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

A failure to associate raises instead: :class:`~dicom_node.errors.DeliveryError` when it may go
away (connection refused, timeout, A-ASSOCIATE-RJ "rejected-transient", aborted), and
:class:`~dicom_node.errors.PermanentDeliveryError` for "rejected-permanent" (e.g. our calling AE
title is not known there; PS3.8 9.3.4) or a destination that accepts none of our SOP classes.
"""

from __future__ import annotations

import enum
import logging
import ssl
from collections.abc import Sequence
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

from dicom_node import statuses
from dicom_node.config import Destination, Timeouts, TLSSettings
from dicom_node.errors import ConfigError, DeliveryError, PermanentDeliveryError

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


def client_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A client TLS context, TLS 1.2 at least (PS3.15 B.9), verifying the destination.

    ``ca_file`` verifies the destination's certificate (the system CAs when absent); with
    ``cert_file``/``key_file`` we present a client certificate.
    """
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"destination TLS: cannot load certificates: {err}") from err
    return context


def _where(destination: Destination) -> str:
    return f"{destination.name} ({destination.ae_title} at {destination.host}:{destination.port})"


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise DeliveryError(f"cannot read result {path.name}: {err}") from err


def _application_entity(calling_ae: str, timeouts: Timeouts, sop_classes: Sequence[str]) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.maximum_pdu_size = MAX_PDU_SIZE
    for sop_class in dict.fromkeys([*RESULT_SOP_CLASSES, *sop_classes]):
        ae.add_requested_context(sop_class, list(UNCOMPRESSED))
    return ae


def _associate(ae: AE, destination: Destination) -> Association:
    tls_args = None
    if destination.tls is not None:
        tls_args = (client_ssl_context(destination.tls), destination.host)
    where = _where(destination)
    try:
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
        )
    except (OSError, ssl.SSLError) as err:  # e.g. name resolution inside pynetdicom
        raise DeliveryError(f"cannot reach {where}: {err}") from err
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
        raise DeliveryError(why)
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # The peer answered, accepting none of our presentation contexts; pynetdicom aborts.
        raise PermanentDeliveryError(f"{where} accepts none of the result SOP classes (PS3.4 B.5)")
    raise DeliveryError(f"no association with {where} (refused, unreachable or aborted)")


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeouts: Timeouts,
) -> list[SendOutcome]:
    """C-STORE ``paths`` (DICOM files) to ``destination`` in one association, in order.

    Returns one :class:`SendOutcome` per file.  Raises :class:`DeliveryError` or
    :class:`PermanentDeliveryError` when no association can be made (see module doc).
    """
    if not paths:
        return []
    datasets = [(path, _read(path)) for path in paths]
    sop_classes = [str(ds.SOPClassUID) for _, ds in datasets]
    ae = _application_entity(calling_ae, timeouts, sop_classes)
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


__all__ = [
    "RESULT_SOP_CLASSES",
    "Disposition",
    "SendOutcome",
    "classify_status",
    "client_ssl_context",
    "describe_status",
    "send_files",
]
