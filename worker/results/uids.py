"""Deterministic UIDs for the objects CoroNet derives from a source image.

A result's UID is a function of what it was made from and of the model version, so that
processing the same image again with the same model yields the same UIDs: the PACS replaces
the earlier result rather than collecting duplicates.  A new model version gives new UIDs.

The UIDs are UUID-derived, ``2.25.<128-bit integer>`` (PS3.5 B.2), from a name-based
(SHA-1, version 5) UUID per RFC 4122 / ISO/IEC 9834-8 in a namespace of our own.
``pydicom.uid.generate_uid(prefix=None, ...)`` is not used: with ``prefix=None`` it ignores
``entropy_srcs`` and returns a random UUID, which would not be repeatable.
"""

from __future__ import annotations

import uuid
from typing import Final

from pydicom.uid import RE_VALID_UID, UID

from dicom_node.core.errors import ResultError

#: Namespace of CoroNet's name-based UUIDs (generated once; never change it, or every
#: derived UID changes).
UID_NAMESPACE: Final = uuid.UUID("55c1e195-96c0-4f11-bf4f-00032f04c70b")

#: Kinds of derived UIDs.  Instance kinds take a source SOP Instance UID.  The SC series kind
#: takes the Study Instance UID (one SC series per model version in a study); the SR series
#: kind takes the source SOP Instance UID: each SR is a series of its own, because viewers
#: such as OHIF 3.13 show only the newest SR of a series.
KIND_SR: Final = "sr"
KIND_SC: Final = "sc"
KIND_SR_TRACKING: Final = "sr-tracking"
KIND_SR_SERIES: Final = "sr-series"
KIND_SC_SERIES: Final = "sc-series"

_SEPARATOR: Final = "|"
_UID_MAX: Final = 64  # PS3.5 9.1


def derived_uid(source_sop_instance_uid: str, model_version: str, kind: str) -> UID:
    """UID of the ``kind`` object derived from ``source_sop_instance_uid`` by ``model_version``.

    The same three inputs always give the same UID; changing any of them gives another.  For
    the SC series kind pass the Study Instance UID as the source.  Raises ``ResultError`` if the
    source is not a valid UID or the version or kind is empty.
    """
    if len(source_sop_instance_uid) > _UID_MAX or not RE_VALID_UID.fullmatch(
        source_sop_instance_uid
    ):
        raise ResultError("source UID is not a valid DICOM UID (PS3.5 9.1)")
    if not model_version or not model_version.strip():
        raise ResultError("model_version must be a non-empty string")
    if not kind or _SEPARATOR in kind:
        raise ResultError(f"kind must be non-empty and contain no {_SEPARATOR!r}")
    # kind and the UID cannot contain the separator, and the version comes last, so the
    # joined name is unambiguous.
    name = _SEPARATOR.join(("coronet", kind, source_sop_instance_uid, model_version))
    return UID(f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}")


def series_uid(study_instance_uid: str, model_version: str, kind: str) -> UID:
    """Series Instance UID shared by all ``kind`` results of one study and model version."""
    return derived_uid(study_instance_uid, model_version, kind)
