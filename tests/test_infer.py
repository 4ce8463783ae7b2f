"""``coronet infer``: offline inference on DICOM files, with the shipped demo weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.cli import main
from tests.support.dicom_tools import dciodvfy
from worker.results.sr import read_sr

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "node.yaml"


def rg1(name: str = "RG1_UNCR.dcm") -> Path:
    path = get_testdata_file(name)
    assert path is not None
    return Path(path)


def infer(*args: str) -> int:
    return main(["infer", "--config", str(CONFIG), *args])


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run with the fast heatmap on the real chest CR, shared by the checks below."""
    out = tmp_path_factory.mktemp("infer")
    assert infer(str(rg1()), "--out", str(out), "--fast", "--png") == 0
    return out


def test_infer_writes_sr_sc_json_and_png(fast_run: Path) -> None:
    names = sorted(p.name for p in fast_run.iterdir())
    assert names == ["RG1_UNCR.json", "RG1_UNCR.png", "RG1_UNCR.sc.dcm", "RG1_UNCR.sr.dcm"]
    record = json.loads((fast_run / "RG1_UNCR.json").read_text())
    assert set(record["probabilities"]) == {"normal", "pneumonia", "COVID-19"}
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-5
    assert record["predicted"] == max(record["probabilities"], key=record["probabilities"].get)
    assert "demo" in record["model_version"]
    assert {"inference_s", "heatmap_s", "total_s"} <= set(record["timings_s"])


@pytest.mark.parametrize("suffix", ["sr.dcm", "sc.dcm"])
def test_infer_objects_pass_dciodvfy(fast_run: Path, suffix: str) -> None:
    report = dciodvfy(fast_run / f"RG1_UNCR.{suffix}")
    assert not report.errors, report.output


def test_sr_matches_json_and_references_sc(fast_run: Path) -> None:
    record = json.loads((fast_run / "RG1_UNCR.json").read_text())
    summary = read_sr(pydicom.dcmread(fast_run / "RG1_UNCR.sr.dcm"))
    sc = pydicom.dcmread(fast_run / "RG1_UNCR.sc.dcm")
    assert summary.predicted == record["predicted"]
    for name, p in record["probabilities"].items():
        assert summary.probabilities[name] == pytest.approx(p, abs=1e-6)
    assert summary.heatmap_sop_instance_uid == sc.SOPInstanceUID
    assert summary.source_sop_instance_uid == pydicom.dcmread(rg1()).SOPInstanceUID


def test_infer_matches_bundle_inference_without_heatmap(tmp_path: Path) -> None:
    """Same preprocessing and network as the bundle: both encodings agree to 1e-4."""
    assert (
        infer(
            str(rg1("RG1_UNCR.dcm")),
            str(rg1("RG1_J2KR.dcm")),
            "--out",
            str(tmp_path),
            "--no-heatmap",
        )
        == 0
    )
    a = json.loads((tmp_path / "RG1_UNCR.json").read_text())["probabilities"]
    b = json.loads((tmp_path / "RG1_J2KR.json").read_text())["probabilities"]
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert not list(tmp_path.glob("*.sc.dcm"))


def _ct_copy(folder: Path) -> Path:
    ds = pydicom.dcmread(rg1())
    ds.Modality = "CT"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / "ct.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize(("policy", "expect_sr"), [("report", True), ("skip", False)])
def test_unassessable_image_gets_no_finding(tmp_path: Path, policy: str, expect_sr: bool) -> None:
    source = _ct_copy(tmp_path)
    out = tmp_path / "out"
    argv = [str(source), "--out", str(out), "--set", f"results.on_unassessable={policy}"]
    assert infer(*argv) == 0
    record = json.loads((out / "ct.json").read_text())
    assert record["predicted"] is None
    assert any("CT" in reason for reason in record["unassessable_reasons"])
    assert not (out / "ct.sc.dcm").exists()
    assert (out / "ct.sr.dcm").exists() == expect_sr
    if expect_sr:
        summary = read_sr(pydicom.dcmread(out / "ct.sr.dcm"))
        assert summary.predicted is None and summary.probabilities == {}
        assert not dciodvfy(out / "ct.sr.dcm").errors


def test_bad_file_is_reported_and_the_rest_go_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.dcm").write_text("not DICOM at all")
    shutil.copy(rg1(), folder / "good.dcm")
    out = tmp_path / "out"
    assert (
        infer(
            str(folder / "notes.dcm"), str(folder / "good.dcm"), "--out", str(out), "--no-heatmap"
        )
        == 1
    )
    assert (out / "good.json").exists()
    err = capsys.readouterr().err
    assert "notes.dcm" in err


def test_a_folder_names_each_skipped_file_and_the_exit_status_says_it_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "README.txt").write_text("not DICOM")
    shutil.copy(rg1(), folder / "good.dcm")
    out = tmp_path / "out"
    assert infer(str(folder), "--out", str(out), "--no-heatmap") == 1
    assert (out / "good.json").exists()
    captured = capsys.readouterr()
    assert f"skipped {folder / 'README.txt'}: not a DICOM file" in captured.err
    assert "1 of 2 files processed" in captured.out


def test_no_inputs(tmp_path: Path) -> None:
    assert infer(str(tmp_path), "--out", str(tmp_path / "out")) == 1
