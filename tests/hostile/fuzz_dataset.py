"""Fuzz target: raw P-DATA bytes to the DIMSE status the node would answer.

One input is the variable field of a P-DATA-TF PDU: presentation data value items (PS3.8
9.3.5.1) carrying data set fragments.  It goes through what a received C-STORE goes through:

1. the guarded receive path (:class:`dicom_node.scp.guard.PDUStream`), as if it arrived after
   an A-ASSOCIATE-RQ; a breach closes the connection (an outcome, not a failure);
2. pynetdicom's P-DATA-TF decoder; the data set fragments are joined as pynetdicom does and
   written after a File Meta Information header, as pynetdicom writes a received data set;
3. :meth:`dicom_node.scp.ingest.Ingest.receive` against a real spool.

Every input must end with the connection closed, or with a named status from
``dicom_node.core.statuses`` where Success means the instance is in the spool.  Anything else
(an exception, Processing Failure, Success without a stored file) is a crash.

    python -m tests.hostile.fuzz_dataset CORPUS_DIR -max_total_time=60
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import atheris

with atheris.instrument_imports():
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
    from pynetdicom.pdu import P_DATA_TF

    from dicom_node.core import statuses
    from dicom_node.core.settings import GroupingSettings, NodeLimits, SelectionRules
    from dicom_node.core.spool import Spool
    from dicom_node.scp.guard import GuardError, PDUStream, StreamLimits
    from dicom_node.scp.header import HeaderLimits
    from dicom_node.scp.ingest import Ingest
    from dicom_node.scp.queueing import StudyQueue
    from dicom_node.scp.tempfiles import TempFiles
    from tests.support.attacks import write_part10

SOP_CLASS: Final = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
SOP_INSTANCE: Final = "1.2.3.4"  # the seeds' instances carry this UID, so Success is reachable
LIMITS: Final = NodeLimits(
    max_instance_bytes=8 << 20, max_element_bytes=1 << 20, max_inflated_bytes=16 << 20
)
ANSWERS: Final = frozenset(
    {
        statuses.SUCCESS,
        statuses.OUT_OF_RESOURCES,
        statuses.DATA_UNDECODABLE,
        statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        statuses.UID_NOT_CONFORMANT,
        statuses.INVALID_SOP_INSTANCE,
    }
)


class _NoBroker:
    def __call__(self, study_key: str, instance_keys: list[str] | None) -> None:
        """Publishing is not under test."""


_WORK = Path(tempfile.mkdtemp(prefix="coronet-fuzz-"))
_SPOOL = Spool(_WORK / "spool")
_TEMP = TempFiles(_WORK / "spool" / "tmp")
_INGEST = Ingest(
    _SPOOL,
    StudyQueue(_SPOOL, _NoBroker(), GroupingSettings()),
    SelectionRules(),
    HeaderLimits.from_settings(LIMITS),
    _TEMP,
)
_STREAM_LIMITS: Final = StreamLimits(
    max_associate_request=64 * 1024,
    max_pdu=LIMITS.max_instance_bytes,
    max_instance=LIMITS.max_instance_bytes,
    acse_timeout=60.0,
    pdu_timeout=60.0,
)
_ASSOCIATED: Final = b"\x01\x00\x00\x00\x00\x00"  # an empty A-ASSOCIATE-RQ: the guard moves on


def _meta() -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID(SOP_INSTANCE)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    return meta


def outcome(data: bytes) -> str | int:
    """``"closed"`` or the status the node would answer for the P-DATA variable field ``data``."""
    stream = PDUStream(_STREAM_LIMITS, time.monotonic())
    header = b"\x04\x00" + len(data).to_bytes(4, "big")
    try:
        stream.feed(_ASSOCIATED + header + data, time.monotonic())
    except GuardError:
        return "closed"
    pdu = P_DATA_TF()
    try:
        pdu.decode(header + data)
    except Exception:  # pynetdicom closes the association on an undecodable PDU (Evt19)
        return "closed"
    values = pdu.to_primitive().presentation_data_value_list  # (context ID, value) pairs
    fragments = [value[1:] for _, value in values if value and not value[0] & 1]
    path = write_part10(_TEMP.folder / "received.dcm", _meta(), b"".join(fragments))
    result = _INGEST.receive(path, SOP_CLASS, SOP_INSTANCE)
    if result.status not in ANSWERS:
        raise AssertionError(f"unexpected status {statuses.describe(result.status)}")
    if result.status == statuses.SUCCESS:
        assert result.stored is not None and result.stored.path.is_file()
        result.stored.path.unlink()  # keep the spool small and the next input fresh
    return result.status


def one_input(data: bytes) -> None:
    outcome(data)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
