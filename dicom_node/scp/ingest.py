"""The work behind one C-STORE: check the header, persist, select and schedule the instance.

Only the header (everything before Pixel Data) of the received file is decoded.  The answer is
Success only once the instance is on disk (:meth:`dicom_node.core.spool.Spool.store`); a data
set that does not match the request's SOP Class or Instance UID is refused (PS3.4 B.2.3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from dicom_node.core import statuses
from dicom_node.core.errors import IngestError
from dicom_node.core.settings import SelectionRules
from dicom_node.core.spool import Spool, StoredInstance
from dicom_node.scp.queueing import StudyQueue
from dicom_node.scp.selection import Decision, select

logger = logging.getLogger(__name__)


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

    def __init__(self, spool: Spool, queue: StudyQueue, rules: SelectionRules) -> None:
        self.spool = spool
        self.queue = queue
        self.rules = rules

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
