"""Which received instances go to the model: the frontal-chest rule of
:mod:`dicom_node.core.chest` under the configured ``selection`` rules.

Instances that do not match are stored but not queued.  Reasons name only coded values, never
patient data, so they can be logged at INFO.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.core.chest import coded_value, selection_reasons
from dicom_node.core.settings import SelectionRules


@dataclass(frozen=True)
class Decision:
    """Whether an instance is queued for the model, and why (no PHI in ``reason``)."""

    selected: bool
    reason: str


def select(dataset: Dataset, rules: SelectionRules) -> Decision:
    """Apply the selection rules to an instance's header."""
    reasons = selection_reasons(dataset, rules)
    if reasons:
        return Decision(False, "; ".join(reasons))
    modality = coded_value(dataset, "Modality")
    return Decision(True, f"{modality or 'modality'} matches the selection rules")
