"""The heatmap Secondary Capture: header, deterministic UIDs, dciodvfy on real and phantom
sources, rendering, bad input, and storage next to the SR in a real Orthanc."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from dicom_node.core.errors import ResultError
from dicom_node.core.settings import ResultSettings
from monai_bundle.scripts.dicom_image import load_dicom_image
from monai_bundle.scripts.phantoms import make_phantom, phantom_dataset
from tests.support.dicom_tools import dcentvfy, dciodvfy, ocr, storescu
from tests.support.orthanc import running_orthanc
from worker.results import equipment
from worker.results.outcome import AlgorithmInfo, Attribution, Prediction
from worker.results.render import (
    AI_NOTICE,
    MAX_LONG_SIDE,
    MIN_LONG_SIDE,
    TEXT_WIDTH,
    output_shape,
    render_overlay,
    save_png,
)
from worker.results.sc import build_sc, caption_remarks
from worker.results.sr import build_sr, read_sr
from worker.results.uids import KIND_SC, KIND_SC_SERIES, derived_uid, series_uid

CLASS_NAMES = ("normal", "pneumonia", "COVID-19")
MODEL_VERSION = "0.1.0+demo-phantom"
SERIES_NUMBER = 902
SERIES_DESCRIPTION = "CoroNet heatmap (test)"
ALGORITHM = AlgorithmInfo(
    name="CoroNet", version=MODEL_VERSION, weights_sha256="ab" * 32, parameters={"size": "256"}
)
PREDICTION = Prediction(
    CLASS_NAMES, {"normal": 0.05, "pneumonia": 0.15, "COVID-19": 0.8}, "COVID-19"
)
_rg1_path = get_testdata_file("RG1_UNCR.dcm")
assert isinstance(_rg1_path, str), "pydicom-data lacks RG1_UNCR.dcm"
RG1 = Path(_rg1_path)


def _heatmap(rows: int = 200, cols: int = 160) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.exp(-((yy - 0.4 * rows) ** 2 + (xx - 0.3 * cols) ** 2) / (0.02 * rows * cols)).astype(
        np.float32
    )


def _rg1() -> Dataset:
    return pydicom.dcmread(RG1)


def _phantom_dx() -> Dataset:
    ds = phantom_dataset(make_phantom("COVID-19", 128, 3), modality="DX")
    ds.PatientOrientation = None  # unknown orientation must stay unknown in the SC
    return ds


def _build(source: Dataset, **kwargs: Any) -> Any:
    arguments: dict[str, Any] = {
        "series_number": SERIES_NUMBER,
        "series_description": SERIES_DESCRIPTION,
    }
    arguments.update(kwargs)
    heatmap = arguments.pop("heatmap", _heatmap())
    prediction = arguments.pop("prediction", PREDICTION)
    algorithm = arguments.pop("algorithm", ALGORITHM)
    if "source_image" not in arguments:  # what the worker's decoder process makes of it
        arguments["source_image"] = load_dicom_image(source)
    with warnings.catch_warnings():
        # RG1's Referring Physician's Name "ward" has one component: highdicom's warning about
        # it must not reach the worker's log, so any UserWarning fails the test.
        warnings.simplefilter("error", UserWarning)
        return build_sc(source, heatmap, prediction, algorithm, **arguments)


SOURCES: dict[str, Callable[[], Dataset]] = {"rg1-cr-mono1": _rg1, "phantom-dx-mono2": _phantom_dx}


@pytest.fixture(scope="module", params=list(SOURCES))
def built(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Dataset, Dataset, Path]]:
    """(source, SC as read back from disk, its path) for each kind of source."""
    source = SOURCES[request.param]()
    sc = _build(source)
    path = tmp_path_factory.mktemp("sc") / f"{request.param}.dcm"
    sc.save_as(path, enforce_file_format=True)
    yield source, pydicom.dcmread(path), path


# --------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------


def test_sc_passes_dciodvfy(built: tuple[Dataset, Dataset, Path]) -> None:
    _, _, path = built
    report = dciodvfy(path)
    assert not report.errors, report


@pytest.mark.parametrize(
    ("keyword", "expected"),
    [
        ("SOPClassUID", lambda src: SecondaryCaptureImageStorage),
        ("SOPInstanceUID", lambda src: derived_uid(src.SOPInstanceUID, MODEL_VERSION, KIND_SC)),
        (
            "SeriesInstanceUID",
            lambda src: series_uid(src.StudyInstanceUID, MODEL_VERSION, KIND_SC_SERIES),
        ),
        ("StudyInstanceUID", lambda src: src.StudyInstanceUID),
        ("PatientID", lambda src: src.PatientID),
        ("PatientName", lambda src: src.PatientName),
        ("PatientBirthDate", lambda src: src.get("PatientBirthDate", "")),
        ("AccessionNumber", lambda src: src.get("AccessionNumber", "")),
        ("StudyDate", lambda src: src.get("StudyDate", "")),
        ("StudyDescription", lambda src: src.get("StudyDescription", "")),
        ("SeriesNumber", lambda src: SERIES_NUMBER),
        ("SeriesDescription", lambda src: SERIES_DESCRIPTION),
        ("BurnedInAnnotation", lambda src: "YES"),
        ("BodyPartExamined", lambda src: "CHEST"),
        ("ImageType", lambda src: ["DERIVED", "SECONDARY"]),
        ("ConversionType", lambda src: "WSD"),
        ("Modality", lambda src: "OT"),
        ("PhotometricInterpretation", lambda src: "RGB"),
        ("SamplesPerPixel", lambda src: 3),
        ("PlanarConfiguration", lambda src: 0),
        ("BitsAllocated", lambda src: 8),
        ("Manufacturer", lambda src: equipment.MANUFACTURER),
        ("ManufacturerModelName", lambda src: equipment.MANUFACTURER_MODEL_NAME),
        ("SoftwareVersions", lambda src: list(equipment.software_versions(MODEL_VERSION))),
        ("SecondaryCaptureDeviceManufacturer", lambda src: equipment.MANUFACTURER),
        ("PatientOrientation", lambda src: src.get("PatientOrientation") or ""),
    ],
)
def test_sc_header(
    built: tuple[Dataset, Dataset, Path], keyword: str, expected: Callable[[Dataset], object]
) -> None:
    source, sc, _ = built
    value = sc[keyword].value
    want = expected(source)
    if isinstance(want, list):
        assert list(value) == want
    else:
        assert value == want


def test_source_sr_and_sc_agree_on_patient_and_study(
    built: tuple[Dataset, Dataset, Path], tmp_path: Path
) -> None:
    source, sc, sc_path = built
    sr = build_sr(
        source,
        PREDICTION,
        ALGORITHM,
        series_number=901,
        series_description="CoroNet AI result - not for diagnostic use",
        heatmap_sc=sc,
    )
    assert sr is not None
    source_path, sr_path = tmp_path / "source.dcm", tmp_path / "sr.dcm"
    source.save_as(source_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    assert dcentvfy([source_path, sr_path, sc_path]) == []


def test_sc_is_a_new_series_referencing_the_source(built: tuple[Dataset, Dataset, Path]) -> None:
    source, sc, _ = built
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SOPInstanceUID != source.SOPInstanceUID
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_sc_names_this_software_as_contributing_equipment(
    built: tuple[Dataset, Dataset, Path],
) -> None:
    _, sc, _ = built
    ours = [
        item
        for item in sc.ContributingEquipmentSequence
        if item.Manufacturer == equipment.MANUFACTURER
    ]
    assert len(ours) == 1
    purpose = ours[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("Newcode1", "99IHE")
    schemes = [item.CodingSchemeDesignator for item in sc.CodingSchemeIdentificationSequence]
    assert "99IHE" in schemes


def test_sc_pixels_keep_the_source_aspect(built: tuple[Dataset, Dataset, Path]) -> None:
    source, sc, _ = built
    rows, cols = output_shape(source.Rows, source.Columns)
    assert sc.pixel_array.shape[2] == 3
    # Image area above the caption band and left of the colour bar.
    assert sc.Rows > rows and sc.Columns > cols
    assert abs(rows / cols - source.Rows / source.Columns) < 0.01


def test_sc_uids_are_deterministic_and_change_with_the_model_version() -> None:
    source = _phantom_dx()
    first, second = _build(source), _build(source)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    other_algorithm = AlgorithmInfo("CoroNet", "0.2.0", "cd" * 32)
    other = _build(source, algorithm=other_algorithm)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID


def test_given_source_image_is_used_instead_of_decoding() -> None:
    source = _phantom_dx()
    white = np.ones((source.Rows, source.Columns), dtype=np.float32)
    zero = np.zeros((50, 50), dtype=np.float32)
    sc = _build(source, source_image=white, heatmap=zero)
    rows, cols = output_shape(source.Rows, source.Columns)
    area = sc.pixel_array[:rows, :cols]
    assert (area == 255).all()  # white radiograph, no attribution: nothing blended on top


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((1955, 1841), (1024, round(1841 * 1024 / 1955))),
        ((256, 256), (MIN_LONG_SIDE, MIN_LONG_SIDE)),
        ((600, 800), (600, 800)),
        ((4000, 1000), (MAX_LONG_SIDE, 256)),
    ],
)
def test_output_shape_keeps_aspect_and_clamps(
    shape: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert output_shape(*shape) == expected


def test_overlay_colours_the_salient_region_and_leaves_the_rest_gray(tmp_path: Path) -> None:
    image = np.full((300, 200), 0.5, dtype=np.float32)
    heatmap = np.zeros((300, 200), dtype=np.float32)
    heatmap[50:100, 50:100] = 1.0
    rgb = render_overlay(image, heatmap, PREDICTION, model_version=MODEL_VERSION)
    rows, cols = output_shape(300, 200)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    area = rgb[:rows, :cols].astype(int)
    scale = rows / 300
    hot = area[round(75 * scale), round(75 * scale)]
    cold = area[round(250 * scale), round(150 * scale)]
    assert hot[0] > hot[2] and hot[1] > hot[2]  # viridis high end: yellow
    assert cold[0] == cold[1] == cold[2]  # no attribution: plain gray radiograph
    caption = rgb[rows:]
    assert caption.size and caption.max() > 200  # burned-in text
    path = save_png(rgb, tmp_path / "overlay.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)


def test_burned_in_text_stays_in_the_middle_of_a_band_below_the_image() -> None:
    """Viewers overlay the top centre (OHIF's cine player for OT) and the corners."""
    image = np.full((300, 200), 0.5, dtype=np.float32)
    rgb = render_overlay(image, _heatmap(300, 200), PREDICTION, model_version=MODEL_VERSION)
    rows, _ = output_shape(300, 200)
    text = np.argwhere(rgb[rows:].max(axis=2) > 200)
    assert text.size
    width = rgb.shape[1]
    margin = (1.0 - TEXT_WIDTH) / 2 * width
    assert text[:, 1].min() >= margin - 1 and text[:, 1].max() <= width - margin + 1


def test_the_caption_says_demo_weights_and_a_powerless_map_in_words_a_reader_can_read(
    tmp_path: Path,
) -> None:
    """The burned-in text read back by OCR (Tesseract), as a person reads it: the demo
    weights' caveat and a map whose deletion did not lower the class enough."""
    algorithm = AlgorithmInfo(
        "CoroNet",
        MODEL_VERSION,
        "ab" * 32,
        caveat="trained on synthetic phantoms, not patient data",
    )
    powerless = Attribution("COVID-19", 0.8, 0.7, informative=False)
    source = _phantom_dx()
    sc = _build(source, algorithm=algorithm, attribution=powerless)
    rows, _ = output_shape(source.Rows, source.Columns)
    band = sc.pixel_array[rows:]  # the caption band: everything below the image
    picture = tmp_path / "band.png"
    Image.fromarray(band).resize((band.shape[1] * 2, band.shape[0] * 2)).save(picture)
    text = " ".join(ocr(picture).split()).lower()
    assert "trained on synthetic phantoms, not patient data" in text, text
    assert "heatmap not informative" in text, text
    assert "attribution map - not for diagnostic use" in text, text


def test_caption_remarks_put_warnings_in_yellow_and_an_informative_map_in_white() -> None:
    algorithm = AlgorithmInfo("CoroNet", MODEL_VERSION, "ab" * 32, caveat="demo only")
    good = Attribution("COVID-19", 0.9, 0.01, informative=True)
    assert caption_remarks(algorithm, good) == (["Demo only"], [good.describe()])
    bad = Attribution("COVID-19", 0.9, 0.8, informative=False)
    assert caption_remarks(ALGORITHM, bad) == ([bad.describe()], [])
    assert (
        bad.describe()
        == "heatmap NOT informative: deleting it takes COVID-19 from 90.00 % to 80.00 %"
    )


def test_notice_is_a_constant_of_the_module() -> None:
    assert "not for diagnostic use" in AI_NOTICE
    assert "not for diagnostic use" in ResultSettings().sc_series_description


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _no_pixels() -> Dataset:
    ds = _phantom_dx()
    del ds.PixelData
    return ds


def _no_study() -> Dataset:
    ds = _phantom_dx()
    del ds.StudyInstanceUID
    return ds


def test_build_sc_refuses_a_source_without_a_study_uid() -> None:
    source = _no_study()
    with pytest.raises(ResultError, match="StudyInstanceUID"):
        _build(source, source_image=load_dicom_image(_phantom_dx()))


def test_build_sc_never_decodes_the_source_it_renders_the_given_image() -> None:
    image = load_dicom_image(_phantom_dx())
    sc = _build(_no_pixels(), source_image=image)  # no pixel data to decode: none is needed
    assert sc.Rows > 0 and sc.SamplesPerPixel == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"heatmap": np.full((8, 8), np.nan, dtype=np.float32)}, ResultError, "NaN"),
        ({"heatmap": np.full((8, 8), 1.5, dtype=np.float32)}, ResultError, r"\[0, 1\]"),
        ({"heatmap": np.zeros((8, 8, 3), dtype=np.float32)}, ResultError, "2-D"),
        ({"heatmap": np.zeros((8, 8), dtype=np.uint8)}, ResultError, "floating"),
        ({"heatmap": [[0.0]]}, ResultError, "numpy"),
        ({"source_image": np.zeros((1,), dtype=np.float32)}, ResultError, "2-D"),
        ({"series_number": -1}, ResultError, "series_number"),
        ({"series_number": True}, ResultError, "series_number"),
        ({"series_description": ""}, ResultError, "series_description"),
        ({"series_description": "x" * 65}, ResultError, "series_description"),
        ({"prediction": {"COVID-19": 1.0}}, ResultError, "Prediction"),
    ],
)
def test_build_sc_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _build(_phantom_dx(), **kwargs)


# --------------------------------------------------------------------------------------------
# Orthanc files the SC (and the SR that references it) in the source's study
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_orthanc_files_sc_and_sr_in_source_study(tmp_path: Path) -> None:
    source = copy.deepcopy(_phantom_dx())
    source.StudyInstanceUID = generate_uid()
    source_path = tmp_path / "source.dcm"
    source.save_as(source_path, enforce_file_format=True)
    sc = _build(source)
    sr = build_sr(
        source,
        PREDICTION,
        ALGORITHM,
        series_number=901,
        series_description="CoroNet AI result - not for diagnostic use",
        heatmap_sc=sc,
    )
    assert sr is not None
    sc_path, sr_path = tmp_path / "sc.dcm", tmp_path / "sr.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)

    with running_orthanc(tmp_path / "orthanc", aet="PACS") as pacs:
        storescu([source_path, sc_path, sr_path], port=pacs.dicom_port, called_aet=pacs.aet)
        (study,) = pacs.find_studies(source.StudyInstanceUID)
        series = pacs.study_series(study)
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["DX", "OT", "SR"]
        (sc_series,) = [s for s in series if s["MainDicomTags"]["Modality"] == "OT"]
        (instance_id,) = sc_series["Instances"]
        stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(pacs.download_instance(instance_id)))
        assert stored.SOPInstanceUID == sc.SOPInstanceUID
        assert stored.SeriesNumber == SERIES_NUMBER
        assert read_sr(sr).heatmap_sop_instance_uid == sc.SOPInstanceUID
