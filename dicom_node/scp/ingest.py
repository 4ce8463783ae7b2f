"""The work behind one C-STORE: check the data set, persist, select and schedule the instance.

Only the header (everything before Pixel Data) of the received file is decoded, within the
limits of :mod:`dicom_node.scp.header`.  The answer is Success only once the instance is on
disk (:meth:`dicom_node.core.spool.Spool.store`).  Refused, with nothing stored:

* anything while the spool's file system has less than ``storage.min_free_bytes`` free
  (0xA700), so the disk never fills up to the point where a write fails half-way;
* a data set that pynetdicom could not write to disk (0xA700, e.g. a full disk);
* a UID that breaks PS3.5 9.1: the Affected SOP Instance UID (0x0117), the SOP Class or Study
  Instance UID (0xC220);
* a data set that cannot be parsed (0xC210) or breaks a size limit (0xA700);
* a data set whose SOP Class or Instance UID differs from the request's (0xA900, PS3.4 B.2.3).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.core import statuses
from dicom_node.core.errors import IngestError
from dicom_node.core.settings import SelectionRules
from dicom_node.core.spool import STUDY_INFO_FIELDS, Spool, StoredInstance
from dicom_node.core.uids import is_conformant_uid, strip_padding
from dicom_node.scp.header import HeaderLimits, TooLargeError, UndecodableError, read_header
from dicom_node.scp.queueing import StudyQueue
from dicom_node.scp.selection import Decision, select
from dicom_node.scp.tempfiles import TempFiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one C-STORE request."""

    status: int
    stored: StoredInstance | None = None
    decision: Decision | None = None
    problem: str = ""
    study_uid: str | None = None
    patient_id: str | None = None
    sop_class_uid: str | None = None


class Ingest:
    """Check, persist, select and schedule one received instance (see the module docstring)."""

    def __init__(
        self,
        spool: Spool,
        queue: StudyQueue,
        rules: SelectionRules,
        limits: HeaderLimits,
        temp_files: TempFiles,
        min_free_bytes: int = 0,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self.rules = rules
        self.limits = limits
        self.temp_files = temp_files
        self.min_free_bytes = min_free_bytes

    def free_bytes(self) -> int:
        """Free bytes on the spool's file system (for unprivileged users)."""
        return shutil.disk_usage(self.spool.root).free

    def below_floor(self) -> str | None:
        """Why the spool may not take data now (``storage.min_free_bytes``), or None."""
        if self.min_free_bytes <= 0:
            return None
        try:
            free = self.free_bytes()
        except OSError as err:
            return f"cannot measure the free space of the spool: {err.strerror or err}"
        if free < self.min_free_bytes:
            return (
                f"the spool's disk has {free} bytes free, less than storage.min_free_bytes "
                f"({self.min_free_bytes})"
            )
        return None

    def receive(self, path: Path, sop_class_uid: str, sop_instance_uid: str) -> StoreOutcome:
        """Store the received file at ``path`` (it is moved into the spool)."""
        failure = self.temp_files.failure(path)
        if failure is not None:
            return StoreOutcome(statuses.OUT_OF_RESOURCES, problem=failure)
        full = self.below_floor()
        if full is not None:
            return StoreOutcome(statuses.OUT_OF_RESOURCES, problem=full)
        if not is_conformant_uid(sop_instance_uid):
            return StoreOutcome(
                statuses.INVALID_SOP_INSTANCE,
                problem="Affected SOP Instance UID violates PS3.5 9.1",
            )
        if not is_conformant_uid(sop_class_uid):
            return StoreOutcome(
                statuses.UID_NOT_CONFORMANT, problem="Affected SOP Class UID violates PS3.5 9.1"
            )
        try:
            header = read_header(path, self.limits, self.temp_files.folder)
        except UndecodableError as err:
            return StoreOutcome(statuses.DATA_UNDECODABLE, problem=f"cannot decode: {err}")
        except TooLargeError as err:
            return StoreOutcome(statuses.OUT_OF_RESOURCES, problem=str(err))
        except OSError as err:
            return StoreOutcome(statuses.OUT_OF_RESOURCES, problem=f"cannot read: {err}")
        status, mismatch = _mismatch(header, sop_class_uid, sop_instance_uid)
        if mismatch:
            return StoreOutcome(status, problem=mismatch)
        decision = select(header, self.rules)
        study_uid = strip_padding(str(header.StudyInstanceUID))
        try:
            stored = self.spool.store(
                path,
                strip_padding(sop_instance_uid),
                study_uid,
                sop_class_uid=strip_padding(sop_class_uid),
                selected=decision.selected,
                reason=decision.reason,
                move=True,
                study_info=study_info(header),
            )
        except IngestError as err:
            return StoreOutcome(statuses.OUT_OF_RESOURCES, problem=str(err))
        if not stored.duplicate and decision.selected:
            self.queue.notify(stored.study_key, stored.instance_key)
        return StoreOutcome(
            statuses.SUCCESS,
            stored,
            decision,
            study_uid=study_uid,
            patient_id=_text(header, "PatientID"),
            sop_class_uid=strip_padding(sop_class_uid),
        )


def _text(header: Dataset, keyword: str) -> str | None:
    try:
        value = header.get(keyword)
    except Exception:  # a malformed value of a field we only display
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


def study_info(header: Dataset) -> dict[str, str]:
    """The header fields the spool keeps with a new study, for the admin console."""
    info = {}
    for field, keyword in STUDY_INFO_FIELDS.items():
        value = _text(header, keyword)
        if value is not None:
            info[field] = value[:128]
    return info


def _mismatch(header: Dataset, sop_class_uid: str, sop_instance_uid: str) -> tuple[int, str]:
    """The status and reason to refuse a data set that does not fit its request, or (0, '')."""
    study_uid = str(header.get("StudyInstanceUID", ""))
    if not strip_padding(study_uid):
        return statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "no Study Instance UID"
    if not is_conformant_uid(study_uid):
        return statuses.UID_NOT_CONFORMANT, "Study Instance UID violates PS3.5 9.1"
    if strip_padding(str(header.get("SOPClassUID", ""))) != strip_padding(sop_class_uid):
        return (
            statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Class UID differs from the request's Affected SOP Class UID",
        )
    if strip_padding(str(header.get("SOPInstanceUID", ""))) != strip_padding(sop_instance_uid):
        return (
            statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Instance UID differs from the request's Affected SOP Instance UID",
        )
    return statuses.SUCCESS, ""
