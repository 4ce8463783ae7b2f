"""Which received instances go to the model.

An instance is queued when its Modality (0008,0060) is one of ``selection.modalities``, its
Body Part Examined (0018,0015) one of ``selection.body_parts`` and its View Position (0018,5101)
one of ``selection.view_positions`` (PS3.3 C.8.1.1 and C.8.11.5 for CR and DX).  An empty list
means "any value"; a missing or empty attribute passes when ``allow_missing_*`` is set.
Instances that do not match are stored but not queued.  Reasons name only coded values, never
patient data, so they can be logged at INFO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.config import SelectionRules


@dataclass(frozen=True)
class Decision:
    """Whether an instance is queued for the model, and why (no PHI in ``reason``)."""

    selected: bool
    reason: str


def _value(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str) and isinstance(value, Sequence):
        value = value[0] if value else ""
    # Coded strings (CS) hold at most 16 characters (PS3.5 6.2); cut anything longer so that
    # the reason stays short and free of free text.
    return str(value).strip().upper()[:16]


def _check(name: str, value: str, allowed: Sequence[str], allow_missing: bool) -> str | None:
    """A reason to skip, or None if ``value`` passes."""
    if not value:
        return None if allow_missing else f"{name} missing"
    if allowed and value not in allowed:
        return f"{name} {value} not in {'/'.join(allowed)}"
    return None


def select(dataset: Dataset, rules: SelectionRules) -> Decision:
    """Apply the selection rules to an instance's header."""
    modality = _value(dataset, "Modality")
    problems = [
        _check("modality", modality, rules.modalities, allow_missing=False),
        _check(
            "body part",
            _value(dataset, "BodyPartExamined"),
            rules.body_parts,
            rules.allow_missing_body_part,
        ),
        _check(
            "view position",
            _value(dataset, "ViewPosition"),
            rules.view_positions,
            rules.allow_missing_view_position,
        ),
    ]
    reasons = [p for p in problems if p is not None]
    if reasons:
        return Decision(False, "; ".join(reasons))
    return Decision(True, f"{modality or 'modality'} matches the selection rules")
