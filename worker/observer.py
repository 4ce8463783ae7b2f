"""What a worker tells the outside about its work: metrics (to Redis, for the node's
``/metrics``; :mod:`dicom_node.core.telemetry`) and audit messages for the results it sends
(:mod:`dicom_node.core.audit`).  :class:`~worker.processor.StudyProcessor` calls it; neither
ever fails a study.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom

from dicom_node.core import audit
from dicom_node.core.audit_trail import AuditTrail
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Destination
from dicom_node.core.telemetry import TelemetryWriter
from worker.rounds import DeliveryRound

logger = logging.getLogger(__name__)

_HEADER_TAGS = ("StudyInstanceUID", "PatientID", "SOPClassUID")


class WorkerObserver:
    """Metrics and audit messages of one worker process (either may be missing)."""

    def __init__(
        self,
        telemetry: TelemetryWriter | None = None,
        audit_trail: AuditTrail | None = None,
        calling_ae: str = "CORONET",
    ) -> None:
        self.telemetry = telemetry
        self.audit_trail = audit_trail
        self.calling_ae = calling_ae

    def analysed(self, outcome: str, seconds: float, timings: Mapping[str, float]) -> None:
        if self.telemetry is None:
            return
        self.telemetry.count("coronet_instances_analysed_total", {"outcome": outcome})
        self.telemetry.observe("coronet_analysis_seconds", seconds)
        if "heatmap_s" in timings:
            self.telemetry.observe("coronet_heatmap_seconds", float(timings["heatmap_s"]))

    def dead_lettered(self, kind: str, count: int = 1) -> None:
        if self.telemetry is not None and count:
            self.telemetry.count("coronet_dead_lettered_total", {"kind": kind}, count)

    def delivered(
        self, outbox: Outbox, round_: DeliveryRound, destinations: Sequence[Destination]
    ) -> None:
        """Count a delivery round's outcomes; audit what each destination stored."""
        if self.telemetry is not None:
            for _, name in round_.delivered:
                self.telemetry.count(
                    "coronet_deliveries_total", {"destination": name, "outcome": "delivered"}
                )
            for _, name, _ in round_.refused:
                self.telemetry.count(
                    "coronet_deliveries_total", {"destination": name, "outcome": "refused"}
                )
            for name, keys in round_.waiting_keys.items():
                self.telemetry.count(
                    "coronet_deliveries_total",
                    {"destination": name, "outcome": "waiting"},
                    len(keys),
                )
            self.dead_lettered("delivery", len(round_.refused))
        if self.audit_trail is None or not self.audit_trail.enabled:
            return
        by_name = {d.name: d for d in destinations}
        sent: dict[str, list[str]] = {}
        for key, name in round_.delivered:
            sent.setdefault(name, []).append(key)
        for name, keys in sent.items():
            destination = by_name.get(name)
            if destination is not None:
                self._audit_sent(outbox, destination, keys)

    def _audit_sent(self, outbox: Outbox, destination: Destination, keys: Sequence[str]) -> None:
        assert self.audit_trail is not None
        studies: dict[str, tuple[str | None, dict[str, int]]] = {}
        for key in keys:
            header = _header(outbox.result_path(key))
            if header is None:
                continue
            study_uid, patient_id, sop_class = header
            _, counts = studies.setdefault(study_uid, (patient_id, {}))
            counts[sop_class] = counts.get(sop_class, 0) + 1
        for study_uid, (patient_id, counts) in studies.items():
            self.audit_trail.record(
                audit.instances_transferred(
                    audit.Participant(self.calling_ae, True, audit.SOURCE),
                    audit.Participant(
                        destination.ae_title, False, audit.DESTINATION, destination.host
                    ),
                    study_uid,
                    patient_id,
                    counts,
                )
            )


def _header(path: Path) -> tuple[str, str | None, str] | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except Exception as err:  # the result was just sent; a read error only loses the audit
        logger.warning("cannot read result %s for the audit trail: %s", path.stem, err)
        return None
    patient = str(ds.get("PatientID", "") or "") or None
    return str(ds.StudyInstanceUID), patient, str(ds.SOPClassUID)


__all__ = ["WorkerObserver"]
