"""The CoroNet SR: validation of results, deterministic UIDs, the point findings are anchored
at, dciodvfy, dsr2html, round trip through pydicom + highdicom, and storage into a real Orthanc.

What a viewer shows of it is tested in ``tests/viewer/``."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from dicom_node.core.errors import ResultError
from dicom_node.core.settings import ResultSettings
from monai_bundle.scripts.classes import CLASSES
from monai_bundle.scripts.phantoms import Modality, make_phantom, phantom_dataset
from tests.support.dicom_tools import dciodvfy, dsr2html, html_to_text, storescu
from tests.support.orthanc import running_orthanc
from worker.results import equipment
from worker.results.outcome import AlgorithmInfo, Attribution, Prediction, Unassessable
from worker.results.region import image_centre
from worker.results.sr import (
    AI_NOTICE,
    CODING_SCHEME_CORONET,
    build_sr,
    read_sr,
)
from worker.results.uids import (
    KIND_SC,
    KIND_SC_SERIES,
    KIND_SR,
    KIND_SR_SERIES,
    derived_uid,
    series_uid,
)

CLASS_NAMES = ("normal", "pneumonia", "COVID-19")
MODEL_VERSION = "0.1.0+demo-phantom"
SERIES_NUMBER = 901
SERIES_DESCRIPTION = ResultSettings().sr_series_description
MEANINGS = {c.name: c.meaning for c in CLASSES}
ALGORITHM = AlgorithmInfo(
    name="CoroNet",
    version=MODEL_VERSION,
    weights_sha256="0123456789abcdef" * 4,
    parameters={"input_size": "512", "classes": ",".join(CLASS_NAMES)},
)


def _testdata_path(name: str) -> Path:
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom-data lacks {name}"
    return Path(path)


RG1 = _testdata_path("RG1_UNCR.dcm")


def _rg1() -> Dataset:
    return pydicom.dcmread(RG1)


def _phantom_source(label: str, modality: Modality = "CR", seed: int = 11) -> Dataset:
    """A synthetic chest phantom of class ``label`` as a DICOM CR/DX in a study of its own."""
    return phantom_dataset(make_phantom(label, 128, seed), modality=modality)


def _prediction(probs: tuple[float, float, float]) -> Prediction:
    probabilities = dict(zip(CLASS_NAMES, probs, strict=True))
    return Prediction(CLASS_NAMES, probabilities, max(probabilities, key=probabilities.__getitem__))


def _heatmap_for(source: Dataset) -> Dataset:
    """A small Secondary Capture in the source's study, standing in for the attribution map."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24, 0] = 255
    with warnings.catch_warnings():
        # RG1's Referring Physician's Name "ward" has one component; highdicom warns.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        return _sc_from(source, pixels)


def _sc_from(source: Dataset, pixels: np.ndarray) -> Dataset:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid(source.StudyInstanceUID, MODEL_VERSION, KIND_SC_SERIES),
        series_number=902,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, MODEL_VERSION, KIND_SC),
        instance_number=1,
        manufacturer=equipment.MANUFACTURER,
        patient_orientation=("L", "F"),
    )


# --------------------------------------------------------------------------------------------
# Result dataclasses
# --------------------------------------------------------------------------------------------

_GOOD_PROBS = {"normal": 0.1, "pneumonia": 0.2, "COVID-19": 0.7}


@pytest.mark.parametrize(
    ("class_names", "probabilities", "predicted", "message"),
    [
        (CLASS_NAMES, {"normal": 0.3, "pneumonia": 0.7}, "pneumonia", "expected exactly"),
        (CLASS_NAMES, {**_GOOD_PROBS, "other": 0.0}, "COVID-19", "expected exactly"),
        (CLASS_NAMES, {**_GOOD_PROBS, "normal": -0.1, "COVID-19": 0.9}, "COVID-19", "outside"),
        (CLASS_NAMES, {**_GOOD_PROBS, "normal": math.nan}, "COVID-19", "outside"),
        (CLASS_NAMES, {**_GOOD_PROBS, "COVID-19": 0.8}, "COVID-19", "sum to"),
        (CLASS_NAMES, _GOOD_PROBS, "normal", "not the most probable"),
        (CLASS_NAMES, _GOOD_PROBS, "influenza", "not one of"),
        ((), {}, "normal", "must not be empty"),
        (("normal", "normal"), {"normal": 1.0}, "normal", "unique"),
        ("normal", {"normal": 1.0}, "normal", "not one string"),
    ],
)
def test_prediction_rejects_bad_model_output(
    class_names: tuple[str, ...], probabilities: dict[str, float], predicted: str, message: str
) -> None:
    with pytest.raises(ResultError, match=message):
        Prediction(class_names, probabilities, predicted)


@pytest.mark.parametrize(
    ("probs", "predicted"),
    [
        ((0.1, 0.2, 0.7), "COVID-19"),
        ((0.98, 0.0105, 0.0095), "normal"),  # sums to 1 exactly after rounding
        ((0.3334, 0.3333, 0.3333), "normal"),  # within 1e-3 of 1
        ((0.0, 1.0, 0.0), "pneumonia"),
    ],
)
def test_prediction_accepts_valid_output_and_is_read_only(
    probs: tuple[float, float, float], predicted: str
) -> None:
    prediction = _prediction(probs)
    assert prediction.predicted == predicted
    assert dict(prediction.probabilities) == dict(zip(CLASS_NAMES, probs, strict=True))
    with pytest.raises(TypeError):
        prediction.probabilities["normal"] = 1.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": " "}, "name"),
        ({"version": ""}, "version"),
        ({"weights_sha256": "abc"}, "64 lower-case"),
        ({"weights_sha256": "A" * 64}, "64 lower-case"),
        ({"weights_sha256": "g" * 64}, "64 lower-case"),
        ({"parameters": {"a=b": "c"}}, "contain no '='"),
        ({"parameters": {"weights_sha256": "x"}}, "do not repeat"),
        ({"parameters": {"size": 512}}, "must be a string"),
    ],
)
def test_algorithm_info_rejects_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ResultError, match=message):
        dataclasses.replace(ALGORITHM, **changes)  # type: ignore[arg-type]


def test_algorithm_parameters_put_weights_digest_first() -> None:
    assert ALGORITHM.parameter_strings() == (
        f"weights_sha256={ALGORITHM.weights_sha256}",
        "classes=normal,pneumonia,COVID-19",
        "input_size=512",
    )


@pytest.mark.parametrize("reasons", [(), ("",), ("ok", "  "), "not frontal"])
def test_unassessable_needs_reasons(reasons: tuple[str, ...]) -> None:
    with pytest.raises(ResultError):
        Unassessable(reasons)


# --------------------------------------------------------------------------------------------
# Deterministic UIDs
# --------------------------------------------------------------------------------------------

_SOURCE_UID = "1.2.3.4.5"


@pytest.mark.parametrize(
    ("other", "same"),
    [
        ((_SOURCE_UID, MODEL_VERSION, KIND_SR), True),
        ((_SOURCE_UID, "0.2.0", KIND_SR), False),
        ((_SOURCE_UID, MODEL_VERSION, KIND_SC), False),
        (("1.2.3.4.6", MODEL_VERSION, KIND_SR), False),
        # Naive concatenation would make these two equal.
        (("1.2.3.4.5" + "0", MODEL_VERSION[1:], KIND_SR), False),
    ],
)
def test_derived_uid_is_repeatable_and_distinct(other: tuple[str, str, str], same: bool) -> None:
    reference = derived_uid(_SOURCE_UID, MODEL_VERSION, KIND_SR)
    assert (derived_uid(*other) == reference) is same
    assert reference.is_valid
    assert reference.startswith("2.25.")
    assert len(reference) <= 64


@pytest.mark.parametrize(
    ("source", "version", "kind"),
    [("not a uid", MODEL_VERSION, KIND_SR), (_SOURCE_UID, " ", KIND_SR), (_SOURCE_UID, "1", "")],
)
def test_derived_uid_rejects_bad_input(source: str, version: str, kind: str) -> None:
    with pytest.raises(ResultError):
        derived_uid(source, version, kind)


def test_sr_uids_are_deterministic() -> None:
    source = _rg1()
    prediction = _prediction((0.1, 0.2, 0.7))

    def build(algorithm: AlgorithmInfo, src: Dataset = source) -> hd.sr.Comprehensive3DSR:
        sr = build_sr(
            src,
            prediction,
            algorithm,
            series_number=SERIES_NUMBER,
            series_description=SERIES_DESCRIPTION,
        )
        assert sr is not None
        return sr

    first, again = build(ALGORITHM), build(ALGORITHM)
    newer = build(dataclasses.replace(ALGORITHM, version="0.2.0"))
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.SOPInstanceUID == derived_uid(source.SOPInstanceUID, MODEL_VERSION, KIND_SR)
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert newer.SeriesInstanceUID != first.SeriesInstanceUID
    assert first.SeriesInstanceUID == derived_uid(
        source.SOPInstanceUID, MODEL_VERSION, KIND_SR_SERIES
    )
    # Another image of the same study: an SR series of its own (OHIF shows one SR per series).
    sibling = _rg1()
    sibling.SOPInstanceUID = generate_uid()
    other_image = build(ALGORITHM, sibling)
    assert other_image.SeriesInstanceUID != first.SeriesInstanceUID
    assert other_image.StudyInstanceUID == first.StudyInstanceUID
    assert other_image.SOPInstanceUID != first.SOPInstanceUID


# --------------------------------------------------------------------------------------------
# The SR: dciodvfy, dsr2html, round trip
# --------------------------------------------------------------------------------------------

SourceFactory = Callable[[], Dataset]

SR_CASES = [
    pytest.param(_rg1, _prediction((0.1, 0.2, 0.7)), False, id="rg1-covid19"),
    pytest.param(_rg1, _prediction((0.05, 0.15, 0.8)), True, id="rg1-covid19-heatmap"),
    pytest.param(
        lambda: _phantom_source("normal"),
        _prediction((0.9, 0.06, 0.04)),
        False,
        id="phantom-normal",
    ),
    pytest.param(
        lambda: _phantom_source("pneumonia", "DX"),
        _prediction((0.123456789, 0.654321, 0.222222211)),
        True,
        id="phantom-dx-pneumonia",
    ),
    pytest.param(
        lambda: _phantom_source("COVID-19"),
        _prediction((0.01, 0.02, 0.97)),
        True,
        id="phantom-covid19",
    ),
    pytest.param(
        lambda: _phantom_source("normal", seed=12),
        Unassessable(("not a frontal chest view (ViewPosition LL)", "image smaller than 256 px")),
        False,
        id="phantom-unassessable",
    ),
]


@pytest.mark.parametrize(("make_source", "outcome", "with_heatmap"), SR_CASES)
def test_sr_is_valid_renders_and_round_trips(
    tmp_path: Path,
    make_source: SourceFactory,
    outcome: Prediction | Unassessable,
    with_heatmap: bool,
) -> None:
    source = make_source()
    heatmap = _heatmap_for(source) if with_heatmap else None
    sr = build_sr(
        source,
        outcome,
        ALGORITHM,
        series_number=SERIES_NUMBER,
        series_description=SERIES_DESCRIPTION,
        heatmap_sc=heatmap,
        institution_name="Test Hospital",
    )
    assert sr is not None
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)

    report = dciodvfy(path)
    assert not report.errors, report

    text = "\n".join(html_to_text(dsr2html(path)))
    assert ALGORITHM.name in text
    assert AI_NOTICE in text
    if isinstance(outcome, Prediction):
        assert f"predicted: {MEANINGS[outcome.predicted]}" in text
        for name in CLASS_NAMES:
            assert f"{MEANINGS[name]} probability" in text
    else:
        assert "Not Evaluated" in text
        assert all(reason in text for reason in outcome.reasons)

    back = pydicom.dcmread(path)
    _check_header(back, source)
    summary = read_sr(back)
    assert summary.sop_instance_uid == sr.SOPInstanceUID
    assert summary.study_instance_uid == source.StudyInstanceUID
    assert summary.source_sop_instance_uid == source.SOPInstanceUID
    assert summary.algorithm_name == ALGORITHM.name
    assert summary.algorithm_version == ALGORITHM.version
    assert summary.weights_sha256 == ALGORITHM.weights_sha256
    assert dict(summary.algorithm_parameters) == dict(ALGORITHM.parameters)
    assert summary.heatmap_sop_instance_uid == (heatmap.SOPInstanceUID if heatmap else None)
    assert summary.region == image_centre(source.Rows, source.Columns)
    if isinstance(outcome, Prediction):
        assert summary.predicted == outcome.predicted
        assert dict(summary.probabilities) == pytest.approx(dict(outcome.probabilities), abs=1e-12)
        assert summary.unassessable_reasons == ()
        assert summary.comments == (f"{AI_NOTICE}; predicted: {MEANINGS[outcome.predicted]}",)
    else:
        assert summary.predicted is None
        assert dict(summary.probabilities) == {}
        assert summary.unassessable_reasons == outcome.reasons
        assert summary.comments[0] == f"{AI_NOTICE}; not evaluated"
        assert summary.comments[1:] == tuple(f"Reason: {r}" for r in outcome.reasons)


def _check_header(sr: Dataset, source: Dataset) -> None:
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyID", "AccessionNumber"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.Modality == "SR"
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesNumber == SERIES_NUMBER
    assert sr.SeriesDescription == SERIES_DESCRIPTION
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.Manufacturer == equipment.MANUFACTURER
    assert sr.ManufacturerModelName == equipment.MANUFACTURER_MODEL_NAME
    assert list(sr.SoftwareVersions) == list(equipment.software_versions(MODEL_VERSION))
    purposes = [
        (code.CodeValue, code.CodingSchemeDesignator)
        for item in sr.ContributingEquipmentSequence
        for code in item.PurposeOfReferenceCodeSequence
    ]
    assert ("Newcode1", "99IHE") in purposes
    declared = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert {"99IHE", CODING_SCHEME_CORONET} <= declared


def _probability_items(sr: Dataset) -> list[Dataset]:
    (group,) = [
        item
        for container in sr.ContentSequence
        if container.ValueType == "CONTAINER"
        for item in container.ContentSequence
        if item.ValueType == "CONTAINER"
    ]
    return [item for item in group.ContentSequence if item.ValueType == "NUM"]


def test_each_probability_is_a_class_named_percentage_inferred_from_the_image_centre() -> None:
    """The shape OHIF 3.13 draws: NUMs named by class, in %, each INFERRED FROM a SCOORD POINT
    "Image Region" SELECTED FROM the source image."""
    source = _rg1()
    point = image_centre(source.Rows, source.Columns)
    sr = build_sr(
        source,
        _prediction((0.0235, 0.9711, 0.0054)),
        ALGORITHM,
        series_number=SERIES_NUMBER,
        series_description=SERIES_DESCRIPTION,
    )
    assert sr is not None
    nums = _probability_items(sr)
    assert [n.ConceptNameCodeSequence[0].CodeMeaning for n in nums] == [
        f"{MEANINGS[name]} probability" for name in CLASS_NAMES
    ]
    values = [float(n.MeasuredValueSequence[0].NumericValue) for n in nums]
    assert values == pytest.approx([2.35, 97.11, 0.54])
    for num in nums:
        assert num.ConceptNameCodeSequence[0].CodingSchemeDesignator == CODING_SCHEME_CORONET
        assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
        (scoord,) = [c for c in num.ContentSequence if c.ValueType == "SCOORD"]
        assert scoord.RelationshipType == "INFERRED FROM"
        assert scoord.ConceptNameCodeSequence[0].CodeValue == "111030"  # Image Region
        assert scoord.GraphicType == "POINT"
        assert [float(v) for v in scoord.GraphicData] == [point.column, point.row]
        (image,) = scoord.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert read_sr(sr).region == point


def test_not_evaluated_group_has_no_probability_but_a_drawable_count() -> None:
    source = _phantom_source("normal")
    sr = build_sr(
        source,
        Unassessable(("image unlike the data the model was trained on",)),
        ALGORITHM,
        series_number=SERIES_NUMBER,
        series_description=SERIES_DESCRIPTION,
    )
    assert sr is not None
    (num,) = _probability_items(sr)
    assert num.ConceptNameCodeSequence[0].CodeMeaning == "Classes not evaluated"
    assert float(num.MeasuredValueSequence[0].NumericValue) == len(CLASS_NAMES)
    summary = read_sr(sr)
    assert summary.region == image_centre(source.Rows, source.Columns)
    assert summary.probabilities == {}


CAVEAT = "trained on synthetic phantoms, not patient data"


@pytest.mark.parametrize("informative", [True, False])
def test_a_powerless_heatmap_and_the_caveat_are_one_comment_a_viewer_shows(
    tmp_path: Path, informative: bool
) -> None:
    """With the notice, one more Comment: OHIF 3.13 draws five lines, three are probabilities."""
    source = _phantom_source("COVID-19")
    algorithm = dataclasses.replace(ALGORITHM, caveat=CAVEAT)
    attribution = Attribution("COVID-19", 0.9, 0.01 if informative else 0.8, informative)
    sr = build_sr(
        source,
        _prediction((0.05, 0.05, 0.9)),
        algorithm,
        series_number=SERIES_NUMBER,
        series_description=SERIES_DESCRIPTION,
        attribution=attribution,
    )
    assert sr is not None
    comments = list(read_sr(sr).comments)
    warning = "" if informative else "Heatmap NOT informative; t"
    assert comments == [
        f"{AI_NOTICE}; predicted: COVID-19",
        f"{warning or 'T'}rained on synthetic phantoms, not patient data",
    ]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert not dciodvfy(path).errors, dciodvfy(path)


def test_a_not_evaluated_sr_says_the_caveat_before_the_reasons() -> None:
    algorithm = dataclasses.replace(ALGORITHM, caveat=CAVEAT)
    reason = "image unlike the data the model was trained on (gate score 3.10 > 1: layout)"
    sr = build_sr(
        _phantom_source("normal"),
        Unassessable((reason,)),
        algorithm,
        series_number=SERIES_NUMBER,
        series_description=SERIES_DESCRIPTION,
    )
    assert sr is not None
    assert list(read_sr(sr).comments) == [
        f"{AI_NOTICE}; not evaluated",
        "Trained on synthetic phantoms, not patient data",
        f"Reason: {reason}",
    ]


def test_unassessable_can_be_skipped() -> None:
    outcome = Unassessable(("failed pre-processing: empty image",))
    sr = build_sr(
        _rg1(),
        outcome,
        ALGORITHM,
        series_number=SERIES_NUMBER,
        series_description=SERIES_DESCRIPTION,
        on_unassessable="skip",
    )
    assert sr is None


def _source_without_sop_uid() -> Dataset:
    ds = _rg1()
    del ds.SOPInstanceUID
    return ds


def _rg1_without_size() -> Dataset:
    ds = _rg1()
    del ds.Rows, ds.Columns
    return ds


def _heatmap_other_study() -> Dataset:
    return _heatmap_for(_phantom_source("normal", seed=13))


@pytest.mark.parametrize(
    ("make_source", "outcome", "kwargs", "message"),
    [
        (
            _rg1,
            Prediction(("normal", "influenza"), {"normal": 0.4, "influenza": 0.6}, "influenza"),
            {},
            "no coded finding",
        ),
        (_source_without_sop_uid, _prediction((0.1, 0.2, 0.7)), {}, "SOPInstanceUID"),
        (_rg1, _prediction((0.1, 0.2, 0.7)), {"on_unassessable": "drop"}, "on_unassessable"),
        (_rg1, _prediction((0.1, 0.2, 0.7)), {"series_number": -1}, "series_number"),
        (_rg1, _prediction((0.1, 0.2, 0.7)), {"series_description": "x" * 65}, "1 to 64"),
        (
            _rg1,
            _prediction((0.1, 0.2, 0.7)),
            {"heatmap_sc": _heatmap_other_study()},
            "another study",
        ),
        (_rg1_without_size, _prediction((0.1, 0.2, 0.7)), {}, "Rows and Columns"),
    ],
)
def test_build_sr_rejects_bad_input(
    make_source: SourceFactory,
    outcome: Prediction | Unassessable,
    kwargs: dict[str, object],
    message: str,
) -> None:
    arguments: dict[str, object] = {
        "series_number": SERIES_NUMBER,
        "series_description": SERIES_DESCRIPTION,
        **kwargs,
    }
    with pytest.raises(ResultError, match=message):
        build_sr(make_source(), outcome, ALGORITHM, **arguments)  # type: ignore[arg-type]


def test_read_sr_rejects_a_non_sr() -> None:
    with pytest.raises(ResultError, match="not a Comprehensive 3D SR"):
        read_sr(_rg1())


# --------------------------------------------------------------------------------------------
# Orthanc accepts the SR into the source's study
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_orthanc_files_sr_in_source_study(tmp_path: Path) -> None:
    source = _rg1()
    sr = build_sr(
        source,
        _prediction((0.1, 0.2, 0.7)),
        ALGORITHM,
        series_number=SERIES_NUMBER,
        series_description=SERIES_DESCRIPTION,
    )
    assert sr is not None
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)

    with running_orthanc(tmp_path / "orthanc", aet="PACS") as pacs:
        storescu([RG1], port=pacs.dicom_port, called_aet=pacs.aet)
        storescu([sr_path], port=pacs.dicom_port, called_aet=pacs.aet)

        studies = pacs.find_studies(source.StudyInstanceUID)
        assert len(studies) == 1
        series = pacs.study_series(studies[0])
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
        assert modalities == ["CR", "SR"]
        (sr_series,) = [s for s in series if s["MainDicomTags"]["Modality"] == "SR"]
        assert UID(sr_series["MainDicomTags"]["SeriesInstanceUID"]) == sr.SeriesInstanceUID
        (instance_id,) = sr_series["Instances"]
        stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(pacs.download_instance(instance_id)))
        assert stored.StudyInstanceUID == source.StudyInstanceUID
        assert read_sr(stored).predicted == "COVID-19"
