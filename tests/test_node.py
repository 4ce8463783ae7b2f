"""The DICOM node against real peers on loopback: dcmtk, Orthanc, pynetdicom, Redis, Celery."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from pydicom.filewriter import write_file_meta_info
from pynetdicom import _config
from pynetdicom.dsutils import split_dataset

from dicom_node.cli import main as cli_main
from dicom_node.core import statuses
from dicom_node.core.settings import Settings
from dicom_node.core.spool import Spool, key_for
from dicom_node.scp.node import DicomNode
from dicom_node.scp.queueing import TASK_NAME, CeleryQueue, StudyQueue
from tests.support.certificates import Certificate
from tests.support.dicom_data import (
    CR_IMAGE_STORAGE,
    CT_IMAGE_STORAGE,
    CT_SMALL,
    DX_PRESENTATION_STORAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    RG1_J2KR,
    RG1_UNCR,
    VERIFICATION,
    make_instance,
    same_content,
)
from tests.support.dicom_tools import dciodvfy, storescu
from tests.support.node import (
    QueuedTask,
    associate,
    node_process,
    queued_tasks,
    run_storescu,
    running_node,
    scu,
)
from tests.support.orthanc import Modality, running_orthanc
from tests.support.polling import wait_until
from tests.support.ports import free_port
from tests.support.processes import ChildProcess
from tests.support.redis_server import RedisServer
from tests.support.settings import NODE_AET, node_data, node_settings, write_config

pytestmark = pytest.mark.integration

DEFLATED_LE = "1.2.840.10008.1.2.1.99"


def _spooled(settings: Settings, ds: pydicom.Dataset) -> Path:
    return (
        settings.storage.spool_dir
        / key_for(str(ds.StudyInstanceUID))
        / f"{key_for(str(ds.SOPInstanceUID))}.dcm"
    )


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _tasks_for(redis: RedisServer, study_uid: str) -> list[QueuedTask]:
    return [t for t in queued_tasks(redis) if t.args[0] == key_for(study_uid)]


# --------------------------------------------------------------------------- verification


@pytest.mark.parametrize(
    ("calling", "ok", "message"),
    [
        ("ECHOSCU", True, "Received Echo Response (Success)"),
        ("STRANGER", False, "Calling AE Title Not Recognized"),
    ],
)
def test_dcmtk_echoscu_gets_a_verification_answer(
    tmp_path: Path, redis: RedisServer, calling: str, ok: bool, message: str
) -> None:
    settings = node_settings(tmp_path, redis.url)
    with running_node(settings):
        port = str(settings.node.port)
        result = subprocess.run(
            ["echoscu", "-v", "-aet", calling, "-aec", NODE_AET, "127.0.0.1", port],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert (result.returncode == 0) is ok
    assert message.lower() in (result.stdout + result.stderr).lower()


@pytest.mark.parametrize(
    ("destination", "exit_code", "output"),
    [("self", 0, "0x0000 (Success)"), ("closed-port", 1, "no association"), ("nowhere", 2, "")],
)
def test_node_echo_command(
    tmp_path: Path,
    redis: RedisServer,
    capsys: pytest.CaptureFixture[str],
    destination: str,
    exit_code: int,
    output: str,
) -> None:
    data = node_data(tmp_path, redis.url)
    port = data["node"]["port"]
    data["callers"].append({"ae_title": NODE_AET, "host": "127.0.0.1"})
    data["destinations"] = [
        {"name": "self", "ae_title": NODE_AET, "host": "127.0.0.1", "port": port},
        {"name": "closed-port", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
    ]
    config = write_config(tmp_path / "node.yaml", data)
    with running_node(node_settings(tmp_path, redis.url, **data)):
        code = cli_main(["node", "echo", destination, "--config", str(config), "--timeout", "5"])
    assert code == exit_code
    assert output in capsys.readouterr().out


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize("mode", ["study", "instance"])
def test_dcmtk_storescu_stores_and_queues(tmp_path: Path, redis: RedisServer, mode: str) -> None:
    settings = node_settings(tmp_path, redis.url, grouping={"mode": mode, "quiet_seconds": 0.2})
    sources = [RG1_UNCR, RG1_J2KR]
    with running_node(settings) as node:
        # -xv: also propose JPEG 2000 lossless, so that RG1_J2KR goes as it is.
        sent = run_storescu(sources, settings.node.port, "-xv")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        study_uid = str(_header(RG1_UNCR).StudyInstanceUID)
        expected = 1 if mode == "study" else 2

        def enough() -> list[QueuedTask]:
            tasks = _tasks_for(redis, study_uid)
            return tasks if len(tasks) >= expected else []

        tasks = wait_until(enough, what=f"{expected} tasks")
        assert node.queue.wait_idle(5)
    study_key = key_for(study_uid)
    instance_keys = sorted(key_for(str(_header(p).SOPInstanceUID)) for p in sources)
    assert all(t.name == TASK_NAME for t in tasks)
    if mode == "study":
        assert [t.args for t in tasks] == [[study_key]]
    else:
        assert sorted(t.args[1][0] for t in tasks) == instance_keys
        assert all(t.args[0] == study_key and len(t.args[1]) == 1 for t in tasks)
    assert queued_tasks(redis) == tasks  # nothing else was published
    spool = Spool(settings.storage.spool_dir)
    assert spool.pending_instances(study_key) == instance_keys
    for source in sources:
        spooled = _spooled(settings, _header(source))
        assert same_content(spooled, source)
        # The node stores what it received: no new dciodvfy finding (RG1 has 2 of its own).
        assert dciodvfy(spooled).errors == dciodvfy(source).errors


def test_real_celery_worker_consumes_the_task(tmp_path: Path, redis: RedisServer) -> None:
    """A real Celery worker gets the opaque keys and finds the instances in the spool."""
    settings = node_settings(tmp_path, redis.url)
    ds = make_instance(RG1_UNCR, tmp_path / "in" / "a.dcm")
    seen: list[tuple[str, list[str] | None, list[str]]] = []
    spool = Spool(settings.storage.spool_dir)
    app = Celery("test-worker", broker=redis.url, set_as_current=False)
    app.conf.task_default_queue = settings.broker.queue

    @app.task(name=TASK_NAME, shared=False)
    def process_study(study_key: str, instance_keys: list[str] | None = None) -> None:
        pending = spool.pending_instances(study_key)
        seen.append((study_key, instance_keys, pending))
        spool.mark_done(study_key, pending)

    with (
        running_node(settings),
        start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10),
    ):
        assoc = associate(settings.node.port)
        assert assoc.send_c_store(tmp_path / "in" / "a.dcm").Status == statuses.SUCCESS
        assoc.release()
        wait_until(lambda: seen, what="the worker to run the task")
    study_key = key_for(str(ds.StudyInstanceUID))
    assert seen == [(study_key, None, [key_for(str(ds.SOPInstanceUID))])]
    assert spool.pending_studies() == []


def test_orthanc_sends_through_its_modality_entry(tmp_path: Path, redis: RedisServer) -> None:
    settings = node_settings(tmp_path, redis.url)
    source = tmp_path / "in" / "orthanc.dcm"
    ds = make_instance(RG1_UNCR, source)
    modalities = {"coronet": Modality(NODE_AET, settings.node.port)}
    with (
        running_node(settings),
        running_orthanc(tmp_path / "orthanc", aet="ORTHANC", modalities=modalities) as pacs,
    ):
        storescu([source], port=pacs.dicom_port, called_aet=pacs.aet)
        (instance_id,) = pacs.instances()
        pacs.post_json(
            "/modalities/coronet/store", {"Resources": [instance_id], "Synchronous": True}
        )
        tasks = wait_until(lambda: _tasks_for(redis, str(ds.StudyInstanceUID)), what="a task")
    assert [t.args for t in tasks] == [[key_for(str(ds.StudyInstanceUID))]]
    spooled = _spooled(settings, ds)
    assert same_content(spooled, source)
    assert dciodvfy(spooled).errors == ()


@pytest.mark.parametrize(
    "changes",
    [
        {"BodyPartExamined": "KNEE", "Laterality": "L"},  # a paired part needs Laterality
        {"ViewPosition": "LL"},
        {"ViewPosition": "RL", "BodyPartExamined": "CHEST"},
    ],
)
def test_other_body_parts_and_laterals_are_stored_not_queued(
    tmp_path: Path, redis: RedisServer, changes: dict[str, Any]
) -> None:
    settings = node_settings(tmp_path, redis.url)
    skipped = make_instance(RG1_UNCR, tmp_path / "in" / "skipped.dcm", **changes)
    barrier = make_instance(RG1_UNCR, tmp_path / "in" / "barrier.dcm")
    with running_node(settings):
        assoc = associate(settings.node.port)
        for name in ("skipped.dcm", "barrier.dcm"):
            assert assoc.send_c_store(tmp_path / "in" / name).Status == statuses.SUCCESS
        assoc.release()
        # The PA chest sent after it is queued; by then the skipped one would have been too.
        wait_until(lambda: _tasks_for(redis, str(barrier.StudyInstanceUID)), what="barrier task")
    assert _tasks_for(redis, str(skipped.StudyInstanceUID)) == []
    assert len(queued_tasks(redis)) == 1
    spooled = _spooled(settings, skipped)
    assert same_content(spooled, tmp_path / "in" / "skipped.dcm")
    assert dciodvfy(spooled).errors == ()
    (record,) = Spool(settings.storage.spool_dir).instances(spooled.parent.name)
    assert not record.selected
    assert record.reason


@pytest.mark.parametrize(("extra", "accepted"), [([], False), ([CT_IMAGE_STORAGE], True)])
def test_ct_is_refused_unless_configured(
    tmp_path: Path, redis: RedisServer, extra: list[str], accepted: bool
) -> None:
    settings = node_settings(tmp_path, redis.url, node={"extra_sop_classes": extra})
    ae = scu(
        contexts=[(CT_IMAGE_STORAGE, [EXPLICIT_LE, IMPLICIT_LE]), (VERIFICATION, [IMPLICIT_LE])]
    )
    ct = pydicom.dcmread(CT_SMALL)
    with running_node(settings):
        assoc = associate(settings.node.port, ae)
        assert assoc.is_established
        if accepted:
            assert assoc.send_c_store(ct).Status == statuses.SUCCESS
        else:
            (rejected,) = assoc.rejected_contexts
            assert rejected.abstract_syntax == CT_IMAGE_STORAGE
            assert rejected.result == 0x03  # abstract syntax not supported (PS3.8 9.3.3.2)
            with pytest.raises(ValueError, match="presentation context"):
                assoc.send_c_store(ct)
        assoc.release()
    assert _spooled(settings, ct).exists() is accepted
    assert queued_tasks(redis) == []  # a CT is never queued for the model


@pytest.mark.parametrize(("accept_deflate", "accepted"), [(False, False), (True, True)])
def test_deflate_only_when_configured(
    tmp_path: Path, redis: RedisServer, accept_deflate: bool, accepted: bool
) -> None:
    settings = node_settings(tmp_path, redis.url, node={"accept_deflate": accept_deflate})
    ae = scu(contexts=[(CR_IMAGE_STORAGE, [DEFLATED_LE]), (VERIFICATION, [IMPLICIT_LE])])
    source = tmp_path / "in" / "deflate.dcm"
    ds = make_instance(RG1_UNCR, source)
    with running_node(settings):
        assoc = associate(settings.node.port, ae)
        storage = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CR_IMAGE_STORAGE]
        assert [cx.transfer_syntax[0] for cx in storage] == ([DEFLATED_LE] if accepted else [])
        if accepted:
            assert assoc.send_c_store(ds).Status == statuses.SUCCESS
        assoc.release()
    if accepted:
        spooled = _spooled(settings, ds)
        assert pydicom.dcmread(spooled).file_meta.TransferSyntaxUID == DEFLATED_LE
        assert same_content(spooled, source)


def test_duplicate_instance_is_success_without_second_task(
    tmp_path: Path, redis: RedisServer
) -> None:
    settings = node_settings(tmp_path, redis.url)
    original = make_instance(RG1_UNCR, tmp_path / "in" / "a.dcm")
    barrier = make_instance(RG1_UNCR, tmp_path / "in" / "barrier.dcm")
    with running_node(settings):
        assoc = associate(settings.node.port)
        assert assoc.send_c_store(tmp_path / "in" / "a.dcm").Status == statuses.SUCCESS
        assoc.release()
        wait_until(lambda: _tasks_for(redis, str(original.StudyInstanceUID)), what="first task")
        assoc = associate(settings.node.port)
        for name in ("a.dcm", "barrier.dcm"):
            assert assoc.send_c_store(tmp_path / "in" / name).Status == statuses.SUCCESS
        assoc.release()
        wait_until(lambda: _tasks_for(redis, str(barrier.StudyInstanceUID)), what="barrier task")
    assert len(_tasks_for(redis, str(original.StudyInstanceUID))) == 1
    assert len(queued_tasks(redis)) == 2
    assert same_content(_spooled(settings, original), tmp_path / "in" / "a.dcm")


# --------------------------------------------------------------------------- failure statuses


@pytest.mark.parametrize("blocker", ["spool-replaced-by-file", "study-folder-is-a-file"])
def test_unwritable_spool_answers_out_of_resources(
    tmp_path: Path, redis: RedisServer, blocker: str
) -> None:
    # Tests run as root, for whom chmod blocks nothing: put a regular file where the node must
    # create a folder, which fails for every user (ENOTDIR / EEXIST).
    settings = node_settings(tmp_path, redis.url)
    spool_dir = settings.storage.spool_dir
    ds = make_instance(RG1_UNCR, tmp_path / "in" / "a.dcm")
    with running_node(settings):
        if blocker == "spool-replaced-by-file":
            shutil.rmtree(spool_dir, ignore_errors=True)
            spool_dir.write_bytes(b"")
        else:
            spool_dir.mkdir(parents=True, exist_ok=True)
            (spool_dir / key_for(str(ds.StudyInstanceUID))).write_bytes(b"")
        assoc = associate(settings.node.port)
        assert assoc.send_c_store(tmp_path / "in" / "a.dcm").Status == statuses.OUT_OF_RESOURCES
        # Once the folder can be written again the same instance is stored.
        if blocker == "spool-replaced-by-file":
            spool_dir.unlink()
        else:
            (spool_dir / key_for(str(ds.StudyInstanceUID))).unlink()
        assert assoc.send_c_store(tmp_path / "in" / "a.dcm").Status == statuses.SUCCESS
        assoc.release()
        wait_until(lambda: _tasks_for(redis, str(ds.StudyInstanceUID)), what="a task")
    assert len(queued_tasks(redis)) == 1


def _write_part10(path: Path, meta: pydicom.Dataset, body: bytes) -> Path:
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, meta, enforce_standard=True)  # type: ignore[arg-type]
        handle.write(body)
    return path


def _rg1_parts(tmp_path: Path) -> tuple[pydicom.Dataset, bytes]:
    source = tmp_path / "in" / "rg1.dcm"
    make_instance(RG1_UNCR, source)
    meta, offset = split_dataset(source)
    return meta, source.read_bytes()[offset:]


@pytest.mark.parametrize("mismatch", ["sop-instance", "sop-class"])
def test_mismatched_uids_answer_a900(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch, mismatch: str
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file as is
    settings = node_settings(tmp_path, redis.url)
    meta, body = _rg1_parts(tmp_path)
    if mismatch == "sop-instance":
        meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    else:
        meta.MediaStorageSOPClassUID = DX_PRESENTATION_STORAGE
    path = _write_part10(tmp_path / "mismatch.dcm", meta, body)
    ae = scu(contexts=[(CR_IMAGE_STORAGE, [EXPLICIT_LE]), (DX_PRESENTATION_STORAGE, [EXPLICIT_LE])])
    with running_node(settings):
        assoc = associate(settings.node.port, ae)
        status = assoc.send_c_store(path).Status
        assoc.release()
    assert status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert Spool(settings.storage.spool_dir).study_keys() == []


def _truncated_element() -> bytes:
    # (0008,0016) UI declaring 200 bytes of which only 8 follow.
    return b"\x08\x00\x16\x00UI\xc8\x001.2.840\0"


def _unterminated_sequence() -> bytes:
    # (0008,1140) SQ of undefined length whose item is garbage.
    return b"\x08\x00\x40\x11SQ\0\0\xff\xff\xff\xff" + b"\0" * 40


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize(
    "body",
    [b"\xff" * 512, _truncated_element(), _unterminated_sequence()],
    ids=["garbage", "truncated-element", "unterminated-sequence"],
)
def test_undecodable_data_answers_c210(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    settings = node_settings(tmp_path, redis.url)
    meta, _ = _rg1_parts(tmp_path)
    path = _write_part10(tmp_path / "broken.dcm", meta, body)
    with running_node(settings):
        assoc = associate(settings.node.port)
        status = assoc.send_c_store(path).Status
        # The association survives: a good instance is still stored.
        assert assoc.send_c_store(tmp_path / "in" / "rg1.dcm").Status == statuses.SUCCESS
        assoc.release()
    assert status == statuses.DATA_UNDECODABLE
    assert len(Spool(settings.storage.spool_dir).study_keys()) == 1


# --------------------------------------------------------------------------- association control


@pytest.mark.parametrize(
    ("calling", "called", "callers", "reason"),
    [
        ("SCU", NODE_AET, [{"ae_title": "SCU"}], None),
        ("SCU", NODE_AET, [{"ae_title": "SCU", "host": "localhost"}], None),
        ("STRANGER", NODE_AET, [{"ae_title": "SCU"}], statuses.REASON_CALLING_AE_NOT_RECOGNISED),
        ("SCU", "SOMEONE_ELSE", [{"ae_title": "SCU"}], statuses.REASON_CALLED_AE_NOT_RECOGNISED),
        (
            "SCU",
            NODE_AET,
            [{"ae_title": "SCU", "host": "192.0.2.7"}],
            statuses.REASON_CALLING_AE_NOT_RECOGNISED,
        ),
        ("SCU", NODE_AET, [], statuses.REASON_CALLING_AE_NOT_RECOGNISED),
    ],
    ids=["allowed", "allowed-host-name", "unknown-caller", "wrong-called", "wrong-host", "none"],
)
def test_unknown_callers_and_wrong_called_titles_are_rejected(
    tmp_path: Path,
    redis: RedisServer,
    calling: str,
    called: str,
    callers: list[dict[str, str]],
    reason: int | None,
) -> None:
    settings = node_settings(tmp_path, redis.url, callers=callers)
    with running_node(settings):
        assoc = associate(settings.node.port, scu(calling), called=called)
        if reason is None:
            assert assoc.is_established
            assert assoc.send_c_echo().Status == statuses.SUCCESS
            assoc.release()
            return
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (
            statuses.REJECTED_PERMANENT,
            statuses.SOURCE_SERVICE_USER,
            reason,
        )


@pytest.mark.parametrize(
    ("calling", "called", "message"),
    [
        ("STRANGER", NODE_AET, "Calling AE Title Not Recognized"),
        ("STORESCU", "WRONG", "Called AE Title Not Recognized"),
    ],
)
def test_storescu_sees_the_rejection(
    tmp_path: Path, redis: RedisServer, calling: str, called: str, message: str
) -> None:
    settings = node_settings(tmp_path, redis.url)
    with running_node(settings):
        result = run_storescu([RG1_UNCR], settings.node.port, calling=calling, called=called)
    assert result.returncode != 0
    assert message.lower() in (result.stdout + result.stderr).lower()
    assert Spool(settings.storage.spool_dir).study_keys() == []


def test_max_associations_and_acse_timeout_come_from_the_config(
    tmp_path: Path, redis: RedisServer
) -> None:
    node = {"max_associations": 1, "timeouts": {"acse": 0.5, "dimse": 5, "network": 5}}
    settings = node_settings(tmp_path, redis.url, node=node)
    with running_node(settings):
        first = associate(settings.node.port)
        assert first.is_established
        second = associate(settings.node.port)
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert rj is not None
        # Rejected transient, service provider (presentation), local limit exceeded (PS3.8 9.3.4)
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        first.release()
        # A peer that connects but never sends an A-ASSOCIATE-RQ is dropped after acse seconds.
        with socket.create_connection(("127.0.0.1", settings.node.port), timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(1) == b""
            assert time.monotonic() - started < 5


class _BrokenSpool(Spool):
    def store(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the spool")


def test_handler_exception_becomes_a_failure_status(tmp_path: Path, redis: RedisServer) -> None:
    settings = node_settings(tmp_path, redis.url)
    spool = _BrokenSpool(settings.storage.spool_dir)
    queue = StudyQueue(spool, CeleryQueue.from_settings(settings.broker), settings.grouping)
    node = DicomNode(settings, spool, queue)
    node.start()
    try:
        assoc = associate(settings.node.port)
        assert assoc.send_c_store(pydicom.dcmread(RG1_UNCR)).Status == statuses.PROCESSING_FAILURE
        assert assoc.is_established  # the association survives the bug
        assert assoc.send_c_echo().Status == statuses.SUCCESS
        assoc.release()
    finally:
        node.stop()


def test_logs_carry_no_phi_and_summarise_each_association(
    tmp_path: Path, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = node_settings(tmp_path, redis.url)
    phi: dict[str, Any] = {"PatientName": "DOE^JANE", "PatientID": "PID-424242"}
    chest = make_instance(RG1_UNCR, tmp_path / "in" / "a.dcm", **phi)
    lateral = make_instance(RG1_UNCR, tmp_path / "in" / "b.dcm", ViewPosition="LL", **phi)
    caplog.set_level(logging.INFO)
    with running_node(settings):
        assoc = associate(settings.node.port)
        for name in ("a.dcm", "b.dcm", "a.dcm"):
            assert assoc.send_c_store(tmp_path / "in" / name).Status == statuses.SUCCESS
        assoc.release()
        wait_until(lambda: queued_tasks(redis), what="a task")
        stranger = associate(settings.node.port, scu("STRANGER"))
        assert stranger.is_rejected
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    for ds in (chest, lateral):
        for secret in (
            "DOE",
            "PID-424242",
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID),
        ):
            assert secret not in text
    assert "association from SCU (127.0.0.1) released: 2 stored (1 not selected), 1 duplicates" in (
        text
    )
    assert "14.4 MB" in text
    assert "STRANGER" in text  # the rejection is logged with the calling AE title


def test_reload_to_a_new_port_keeps_open_associations(tmp_path: Path, redis: RedisServer) -> None:
    settings = node_settings(tmp_path, redis.url)
    old_port, new_port = settings.node.port, free_port()
    with running_node(settings) as node:
        open_assoc = associate(old_port)
        assert open_assoc.is_established
        node.reload(node_settings(tmp_path, redis.url, node={"port": new_port}))
        assert node.address[1] == new_port
        moved = associate(new_port)
        assert moved.is_established
        moved.release()
        assert not associate(old_port).is_established
        assert open_assoc.send_c_echo().Status == statuses.SUCCESS
        open_assoc.release()


def test_broker_outage_does_not_affect_storage(tmp_path: Path) -> None:
    """C-STOREs succeed with the broker down; the study is queued once it is back."""
    port = free_port()
    broker = RedisServer(tmp_path / "redis", port=port)
    settings = node_settings(tmp_path, broker.url)
    ds = make_instance(RG1_UNCR, tmp_path / "in" / "a.dcm")
    with running_node(settings) as node:
        assoc = associate(settings.node.port)
        started = time.monotonic()
        assert assoc.send_c_store(tmp_path / "in" / "a.dcm").Status == statuses.SUCCESS
        assert time.monotonic() - started < 5
        assoc.release()
        wait_until(lambda: not node.queue.broker_available, what="a failed publish")
        assert _spooled(settings, ds).exists()
        with broker:
            tasks = wait_until(lambda: queued_tasks(broker), what="the task after the outage")
            assert [t.args for t in tasks] == [[key_for(str(ds.StudyInstanceUID))]]
            wait_until(lambda: node.queue.broker_available, what="the broker to be seen")


# --------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("require_client_cert", [False, True])
def test_tls_listener_requires_a_client_certificate_when_configured(
    tmp_path: Path,
    redis: RedisServer,
    certificate: Certificate,
    require_client_cert: bool,
) -> None:
    cert, key = certificate.cert, certificate.key
    tls = {"cert_file": str(cert), "key_file": str(key), "ca_file": str(cert)}
    tls["require_client_cert"] = require_client_cert  # type: ignore[assignment]
    settings = node_settings(tmp_path, redis.url, node={"tls": tls})

    def client(with_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if with_cert:
            context.load_cert_chain(cert, key)
        return context

    cases = [
        ("plain TCP", None, False),
        ("TLS without client certificate", (client(False), "localhost"), not require_client_cert),
        ("TLS with client certificate", (client(True), "localhost"), True),
    ]
    with running_node(settings):
        for what, tls_args, expected in cases:
            assoc = associate(settings.node.port, tls_args=tls_args)
            established = assoc.is_established and assoc.send_c_echo().Status == 0
            if assoc.is_established:
                assoc.release()
            assert bool(established) is expected, what


# --------------------------------------------------------------------------- the serve command


def _storescu_acknowledged(process: ChildProcess, on_ack: Any) -> list[Path]:
    """Follow ``storescu -v`` output; return the files it saw acknowledged with Success."""
    acknowledged: list[Path] = []
    current: Path | None = None
    for line in process.follow():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            on_ack(len(acknowledged))
    return acknowledged


def test_kill_9_during_a_send_loses_nothing_acknowledged(
    tmp_path: Path, redis: RedisServer
) -> None:
    data = node_data(tmp_path, redis.url, grouping={"mode": "study", "quiet_seconds": 30})
    config = write_config(tmp_path / "node.yaml", data)
    study_uid = pydicom.uid.generate_uid()
    files = [tmp_path / "in" / f"{n:02d}.dcm" for n in range(20)]
    for path in files:
        make_instance(RG1_UNCR, path, study_uid=study_uid)
    port = str(data["node"]["port"])
    with node_process(config, tmp_path) as node:
        killed = threading.Event()

        def kill_after_three(count: int) -> None:
            if count == 3 and not killed.is_set():
                node.kill_group()
                killed.set()

        with ChildProcess(
            ["storescu", "-v", "-aet", "STORESCU", "-aec", NODE_AET, "127.0.0.1", port]
            + [str(p) for p in files]
        ) as sender:
            acknowledged = _storescu_acknowledged(sender, kill_after_three)
            sender.wait(timeout=60)
        assert killed.is_set(), "storescu finished before the node was killed"
    assert 3 <= len(acknowledged) < len(files)
    assert queued_tasks(redis) == []  # quiet period of 30 s: nothing was queued before the kill
    # Restart: recovery queues the study at once.
    with node_process(config, tmp_path):
        tasks = wait_until(lambda: queued_tasks(redis), what="recovery to queue the study")
    settings = node_settings(tmp_path, redis.url, **data)
    spool = Spool(settings.storage.spool_dir)
    study_key = key_for(study_uid)
    assert [t.args for t in tasks] == [[study_key]]
    pending = set(spool.pending_instances(study_key))
    for path in acknowledged:
        ds = _header(path)
        spooled = _spooled(settings, ds)
        assert same_content(spooled, path)
        assert key_for(str(ds.SOPInstanceUID)) in pending
    assert not list((settings.storage.spool_dir / study_key).glob(".*.tmp"))


def test_live_reload_adds_a_caller_without_dropping_associations(
    tmp_path: Path, redis: RedisServer
) -> None:
    data = node_data(tmp_path, redis.url, callers=[{"ae_title": "SCU", "host": "127.0.0.1"}])
    config = write_config(tmp_path / "node.yaml", data)
    port = int(data["node"]["port"])
    source = tmp_path / "in" / "a.dcm"
    make_instance(RG1_UNCR, source)

    def rejected_reason(title: str) -> int | None:
        assoc = associate(port, scu(title))
        if assoc.is_established:
            assoc.release()
            return None
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None and rj.diagnostic is not None
        return int(rj.diagnostic)

    with node_process(config, tmp_path) as node:
        open_assoc = associate(port, scu("SCU"))
        assert open_assoc.is_established
        assert rejected_reason("NEWCALLER") == statuses.REASON_CALLING_AE_NOT_RECOGNISED

        add = ["aet", "add", "caller", "NEWCALLER", "--host", "127.0.0.1", "--config", str(config)]
        assert cli_main(add) == 0
        assert cli_main(["node", "reload", "--config", str(config)]) == 0
        node.wait_for_line("configuration reloaded")
        assert rejected_reason("NEWCALLER") is None
        # The association opened before the reload is still up and working.
        assert open_assoc.is_established
        assert open_assoc.send_c_echo().Status == statuses.SUCCESS
        assert open_assoc.send_c_store(source).Status == statuses.SUCCESS

        assert cli_main(["aet", "remove", "caller", "NEWCALLER", "--config", str(config)]) == 0
        node.process.send_signal(1)  # SIGHUP, as an init system would
        node.wait_for_line("configuration reloaded")
        assert rejected_reason("NEWCALLER") == statuses.REASON_CALLING_AE_NOT_RECOGNISED
        assert open_assoc.send_c_echo().Status == statuses.SUCCESS
        open_assoc.release()
    assert node.process.returncode == 0  # SIGTERM is a clean stop


def test_reload_without_a_running_node_fails(tmp_path: Path, redis: RedisServer) -> None:
    config = write_config(tmp_path / "node.yaml", node_data(tmp_path, redis.url))
    assert cli_main(["node", "reload", "--config", str(config)]) == 1


def test_in_process_reload_applies_to_new_associations(tmp_path: Path, redis: RedisServer) -> None:
    settings = node_settings(tmp_path, redis.url)
    ct = pydicom.dcmread(CT_SMALL)
    ct_scu = scu(contexts=[(CT_IMAGE_STORAGE, [EXPLICIT_LE]), (VERIFICATION, [IMPLICIT_LE])])
    with running_node(settings) as node:
        before = associate(settings.node.port, ct_scu)
        assert before.rejected_contexts
        node.reload(
            node_settings(
                tmp_path,
                redis.url,
                node={"port": settings.node.port, "extra_sop_classes": [CT_IMAGE_STORAGE]},
            )
        )
        after = associate(settings.node.port, ct_scu)
        assert after.send_c_store(ct).Status == statuses.SUCCESS
        assert before.send_c_echo().Status == statuses.SUCCESS  # still open
        before.release()
        after.release()
    assert same_content(_spooled(settings, ct), CT_SMALL)
