"""The audit messages of the Storage SCP: an association accepted, rejected or ended, and the
instances of each study that it stored (:mod:`dicom_node.core.audit` says which message is
which).  The handlers call it through :class:`~dicom_node.scp.handlers.AssociationLog`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dicom_node.core import audit
from dicom_node.core.audit_trail import AuditTrail


@dataclass
class StudyTally:
    """What one association stored of one study."""

    patient_id: str | None = None
    sop_classes: dict[str, int] = field(default_factory=dict)

    def add(self, sop_class_uid: str | None, patient_id: str | None) -> None:
        uid = sop_class_uid or "unknown"
        self.sop_classes[uid] = self.sop_classes.get(uid, 0) + 1
        self.patient_id = self.patient_id or patient_id


class AssociationAudit:
    """Audit messages of associations; ``our_ae`` gives our current AE title."""

    def __init__(self, trail: AuditTrail, our_ae: Callable[[], str]) -> None:
        self.trail = trail
        self.our_ae = our_ae

    def accepted(self, caller: str, address: str) -> None:
        self.trail.record(audit.authentication(caller, address, self.our_ae()))

    def rejected(self, caller: str, address: str, why: str) -> None:
        self.trail.record(
            audit.authentication(
                caller, address, self.our_ae(), outcome=audit.MINOR_FAILURE, why=why
            )
        )

    def ended(self, caller: str, address: str, how: str, studies: Mapping[str, StudyTally]) -> None:
        """The association ended (``how``: released or aborted), after what it stored."""
        ours = self.our_ae()
        for study_uid, tally in studies.items():
            self.trail.record(
                audit.instances_transferred(
                    audit.Participant(caller, True, audit.SOURCE, address),
                    audit.Participant(ours, False, audit.DESTINATION),
                    study_uid,
                    tally.patient_id,
                    tally.sop_classes,
                )
            )
        outcome = audit.SUCCESS if how == "released" else audit.MINOR_FAILURE
        self.trail.record(
            audit.authentication(
                caller, address, ours, logout=True, outcome=outcome, why=f"association {how}"
            )
        )


__all__ = ["AssociationAudit", "StudyTally"]
