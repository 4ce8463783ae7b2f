"""The one definition of "a frontal chest radiograph", from the header alone.

The node applies it to decide which received instances are queued for the model; the worker
applies it again (with :func:`assessment_reasons`) before the model sees an image, so that
``coronet infer`` and a study queued under older rules are judged the same way.

An instance passes when its Modality (0008,0060) is one of ``rules.modalities``, its Body Part
Examined (0018,0015) one of ``rules.body_parts`` and its View Position (0018,5101) one of
``rules.view_positions`` (PS3.3 C.7.3.1, C.8.11.5 for CR and DX).  An empty list means "any
value"; a missing or empty attribute passes when ``allow_missing_*`` is set.  Reasons name only
coded values, cut to 16 characters, never patient data, so they can be logged at INFO.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from pydicom.dataset import Dataset

from dicom_node.core.settings import SelectionRules

#: Presentation Intent Type of DX images that are raw detector data (PS3.3 C.8.11.1.1.1).
FOR_PROCESSING: Final = "FOR PROCESSING"

_CS_MAX: Final = 16  # PS3.5 6.2: a Code String holds at most 16 characters


def coded_value(dataset: Dataset, keyword: str) -> str:
    """The first value of a coded-string attribute, stripped, upper case, cut to 16 characters."""
    value = dataset.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str) and isinstance(value, Sequence):
        value = value[0] if value else ""
    return str(value).strip().upper()[:_CS_MAX]


def _check(name: str, value: str, allowed: Sequence[str], allow_missing: bool) -> str | None:
    if not value:
        return None if allow_missing else f"{name} missing"
    if allowed and value not in allowed:
        return f"{name} {value} not in {'/'.join(allowed)}"
    return None


def selection_reasons(dataset: Dataset, rules: SelectionRules) -> list[str]:
    """Why ``dataset`` is not a frontal chest CR/DX under ``rules``; empty when it is one."""
    problems = [
        _check("modality", coded_value(dataset, "Modality"), rules.modalities, False),
        _check(
            "body part",
            coded_value(dataset, "BodyPartExamined"),
            rules.body_parts,
            rules.allow_missing_body_part,
        ),
        _check(
            "view position",
            coded_value(dataset, "ViewPosition"),
            rules.view_positions,
            rules.allow_missing_view_position,
        ),
    ]
    return [p for p in problems if p is not None]


def assessment_reasons(dataset: Dataset, rules: SelectionRules) -> list[str]:
    """:func:`selection_reasons`, and a DX image must be meant for presentation."""
    reasons = selection_reasons(dataset, rules)
    if coded_value(dataset, "PresentationIntentType") == FOR_PROCESSING:
        reasons.append("DX image is FOR PROCESSING, expected FOR PRESENTATION")
    return reasons
