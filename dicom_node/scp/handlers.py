"""pynetdicom event handlers of the node, each small and with its dependencies bound explicitly
(``(evt.EVT_C_STORE, handle_store, [ingest, log])``), and the per-association log, which also
feeds the node's metrics (:mod:`dicom_node.scp.metrics`) and audit messages
(:mod:`dicom_node.scp.auditing`).

A handler never lets an exception escape: an error while storing becomes a failure status, an
error while checking an association request a rejection (fail closed).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_node.core import statuses
from dicom_node.core.settings import Settings
from dicom_node.scp.access import Rejection, check_association
from dicom_node.scp.auditing import AssociationAudit, StudyTally
from dicom_node.scp.ingest import Ingest, StoreOutcome
from dicom_node.scp.metrics import NodeMetrics
from dicom_node.scp.tempfiles import TempFiles

logger = logging.getLogger(__name__)


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
    studies: dict[str, StudyTally] = field(default_factory=dict)


class AssociationLog:
    """Per-association counters, summarised at INFO when the association ends; the metrics
    and the audit messages of associations and stores."""

    def __init__(
        self, metrics: NodeMetrics | None = None, audit: AssociationAudit | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._counts: weakref.WeakKeyDictionary[Any, _Counts] = weakref.WeakKeyDictionary()
        self.metrics = metrics or NodeMetrics()
        self.audit = audit

    def accepted(self, assoc: Any) -> None:
        self.metrics.accepted()
        if self.audit is not None:
            self.audit.accepted(assoc.requestor.ae_title.strip(), assoc.requestor.address)

    def rejected(self, assoc: Any, rejection: Rejection, calling_ae: str) -> None:
        self.metrics.rejected(rejection.label)
        if self.audit is not None:
            self.audit.rejected(calling_ae.strip(), assoc.requestor.address, rejection.why)

    def _get(self, assoc: Any) -> _Counts:
        counts = self._counts.get(assoc)
        if counts is None:
            counts = _Counts(assoc.requestor.ae_title.strip(), assoc.requestor.address)
            self._counts[assoc] = counts
        return counts

    def record(self, assoc: Any, outcome: StoreOutcome) -> None:
        stored = outcome.stored
        self.metrics.stored(
            outcome.status,
            stored is not None and stored.duplicate,
            stored.bytes if stored is not None else 0,
        )
        with self._lock:
            counts = self._get(assoc)
            if outcome.status == statuses.SUCCESS and outcome.study_uid is not None:
                tally = counts.studies.setdefault(outcome.study_uid, StudyTally())
                tally.add(outcome.sop_class_uid, outcome.patient_id)
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
        if self.audit is not None:
            self.audit.ended(counts.caller, counts.address, how, counts.studies)


# --------------------------------------------------------------------------- handlers


def handle_requested(
    event: Event,
    current_settings: Callable[[], Settings],
    established: Callable[[], int],
    log: AssociationLog,
) -> None:
    """EVT_REQUESTED: reject unknown callers, wrong called AE titles, and any caller once
    ``node.max_associations`` associations are established (PS3.8 9.3.4).

    Only established associations count: connections still negotiating take no slot.
    """
    assoc = event.assoc
    request = assoc.requestor.primitive
    calling_ae = ""
    try:
        assert request is not None
        settings = current_settings()
        calling_ae = str(request.calling_ae_title)
        rejection = check_association(
            settings,
            str(request.calling_ae_title),
            str(request.called_ae_title),
            assoc.requestor.address,
        )
        if rejection is None and established() >= settings.node.max_associations:
            rejection = Rejection(
                statuses.REJECTED_TRANSIENT,
                statuses.SOURCE_SERVICE_PROVIDER_PRESENTATION,
                statuses.REASON_LOCAL_LIMIT_EXCEEDED,
                f"{settings.node.max_associations} associations are open (node.max_associations)",
                "limit",
            )
    except Exception:  # fail closed: a bug here must not let a caller in
        logger.exception("cannot check an association request; rejecting it")
        rejection = Rejection(
            statuses.REJECTED_PERMANENT,
            statuses.SOURCE_SERVICE_USER,
            statuses.REASON_NO_REASON,
            "internal error while checking the request",
            "internal",
        )
    if rejection is None:
        return
    logger.warning("rejected association from %s: %s", assoc.requestor.address, rejection.why)
    log.rejected(assoc, rejection, calling_ae)
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


def handle_connection_open(event: Event, temp_files: TempFiles) -> None:
    """EVT_CONN_OPEN: data sets received on this connection go to the spool's tmp folder."""
    temp_files.adopt(event.assoc)


def handle_connection_close(event: Event, temp_files: TempFiles) -> None:
    """EVT_CONN_CLOSE: remove what an aborted store left behind."""
    temp_files.release(event.assoc)


def handle_accepted(event: Event, log: AssociationLog) -> None:
    """EVT_ACCEPTED: the A-ASSOCIATE-AC is out."""
    log.accepted(event.assoc)


def handle_released(event: Event, log: AssociationLog) -> None:
    log.finish(event.assoc, "released")


def handle_aborted(event: Event, log: AssociationLog) -> None:
    log.finish(event.assoc, "aborted")
