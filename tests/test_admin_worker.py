"""The admin API with the whole chain running: a node process, a worker process (the real model,
no heatmap), Redis and dcmtk ``storescp`` destinations.  A destination added through the API
receives the next study with the worker never restarted; a dead letter is sent again from the
API; the workers' metrics and heartbeat reach the node's ``/metrics`` and ``/healthz``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

import monai_bundle
from dicom_node.core.spool import key_for
from tests.support.admin import Admin
from tests.support.node import node_process, run_storescu
from tests.support.polling import wait_until
from tests.support.processes import ChildProcess
from tests.support.redis_server import RedisServer
from tests.support.results import phantom_source
from tests.support.settings import node_data, write_config
from tests.support.storescp import StoreSCP, running_storescp

pytestmark = pytest.mark.integration

BUNDLE = Path(monai_bundle.__file__).resolve().parent
#: The real model, no heatmap; a destination that is down is dead-lettered at the first try.
WORKER = ("--concurrency", "1", "--threads", "1", "--heatmap", "off", "--max-retries", "0")


@dataclass
class Stack:
    folder: Path
    data: dict[str, Any]
    admin: Admin
    node: ChildProcess
    worker: ChildProcess
    pacs: StoreSCP

    @property
    def port(self) -> int:
        return int(self.data["node"]["port"])


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("stack")
    client = redis_server.client()
    client.flushall()
    client.close()
    pacs = StoreSCP(folder / "pacs-a", ae_title="PACSA").start()
    data = node_data(
        folder,
        redis_server.url,
        destinations=[pacs.destination("pacs-a")],
        model={"bundle_dir": str(BUNDLE), "device": "cpu"},
        admin={"worker_timeout": 120},
    )
    config = write_config(folder / "node.yaml", data)
    admin = Admin.of(data)
    worker = ChildProcess.coronet(["worker", "--config", str(config), *WORKER], cwd=folder)
    try:
        with node_process(config, folder) as node:
            worker.wait_for(lambda out: "loaded on" in out, "the worker to load the model", 180)
            yield Stack(folder, data, admin, node, worker, pacs)
    finally:
        worker.stop()
        pacs.stop()


def _send_study(stack: Stack, accession: str) -> str:
    """A phantom chest CR with this Accession Number, stored by storescu; its Study UID."""
    path = stack.folder / "in" / f"{accession}.dcm"
    ds = phantom_source(path, study_uid=generate_uid())
    ds.AccessionNumber = accession
    ds.StudyDate = "20261201"
    ds.PatientName = "Doe^Jane"
    ds.save_as(path, enforce_file_format=True)
    result = run_storescu([path], stack.port)
    assert result.returncode == 0, result.stderr
    return str(ds.StudyInstanceUID)


def _sr_of(pacs: StoreSCP, study_uid: str) -> list[pydicom.Dataset]:
    return [
        ds
        for _, ds in pacs.received()
        if ds.SOPClassUID == Comprehensive3DSRStorage and ds.StudyInstanceUID == study_uid
    ]


def _study(stack: Stack, study_uid: str) -> dict[str, Any]:
    response = stack.admin.get(f"/api/v1/studies/{key_for(study_uid)}")
    assert response.status_code == 200, response.text
    study: dict[str, Any] = response.json()
    return study


def test_a_destination_added_by_the_api_receives_the_next_study_without_a_worker_restart(
    stack: Stack, tmp_path: Path
) -> None:
    worker_pid = stack.worker.pid
    first = _send_study(stack, "ACC-FIRST")
    wait_until(lambda: _sr_of(stack.pacs, first), 120, "the first study's SR at pacs-a")
    with running_storescp(tmp_path / "pacs-b", ae_title="PACSB") as pacs_b:
        added = stack.admin.post("/api/v1/destinations", pacs_b.destination("pacs-b"))
        assert added.status_code == 201, added.text
        assert added.json()["ae_title"] == "PACSB"
        second = _send_study(stack, "ACC-SECOND")
        wait_until(lambda: _sr_of(pacs_b, second), 120, "the next study's SR at pacs-b")
        assert not _sr_of(pacs_b, first)  # the earlier study was done before pacs-b existed
        assert stack.admin.delete("/api/v1/destinations/pacs-b").status_code == 204
    wait_until(lambda: _sr_of(stack.pacs, second), 60, "the next study's SR at pacs-a")
    assert stack.worker.alive() and stack.worker.pid == worker_pid
    assert "destinations re-read" in stack.worker.text()
    wait_until(lambda: _study(stack, second)["state"] == "delivered", 30, "the study delivered")
    study = _study(stack, second)
    assert study["accession_number"] == "ACC-SECOND"
    assert study["study_date"] == "20261201" and study["modality"] == "CR"
    assert "patient_name" not in study and "Doe" not in str(study)
    metrics = stack.admin.metrics()
    assert metrics["coronet_analysis_seconds_count"] >= 2
    assert metrics['coronet_deliveries_total{destination="pacs-b",outcome="delivered"}'] >= 1
    assert metrics['coronet_instances_analysed_total{outcome="prediction"}'] >= 2
    assert metrics["coronet_workers_seen"] >= 1
    with stack.admin.client(auth=False) as client:
        health = client.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["checks"]["worker"]["ok"]


def test_a_dead_letter_is_retried_from_the_api_and_delivered(stack: Stack, tmp_path: Path) -> None:
    pacs_c = StoreSCP(tmp_path / "pacs-c", ae_title="PACSC")  # not started: down
    assert stack.admin.post("/api/v1/destinations", pacs_c.destination("pacs-c")).status_code == 201
    try:
        study_uid = _send_study(stack, "ACC-DEAD")
        wait_until(
            lambda: _study(stack, study_uid)["state"] == "dead-lettered", 120, "a dead letter"
        )
        study = _study(stack, study_uid)
        (letter,) = study["dead_letters"]
        assert letter["where"] == "pacs-c" and "last retry" in letter["reason"]
        states = {d["name"]: d for d in study["destinations"]}
        assert states["pacs-a"]["delivered"] == 1 and states["pacs-c"]["dead"] == 1
        dead = stack.admin.metrics()['coronet_dead_letters{kind="delivery"}']
        assert dead >= 1
        pacs_c.start()
        retried = stack.admin.post(f"/api/v1/studies/{key_for(study_uid)}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["retried"]
        wait_until(lambda: _sr_of(pacs_c, study_uid), 120, "the retried SR at pacs-c")
        wait_until(
            lambda: _study(stack, study_uid)["state"] == "delivered", 30, "the study delivered"
        )
        assert len(_sr_of(stack.pacs, study_uid)) == 1  # pacs-a was not sent it twice
    finally:
        pacs_c.stop()
        stack.admin.delete("/api/v1/destinations/pacs-c")
