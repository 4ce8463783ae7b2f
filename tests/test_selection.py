"""Selection rules: which received instances are queued for the model."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicom_node.core.settings import SelectionRules
from dicom_node.scp.selection import select


def _header(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


DEFAULT = SelectionRules()
STRICT = SelectionRules(allow_missing_body_part=False, allow_missing_view_position=False)
ANY_VIEW = SelectionRules(view_positions=[])
DX_ONLY = SelectionRules(modalities=["dx"])


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize(
    ("rules", "header", "selected", "reason_part"),
    [
        (DEFAULT, {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, True, ""),
        (DEFAULT, {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "AP"}, True, ""),
        (
            DEFAULT,
            {"Modality": "cr ", "BodyPartExamined": " chest", "ViewPosition": "pa"},
            True,
            "",
        ),
        (DEFAULT, {"Modality": "CR", "BodyPartExamined": None, "ViewPosition": None}, True, ""),
        (DEFAULT, {"Modality": "DX", "BodyPartExamined": "THORAX"}, True, ""),
        (DEFAULT, {"Modality": "CR", "BodyPartExamined": "", "ViewPosition": ""}, True, ""),
        (DEFAULT, {"Modality": "CT", "BodyPartExamined": "CHEST"}, False, "modality CT"),
        (DEFAULT, {"Modality": None, "BodyPartExamined": "CHEST"}, False, "modality missing"),
        (DEFAULT, {"Modality": "CR", "BodyPartExamined": "KNEE"}, False, "body part KNEE"),
        (DEFAULT, {"Modality": "CR", "ViewPosition": "LL"}, False, "view position LL"),
        (DEFAULT, {"Modality": "CR", "ViewPosition": "RL"}, False, "view position RL"),
        (STRICT, {"Modality": "CR", "ViewPosition": "PA"}, False, "body part missing"),
        (STRICT, {"Modality": "CR", "BodyPartExamined": "CHEST"}, False, "view position missing"),
        (ANY_VIEW, {"Modality": "CR", "ViewPosition": "LL"}, True, ""),
        (DX_ONLY, {"Modality": "CR"}, False, "modality CR not in DX"),
        (DX_ONLY, {"Modality": "DX"}, True, ""),
        (
            DEFAULT,
            {"Modality": "MR", "BodyPartExamined": "HEAD", "ViewPosition": "LL"},
            False,
            "modality MR not in CR/DX; body part HEAD not in CHEST/THORAX/LUNG; view position LL",
        ),
    ],
)
def test_selection_rules(
    rules: SelectionRules, header: dict[str, Any], selected: bool, reason_part: str
) -> None:
    decision = select(_header(**header), rules)
    assert decision.selected is selected
    assert reason_part in decision.reason
    assert decision.reason


@pytest.mark.parametrize(
    "header",
    [
        {"Modality": "CR", "BodyPartExamined": "KNEE", "PatientName": "DOE^JANE"},
        {"Modality": "CT", "PatientID": "123456", "StudyInstanceUID": "1.2.3.4"},
    ],
)
def test_reason_carries_no_patient_data(header: dict[str, Any]) -> None:
    decision = select(_header(**header), DEFAULT)
    assert not decision.selected
    for value in ("DOE", "123456", "1.2.3.4"):
        assert value not in decision.reason


@pytest.mark.filterwarnings("ignore:The value length")
def test_long_values_are_cut_in_reasons() -> None:
    decision = select(_header(Modality="CR", BodyPartExamined="X" * 64), DEFAULT)
    assert not decision.selected
    assert "X" * 17 not in decision.reason
