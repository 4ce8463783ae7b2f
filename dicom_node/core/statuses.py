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
UID_NOT_CONFORMANT: Final = 0xC220
"""Error: Cannot understand (Cxxx) -- a UID of the data set violates PS3.5 9.1 (at most 64
characters, digits and dots, no empty or zero-padded component); nothing is stored."""
INVALID_SOP_INSTANCE: Final = 0x0117
"""Failure: Invalid SOP Instance (PS3.7 C.5.11, a C-STORE status of PS3.7 9.1.1.1.9): the
Affected SOP Instance UID violates the UID construction rules (PS3.5 9.1)."""

NAMES: Final[dict[int, str]] = {
    UID_NOT_CONFORMANT: "Error: Cannot understand (a UID violates PS3.5 9.1)",
    INVALID_SOP_INSTANCE: "Failure: Invalid SOP Instance",
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
SOURCE_SERVICE_PROVIDER_PRESENTATION: Final = 0x03
REASON_NO_REASON: Final = 0x01
REASON_CALLING_AE_NOT_RECOGNISED: Final = 0x03
REASON_CALLED_AE_NOT_RECOGNISED: Final = 0x07
REASON_LOCAL_LIMIT_EXCEEDED: Final = 0x02
"""With SOURCE_SERVICE_PROVIDER_PRESENTATION and REJECTED_TRANSIENT: too many associations."""

# --------------------------------------------------------------------------- as a Storage SCU
# Statuses a destination may answer to our C-STORE of a result (PS3.4 Table B.2-1, PS3.7 C),
# used by ``worker.delivery`` to decide between delivered, retry later and refused for good.

WARNING_COERCION_OF_DATA_ELEMENTS: Final = 0xB000
"""Warning: Coercion of Data Elements (PS3.4 B.2.3): stored, with changes."""
WARNING_ELEMENTS_DISCARDED: Final = 0xB006
"""Warning: Elements Discarded (PS3.4 B.2.3): stored, some elements dropped."""
WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xB007
"""Warning: Data Set does not match SOP Class (PS3.4 B.2.3): stored anyway."""
WARNING_RANGE: Final = range(0xB000, 0xC000)
"""Bxxx: warnings; the instance was stored (PS3.4 B.2.3)."""
OUT_OF_RESOURCES_RANGE: Final = range(0xA700, 0xA800)
"""A7xx: Refused: Out of resources; worth trying again later."""
DATASET_DOES_NOT_MATCH_RANGE: Final = range(0xA900, 0xAA00)
"""A9xx: Error: Data Set does not match SOP Class; sending again will not help."""
CANNOT_UNDERSTAND_RANGE: Final = range(0xC000, 0xD000)
"""Cxxx: Error: Cannot understand; sending again will not help."""
DUPLICATE_SOP_INSTANCE: Final = 0x0111
"""Failure: Duplicate SOP Instance (PS3.7 C.5.7): the peer already holds this instance."""
NOT_AUTHORIZED: Final = 0x0124
"""Refused: Not Authorized (PS3.7 C.5.20)."""
DUPLICATE_INVOCATION: Final = 0x0210
"""Failure: Duplicate Invocation (PS3.7 C.5.8): a message ID clash; try again."""
RESOURCE_LIMITATION: Final = 0x0213
"""Failure: Resource Limitation (PS3.7 C.5.16); try again later."""
CANCEL: Final = 0xFE00
"""Cancel (PS3.7 C.3): the operation was cancelled; try again."""

NAMES.update(
    {
        WARNING_COERCION_OF_DATA_ELEMENTS: "Warning: Coercion of Data Elements",
        WARNING_ELEMENTS_DISCARDED: "Warning: Elements Discarded",
        WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS: "Warning: Data Set does not match SOP Class",
        DUPLICATE_SOP_INSTANCE: "Failure: Duplicate SOP Instance",
        NOT_AUTHORIZED: "Refused: Not Authorized",
        DUPLICATE_INVOCATION: "Failure: Duplicate Invocation",
        RESOURCE_LIMITATION: "Failure: Resource Limitation",
        CANCEL: "Cancel",
    }
)
