"""The UID construction rule of PS3.5 9.1, checked on everything a peer sends us.

A UID has at most 64 characters, digits and dots only, components without leading zeros (a
component is "0" or starts with 1-9) and none of them empty.  Trailing NUL or space padding
(PS3.5 9.1) is not part of the UID.
"""

from __future__ import annotations

from typing import Final

from pydicom.uid import RE_VALID_UID

UID_MAX_LENGTH: Final = 64


def strip_padding(uid: str) -> str:
    """``uid`` without the NUL or space padding of an odd-length value."""
    return uid.strip("\0 ")


def is_conformant_uid(uid: str) -> bool:
    """Whether ``uid`` (padding stripped) follows PS3.5 9.1."""
    value = strip_padding(uid)
    return 0 < len(value) <= UID_MAX_LENGTH and RE_VALID_UID.fullmatch(value) is not None
