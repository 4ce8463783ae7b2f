"""The one definition of a frontal chest radiograph (``dicom_node.core.chest``), as the worker
applies it before the model sees an image."""

from __future__ import annotations

import pytest

from dicom_node.core.chest import assessment_reasons, selection_reasons
from dicom_node.core.settings import SelectionRules
from monai_bundle.scripts.phantoms import make_phantom, phantom_dataset

DEFAULT = SelectionRules()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, []),
        ({"ViewPosition": "AP"}, []),
        ({"BodyPartExamined": "THORAX"}, []),
        ({"BodyPartExamined": "LUNG"}, []),
        ({"Modality": "CT"}, ["modality CT not in CR/DX"]),
        ({"ViewPosition": "LL"}, ["view position LL not in PA/AP"]),
        ({"ViewPosition": "LAT"}, ["view position LAT not in PA/AP"]),
        ({"BodyPartExamined": "HAND"}, ["body part HAND not in CHEST/THORAX/LUNG"]),
        ({"PresentationIntentType": "FOR PROCESSING"}, ["FOR PROCESSING"]),
        (
            {"Modality": "MR", "BodyPartExamined": "HEAD", "ViewPosition": "RL"},
            ["modality MR", "body part HEAD", "view position RL"],
        ),
    ],
)
def test_a_frontal_chest_cr_or_dx_is_assessed_and_anything_else_says_why(
    changes: dict[str, object], expected: list[str]
) -> None:
    ds = phantom_dataset(make_phantom("normal", 64, 0), modality="DX")
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    reasons = assessment_reasons(ds, DEFAULT)
    assert len(reasons) == len(expected)
    for reason, fragment in zip(reasons, expected, strict=True):
        assert fragment in reason


def test_missing_body_part_and_view_pass_but_a_missing_modality_does_not() -> None:
    ds = phantom_dataset(make_phantom("normal", 64, 0))
    del ds.BodyPartExamined, ds.ViewPosition
    assert assessment_reasons(ds, DEFAULT) == []
    del ds.Modality
    assert assessment_reasons(ds, DEFAULT) == ["modality missing"]


def test_for_processing_is_the_workers_rule_not_the_routing_rule() -> None:
    """The node queues a DX For Processing image (its selection rules only route); the worker
    then reports it unassessable."""
    ds = phantom_dataset(make_phantom("normal", 64, 0), modality="DX")
    ds.PresentationIntentType = "FOR PROCESSING"
    assert selection_reasons(ds, DEFAULT) == []
    assert assessment_reasons(ds, DEFAULT) == [
        "DX image is FOR PROCESSING, expected FOR PRESENTATION"
    ]


def test_configured_rules_apply_to_the_assessment_too() -> None:
    ds = phantom_dataset(make_phantom("normal", 64, 0), modality="CR")
    assert assessment_reasons(ds, SelectionRules(modalities=["DX"])) == ["modality CR not in DX"]
