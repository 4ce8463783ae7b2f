"""``coronet infer``: offline inference on DICOM files, with the shipped demo weights.

The demo weights assess synthetic phantoms (what they were trained on) and refuse real
radiographs such as pydicom-data's RG1: both are checked here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.cli import main
from tests.support.dicom_data import phantom_cr
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
def chest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COVID-19 phantom as a CR frontal chest."""
    path = tmp_path_factory.mktemp("source") / "chest.dcm"
    phantom_cr(path)
    return path


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory, chest: Path) -> Path:
    """One run with the fast heatmap on the phantom, shared by the checks below."""
    out = tmp_path_factory.mktemp("infer")
    assert infer(str(chest), "--out", str(out), "--fast", "--png") == 0
    return out


def test_infer_writes_sr_sc_json_and_png(fast_run: Path) -> None:
    names = sorted(p.name for p in fast_run.iterdir())
    assert names == ["chest.json", "chest.png", "chest.sc.dcm", "chest.sr.dcm"]
    record = json.loads((fast_run / "chest.json").read_text())
    assert set(record["probabilities"]) == {"normal", "pneumonia", "COVID-19"}
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-5
    assert record["predicted"] == max(record["probabilities"], key=record["probabilities"].get)
    assert record["predicted"] == "COVID-19"
    assert "demo" in record["model_version"]
    assert {"inference_s", "heatmap_s", "total_s"} <= set(record["timings_s"])
    assert record["gate"]["accepted"] is True and record["gate"]["score"] <= 1
    attribution = record["attribution"]
    assert attribution["class"] == "COVID-19" and attribution["informative"] is True
    before, after = (attribution[f"target_probability_{w}"] for w in ("before", "after"))
    assert before == pytest.approx(record["probabilities"]["COVID-19"], abs=1e-5)
    assert after <= before / 2


@pytest.mark.parametrize("suffix", ["sr.dcm", "sc.dcm"])
def test_infer_objects_pass_dciodvfy(fast_run: Path, suffix: str) -> None:
    report = dciodvfy(fast_run / f"chest.{suffix}")
    assert not report.errors, report.output


def test_sr_matches_json_and_references_sc(fast_run: Path, chest: Path) -> None:
    record = json.loads((fast_run / "chest.json").read_text())
    summary = read_sr(pydicom.dcmread(fast_run / "chest.sr.dcm"))
    sc = pydicom.dcmread(fast_run / "chest.sc.dcm")
    assert summary.predicted == record["predicted"]
    for name, p in record["probabilities"].items():
        assert summary.probabilities[name] == pytest.approx(p, abs=1e-6)
    assert summary.heatmap_sop_instance_uid == sc.SOPInstanceUID
    assert summary.source_sop_instance_uid == pydicom.dcmread(chest).SOPInstanceUID
    assert summary.comments[1:] == ("Trained on synthetic phantoms, not patient data",)


def test_the_real_radiograph_is_not_evaluated_by_the_demo_weights(tmp_path: Path) -> None:
    """RG1 in two encodings: both refused by the gate, with the same signals to 1e-3 (one
    decoding, one pre-processing)."""
    argv = [str(rg1("RG1_UNCR.dcm")), str(rg1("RG1_J2KR.dcm")), "--out", str(tmp_path)]
    assert infer(*argv) == 0
    a = json.loads((tmp_path / "RG1_UNCR.json").read_text())
    b = json.loads((tmp_path / "RG1_J2KR.json").read_text())
    for record in (a, b):
        assert record["predicted"] is None and record["gate"]["accepted"] is False
        assert "image unlike the data the model was trained on" in record["unassessable_reasons"][0]
    assert all(
        abs(a["gate"]["signals"][k] - b["gate"]["signals"][k]) < 1e-3 * max(1.0, abs(v))
        for k, v in a["gate"]["signals"].items()
    )
    assert not list(tmp_path.glob("*.sc.dcm"))
    assert not dciodvfy(tmp_path / "RG1_UNCR.sr.dcm").errors


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


def test_a_child_is_not_evaluated_and_a_missing_age_is_allowed(tmp_path: Path) -> None:
    """The model card's age limit (the bundle's ``minimum_age_years``, 18): a stated age of 12
    is refused before the model runs; the same image without an age is assessed."""
    child, unknown = tmp_path / "child.dcm", tmp_path / "unknown.dcm"
    phantom_cr(child, PatientAge="012Y")
    phantom_cr(unknown, PatientAge=None, PatientBirthDate=None)
    out = tmp_path / "out"
    assert infer(str(child), str(unknown), "--out", str(out), "--no-heatmap") == 0
    refused = json.loads((out / "child.json").read_text())
    assert refused["predicted"] is None and "gate" not in refused
    assert refused["unassessable_reasons"] == [
        "patient age 12.0 years is below the model's minimum of 18 years"
    ]
    assert json.loads((out / "unknown.json").read_text())["predicted"] == "COVID-19"
    summary = read_sr(pydicom.dcmread(out / "child.sr.dcm"))
    assert list(summary.unassessable_reasons) == refused["unassessable_reasons"]
    assert not dciodvfy(out / "child.sr.dcm").errors


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")  # pydicom, the broken file
def test_a_batch_gives_each_file_what_it_gets_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--batch 3``: phantoms and RG1 analysed together, a file that is not DICOM skipped;
    every file gets the class, probabilities and outputs it gets in a batch of one."""
    folder = tmp_path / "in"
    folder.mkdir()
    for index, label in enumerate(("normal", "pneumonia", "COVID-19")):
        phantom_cr(folder / f"{index}-{label}.dcm", label=label, seed=index, size=256)
    shutil.copy(rg1(), folder / "3-rg1.dcm")
    (folder / "4-broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    runs = {}
    for batch in ("1", "3"):
        out = tmp_path / f"out{batch}"
        assert infer(str(folder), "--out", str(out), "--fast", "--batch", batch) == 1
        runs[batch] = {p.name: p for p in out.iterdir()}
        assert "4 of 5 files processed" in capsys.readouterr().out
    assert sorted(runs["1"]) == sorted(runs["3"])
    assert len([n for n in runs["3"] if n.endswith(".sc.dcm")]) == 3  # RG1 is not evaluated
    for name in (n for n in runs["1"] if n.endswith(".json")):
        alone, together = (json.loads(runs[b][name].read_text()) for b in ("1", "3"))
        assert together["predicted"] == alone["predicted"], name
        for label, p in (alone.get("probabilities") or {}).items():
            assert together["probabilities"][label] == pytest.approx(p, abs=1e-5)
    for name in (n for n in runs["3"] if n.endswith(".dcm")):
        assert not dciodvfy(runs["3"][name]).errors, name


def test_a_result_that_cannot_be_written_is_reported_and_the_rest_go_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    for name, seed in (("a", 1), ("b", 2)):
        phantom_cr(folder / f"{name}.dcm", seed=seed, size=256)
    (out / "a.json").mkdir(parents=True)  # a's summary cannot be written there
    assert infer(str(folder), "--out", str(out), "--no-heatmap", "--batch", "2") == 1
    assert json.loads((out / "b.json").read_text())["predicted"] is not None
    captured = capsys.readouterr()
    assert f"failed: {folder / 'a.dcm'}: IsADirectoryError" in captured.err
    assert "1 of 2 files processed" in captured.out
