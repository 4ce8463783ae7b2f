"""What the radiologist sees: our SR and SC in OHIF 3.13.2, over Orthanc's DICOMweb plugin, in
headless Chromium, all on 127.0.0.1.

A frontal and a lateral phantom radiograph of one study go through ``coronet infer`` (the
shipped demo weights, the fast attribution map); the sources and the results are stored in
Orthanc by C-STORE, and OHIF opens each result series in turn.  The checks read what a person
reads: the page text, the SVG labels OHIF draws for the SR, and the geometry of the burned-in
text of the SC against the viewer's overlays.

Screenshots go to the test's folder, and to ``$SCREENSHOT_DIR`` when set (``make screenshots``
writes the README's, in ``docs/images/``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from selenium import webdriver

from dicom_node.cli import main
from monai_bundle.scripts.classes import CLASSES
from monai_bundle.scripts.phantoms import make_phantom, write_dicom
from tests.support.browser import headless_chromium, page_text
from tests.support.dicom_tools import dcentvfy, dciodvfy, storescu
from tests.support.ohif import (
    OHIF_VERSION,
    OhifServer,
    annotation_boxes,
    dicomweb_config,
    error_notices,
    inside,
    ohif_dist,
    ohif_version,
    overlays_over,
    serving_ohif,
)
from tests.support.orthanc import OrthancServer, running_orthanc
from tests.support.polling import wait_until
from worker.results.render import output_shape
from worker.results.sr import AI_NOTICE, read_sr

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "node.yaml"
MEANINGS = {c.name: c.meaning for c in CLASSES}
#: Seconds the viewer may take to show a series.
SHOW_TIMEOUT_S = 60.0
PHANTOM_SIZE = 512
#: Brightness above which a pixel of the SC's caption band is text.
TEXT_LEVEL = 200


@dataclass(frozen=True)
class Study:
    """The files of the viewer study: two sources and what ``coronet infer`` made of them."""

    frontal: Path
    lateral: Path
    sr: Path
    sc: Path
    not_evaluated_sr: Path

    @property
    def files(self) -> list[Path]:
        return [self.frontal, self.lateral, self.sc, self.sr, self.not_evaluated_sr]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """A PA and a lateral phantom chest CR in one study, and ``coronet infer``'s results."""
    folder = tmp_path_factory.mktemp("viewer-study")
    study_uid = generate_uid()
    sources = {}
    for name, label, view in (("frontal", "pneumonia", "PA"), ("lateral", "normal", "LL")):
        path = folder / "in" / f"{name}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_dicom(
            make_phantom(label, size=PHANTOM_SIZE, seed=3),
            path,
            view_position=view,
            study_uid=study_uid,
            series_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
        )
        sources[name] = path
    out = folder / "out"
    argv = ["infer", "--config", str(CONFIG), str(folder / "in"), "--out", str(out), "--fast"]
    assert main(argv) == 0
    return Study(
        frontal=sources["frontal"],
        lateral=sources["lateral"],
        sr=out / "frontal.sr.dcm",
        sc=out / "frontal.sc.dcm",
        not_evaluated_sr=out / "lateral.sr.dcm",
    )


@pytest.fixture(scope="module")
def pacs(study: Study, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Orthanc with its DICOMweb plugin, holding the study."""
    workdir = tmp_path_factory.mktemp("viewer-pacs")
    with running_orthanc(workdir, aet="PACS", extra_config=dicomweb_config()) as server:
        storescu(study.files, port=server.dicom_port, called_aet=server.aet)
        yield server


@pytest.fixture(scope="module")
def viewer(pacs: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OhifServer]:
    with serving_ohif(pacs, tmp_path_factory.mktemp("viewer-web")) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    with headless_chromium(tmp_path_factory.mktemp("viewer-profile")) as driver:
        yield driver


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Where screenshots are saved: the test's folder, and ``$SCREENSHOT_DIR`` when set."""
    folders = [tmp_path_factory.mktemp("viewer-screenshots")]
    if os.environ.get("SCREENSHOT_DIR"):
        folders.append(Path(os.environ["SCREENSHOT_DIR"]))
    return folders


def _save(driver: webdriver.Chrome, folders: list[Path], name: str) -> None:
    first = folders[0] / name
    assert driver.save_screenshot(str(first))
    for folder in folders[1:]:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, folder / name)


def _open(driver: webdriver.Chrome, viewer: OhifServer, series: Dataset) -> None:
    driver.get(viewer.study_url(series.StudyInstanceUID, series.SeriesInstanceUID))


def _wait_for_lines(driver: webdriver.Chrome, lines: list[str]) -> str:
    """Poll the page until every line shows; the page text."""
    seen = {"text": ""}

    def shown() -> bool:
        seen["text"] = page_text(driver)
        return all(line in seen["text"] for line in lines)

    try:
        wait_until(shown, SHOW_TIMEOUT_S, "the viewer to show the lines", interval=0.5)
    except AssertionError:
        missing = [line for line in lines if line not in seen["text"]]
        raise AssertionError(f"not shown: {missing}\npage text:\n{seen['text']}") from None
    return seen["text"]


def _assert_labels_legible(driver: webdriver.Chrome, lines: list[str]) -> None:
    """Every label line is drawn whole inside the viewport, and no error is shown."""
    found = annotation_boxes(driver)
    assert found is not None
    viewport, texts = found
    for line in lines:
        drawn = [t for t in texts if line in t.what]
        assert drawn, f"{line!r} is not an SVG label: {[t.what for t in texts]}"
        assert all(inside(t.box, viewport) for t in drawn), f"{line!r} is cut off: {drawn}"
    assert error_notices(driver) == []


def _num_lines(sr: Dataset) -> dict[str, str]:
    """Class -> how OHIF labels its probability: meaning, value to 2 decimals, unit code."""
    lines = {}
    for container in sr.ContentSequence:
        for group in getattr(container, "ContentSequence", []):
            for item in getattr(group, "ContentSequence", []):
                if item.ValueType != "NUM":
                    continue
                value = item.MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                meaning = item.ConceptNameCodeSequence[0].CodeMeaning
                lines[meaning] = f"{meaning}: {float(value.NumericValue):.2f} {unit}"
    return lines


def test_viewer_is_the_pinned_ohif_release() -> None:
    assert ohif_version(ohif_dist()) == OHIF_VERSION


def test_results_pass_dciodvfy_and_agree_with_their_source_on_patient_and_study(
    study: Study,
) -> None:
    for path in (study.sr, study.sc, study.not_evaluated_sr):
        report = dciodvfy(path)
        assert not report.errors, report
    assert dcentvfy([study.frontal, study.sr, study.sc]) == []
    assert dcentvfy([study.lateral, study.not_evaluated_sr]) == []


def test_ohif_draws_each_class_probability_the_predicted_class_and_the_notice_of_our_sr(
    study: Study,
    viewer: OhifServer,
    browser: webdriver.Chrome,
    screenshots: list[Path],
) -> None:
    sr = pydicom.dcmread(study.sr)
    summary = read_sr(sr)
    assert summary.predicted is not None
    by_meaning = _num_lines(sr)
    probabilities = [by_meaning[f"{MEANINGS[name]} probability"] for name in summary.probabilities]
    notice = f"{AI_NOTICE}; predicted: {MEANINGS[summary.predicted]}"
    _open(browser, viewer, sr)
    _wait_for_lines(browser, [notice, *probabilities])
    _save(browser, screenshots, "ohif-sr.png")
    _assert_labels_legible(browser, [notice, *probabilities])
    assert viewer.failures == []


def test_ohif_draws_why_an_image_was_not_evaluated(
    study: Study,
    viewer: OhifServer,
    browser: webdriver.Chrome,
    screenshots: list[Path],
) -> None:
    sr = pydicom.dcmread(study.not_evaluated_sr)
    summary = read_sr(sr)
    assert summary.predicted is None and summary.unassessable_reasons
    lines = [*summary.comments, *_num_lines(sr).values()]
    assert f"{AI_NOTICE}; not evaluated" in lines
    assert any(r in line for r in summary.unassessable_reasons for line in lines)
    _open(browser, viewer, sr)
    _wait_for_lines(browser, lines)
    _save(browser, screenshots, "ohif-sr-not-evaluated.png")
    _assert_labels_legible(browser, lines)
    found = annotation_boxes(browser)
    assert found is not None
    assert not any("probability:" in label.what for label in found[1])
    assert viewer.failures == []


def _caption_text_region(sc: Dataset, source: Dataset) -> tuple[float, float, float, float]:
    """The rectangle (column0, row0, column1, row1) of the SC's burned-in text, in its pixels."""
    image_rows, _ = output_shape(source.Rows, source.Columns)
    caption = sc.pixel_array[image_rows:].max(axis=2)
    text = np.argwhere(caption > TEXT_LEVEL)
    assert text.size, "the SC has no burned-in text below its image"
    (row0, column0), (row1, column1) = text.min(axis=0), text.max(axis=0)
    return (
        float(column0),
        float(image_rows + row0),
        float(column1 + 1),
        float(image_rows + row1 + 1),
    )


def test_ohif_shows_the_sc_with_no_overlay_over_its_burned_in_text(
    study: Study,
    viewer: OhifServer,
    browser: webdriver.Chrome,
    screenshots: list[Path],
) -> None:
    sc = pydicom.dcmread(study.sc)
    region = _caption_text_region(sc, pydicom.dcmread(study.frontal, stop_before_pixels=True))
    _open(browser, viewer, sc)
    # OHIF opens its cine player over the top centre for Modality OT: wait for it, so that the
    # check below sees every overlay the viewer draws.
    wait_until(
        lambda: browser.find_elements("css selector", '[data-cy="cine-player-play-pause"]'),
        SHOW_TIMEOUT_S,
        "the cine player",
        interval=0.5,
    )
    placement = wait_until(
        lambda: overlays_over(browser, region), SHOW_TIMEOUT_S, "the SC", interval=0.5
    )
    assert placement is not None
    _save(browser, screenshots, "ohif-sc.png")
    assert inside(placement.region, placement.viewport), placement
    assert placement.covers == [], f"overlays over the burned-in text: {placement.covers}"
    assert error_notices(browser) == []
    assert viewer.failures == []
