"""DIMSE status codes the node answers with, in one table.

General statuses come from PS3.7 Annex C, the Storage Service Class statuses from PS3.4
Annex B.2.3 (Table B.2-1).  Never return a bare literal from a handler: name it here.
"""

from __future__ import annotations

from typing import Final

# PS3.7 Annex C: general statuses.
SUCCESS: Final = 0x0000
"""Success (PS3.7 C.1).  For C-STORE only after the instance is persisted."""
PROCESSING_FAILURE: Final = 0x0110
"""Processing failure (PS3.7 C.4.2): an unexpected error on our side."""
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
"""Refused: SOP Class not supported (PS3.7 C.5.6)."""

# PS3.4 Table B.2-1: Storage Service Class statuses.
OUT_OF_RESOURCES: Final = 0xA700
"""Refused: Out of resources (A7xx): the spool cannot be written (disk full, permissions)."""
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
"""Error: Data Set does not match SOP Class (A9xx), also used when the data set's SOP Class or
Instance UID differs from the request's Affected SOP Class/Instance UID (PS3.4 B.2.3)."""
CANNOT_UNDERSTAND: Final = 0xC000
"""Error: Cannot understand (Cxxx), the first code of that range."""
DATA_UNDECODABLE: Final = 0xC210
"""Error: Cannot understand (Cxxx) -- the data set cannot be decoded.

PS3.4 Table B.2-1 leaves the meaning of codes inside C000-CFFF to the implementation; 0xC210
is the code that pynetdicom's reference Storage SCP uses for an undecodable data set.
"""

NAMES: Final[dict[int, str]] = {
    SUCCESS: "Success",
    PROCESSING_FAILURE: "Processing failure",
    SOP_CLASS_NOT_SUPPORTED: "Refused: SOP Class not supported",
    OUT_OF_RESOURCES: "Refused: Out of resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
    DATA_UNDECODABLE: "Error: Cannot understand (data set cannot be decoded)",
}


def describe(status: int) -> str:
    """``0xA700 (Refused: Out of resources)`` for logs and CLI output."""
    return f"0x{status:04X} ({NAMES.get(status, 'unknown status')})"


# PS3.8 9.3.4 / Table 9-21: A-ASSOCIATE-RJ result, source and reason.
REJECTED_PERMANENT: Final = 0x01
REJECTED_TRANSIENT: Final = 0x02
SOURCE_SERVICE_USER: Final = 0x01
REASON_NO_REASON: Final = 0x01
REASON_CALLING_AE_NOT_RECOGNISED: Final = 0x03
REASON_CALLED_AE_NOT_RECOGNISED: Final = 0x07
