"""End to end: ``coronet run`` (Redis, Orthanc with Lua auto-routing, node, worker) on loopback.

dcmtk ``storescu`` sends the real chest CR (RG1, pydicom-data) and two phantom studies (CR and
DX) into Orthanc; Orthanc routes them to the node; the worker's SR and heatmap SC must appear in
the same studies in Orthanc (REST API, polled).  RG1 is a real radiograph the demo weights never
saw: its study gets a "Not Evaluated" SR from the gate and no heatmap.  Every SR read back from
Orthanc passes dciodvfy and says what ``coronet infer`` says about the same file.  Ctrl-C
(SIGINT) stops everything.
"""

from __future__ import annotations

import functools
import json
import signal
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

import monai_bundle
from dicom_node.cli import main
from dicom_node.core.settings import settings_from_data
from dicom_node.core.spool import Spool
from dicom_node.stack.plan import effective_data
from tests.support.dicom_data import CR_IMAGE_STORAGE, RG1_UNCR, make_instance
from tests.support.dicom_tools import dciodvfy, storescu
from tests.support.orthanc import OrthancServer
from tests.support.polling import wait_until
from tests.support.ports import free_port
from tests.support.processes import ChildProcess
from tests.support.results import phantom_source
from tests.support.scp import running_scp
from worker.results.sr import read_sr

pytestmark = pytest.mark.integration

BUNDLE = Path(monai_bundle.__file__).resolve().parent
RESULTS_TIMEOUT_S = 240.0
PROBABILITY_TOLERANCE = 1e-5


def _config(tmp_path: Path) -> Path:
    data: dict[str, Any] = {
        "node": {"ae_title": "CORONET", "host": "127.0.0.1", "port": free_port()},
        "callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
        "destinations": [
            {"name": "demo-pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}
        ],
        "storage": {"spool_dir": str(tmp_path / "spool"), "outbox_dir": str(tmp_path / "out")},
        "model": {"bundle_dir": str(BUNDLE), "device": "cpu"},
        "grouping": {"mode": "study", "quiet_seconds": 0.5},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _inputs(folder: Path) -> list[Path]:
    """RG1 (fresh UIDs) and two phantom studies: a normal CR PA and a COVID-19 DX AP."""
    rg1 = folder / "rg1.dcm"
    make_instance(RG1_UNCR, rg1)
    phantom_source(folder / "normal-cr.dcm", label="normal", seed=1)
    covid = folder / "covid-dx.dcm"
    from monai_bundle.scripts.phantoms import make_phantom, write_dicom

    write_dicom(
        make_phantom("COVID-19", size=256, seed=2),
        covid,
        modality="DX",
        photometric="MONOCHROME1",
        view_position="AP",
        study_uid=generate_uid(),
    )
    return [rg1, folder / "normal-cr.dcm", covid]


def _results_in_study(
    pacs: OrthancServer, study_uid: str, expected: frozenset[str]
) -> dict[str, str] | None:
    """Orthanc instance ids of the study's results (``expected``: SR, and OT for the SC), once
    they are all there."""
    studies = pacs.find_studies(study_uid)
    if len(studies) != 1:
        return None
    found = {}
    for series in pacs.study_series(studies[0]):
        modality = series["MainDicomTags"].get("Modality")
        if modality in ("SR", "OT") and series["Instances"]:
            found[modality] = series["Instances"][0]
    return found if set(found) == expected else None


def test_pacs_to_node_to_worker_and_back(tmp_path: Path) -> None:
    if not (BUNDLE / "models" / "model.pt").is_file():
        pytest.fail("the bundle's demo weights (monai_bundle/models/model.pt) are missing")
    config = _config(tmp_path)
    var_dir = tmp_path / "var"
    inputs = _inputs(tmp_path / "in")
    run = ChildProcess.coronet(
        [
            *("run", "--config", str(config), "--var-dir", str(var_dir)),
            *("--heatmap", "fast", "--threads", "1"),
        ],
        cwd=Path.cwd(),
    )
    try:
        run.wait_for(lambda out: "CoroNet is running" in out, "coronet run to be ready", 240)
        state = json.loads((var_dir / "run" / "state.json").read_text())
        orthanc = state["orthanc"]
        assert orthanc["web"].startswith("http://127.0.0.1:")
        pacs = OrthancServer(
            aet=orthanc["aet"],
            dicom_port=orthanc["dicom_port"],
            http_port=orthanc["http_port"],
            workdir=var_dir / "orthanc",
            log_path=var_dir / "log" / "orthanc.log",
        )
        storescu(inputs, port=pacs.dicom_port, called_aet=pacs.aet)
        studies = {path: str(pydicom.dcmread(path).StudyInstanceUID) for path in inputs}
        found: dict[Path, dict[str, str]] = {}
        for path, uid in studies.items():
            expected = frozenset({"SR"} if path.name == "rg1.dcm" else {"SR", "OT"})
            results = wait_until(
                functools.partial(_results_in_study, pacs, uid, expected),
                RESULTS_TIMEOUT_S,
                f"the {' and '.join(sorted(expected))} of {path.name} in Orthanc",
                interval=0.5,
            )
            assert results is not None
            found[path] = results
        _check_results(tmp_path, pacs, inputs, found)
        # The Lua script routed the three radiographs and nothing else: no loop of results.
        spool = Spool(tmp_path / "spool")
        assert sum(len(spool.instances(k)) for k in spool.study_keys()) == len(inputs)
        assert spool.pending_studies() == []
    finally:
        code = run.stop(timeout=120, sig=signal.SIGINT)
    output = run.text()
    assert code == 0, output
    stops = [line.split()[1] for line in output.splitlines() if line.startswith("stopped ")]
    assert stops == ["worker", "node", "orthanc", "redis"], output
    assert not (var_dir / "run" / "state.json").exists()
    assert (var_dir / "redis" / "appendonlydir").is_dir()  # append-only file on


def _check_results(
    tmp_path: Path, pacs: OrthancServer, inputs: list[Path], found: dict[Path, dict[str, str]]
) -> None:
    infer_dir = tmp_path / "infer"
    assert (
        main(
            [
                "infer",
                *(str(p) for p in inputs),
                "--out",
                str(infer_dir),
                "--no-heatmap",
                "--bundle-dir",
                str(BUNDLE),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    for path in inputs:
        source = pydicom.dcmread(path)
        sr_file = tmp_path / f"{path.stem}.sr.dcm"
        sr_file.write_bytes(pacs.download_instance(found[path]["SR"]))
        assert not dciodvfy(sr_file).errors, dciodvfy(sr_file)
        sr = pydicom.dcmread(sr_file)
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        summary = read_sr(sr)
        assert summary.source_sop_instance_uid == source.SOPInstanceUID
        record = json.loads((infer_dir / f"{path.stem}.json").read_text())
        if "OT" not in found[path]:  # refused by the gate, here and by coronet infer
            assert summary.predicted is None and record["predicted"] is None
            assert list(summary.unassessable_reasons) == record["unassessable_reasons"]
            continue
        sc_file = tmp_path / f"{path.stem}.sc.dcm"
        sc_file.write_bytes(pacs.download_instance(found[path]["OT"]))
        assert not dciodvfy(sc_file).errors, dciodvfy(sc_file)
        sc = pydicom.dcmread(sc_file)
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert summary.heatmap_sop_instance_uid == sc.SOPInstanceUID
        expected = record["probabilities"]
        assert set(summary.probabilities) == set(expected)
        for name, value in expected.items():
            assert summary.probabilities[name] == pytest.approx(value, abs=PROBABILITY_TOLERANCE)


# --------------------------------------------------------------------------- supervisor parts


@pytest.mark.parametrize("orthanc", [("PACS", 4343), None])
def test_effective_configuration_points_at_our_services(
    tmp_path: Path, orthanc: tuple[str, int] | None
) -> None:
    settings = settings_from_data(yaml.safe_load(_config(tmp_path).read_text()))
    data = effective_data(settings, "redis://127.0.0.1:7777/0", orthanc)
    effective = settings_from_data(data)
    assert effective.broker.url == "redis://127.0.0.1:7777/0"
    if orthanc is None:
        assert effective.destinations == settings.destinations
        assert effective.callers == settings.callers
        return
    (destination,) = effective.destinations
    assert (destination.ae_title, destination.host, destination.port) == (
        orthanc[0],
        "127.0.0.1",
        orthanc[1],
    )
    caller = effective.caller(orthanc[0])
    assert caller is not None and caller.host == "127.0.0.1"
    assert effective.node == settings.node and effective.storage == settings.storage


def test_demo_send_without_a_running_system_explains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "send", "--var-dir", str(tmp_path)]) == 2
    assert "no running `coronet run`" in capsys.readouterr().err


def test_demo_send_stores_a_phantom_and_rg1_as_new_studies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rg1 = pydicom.dcmread(RG1_UNCR, stop_before_pixels=True)
    with running_scp(contexts=[CR_IMAGE_STORAGE]) as pacs:
        argv = ["demo", "send", "--var-dir", str(tmp_path)]
        assert main([*argv, "--port", str(pacs.port), "--aet", pacs.ae_title]) == 0
    out = capsys.readouterr().out
    assert out.count("0x0000") == 2
    assert "demo-phantom.dcm (a synthetic phantom like the demo weights' training data" in out
    assert "RG1_UNCR.dcm (a real radiograph the demo weights never saw" in out
    received = pacs.stored()
    assert [r.sop_class_uid for r in received] == [CR_IMAGE_STORAGE] * 2
    assert rg1.SOPInstanceUID not in {r.sop_instance_uid for r in received}
