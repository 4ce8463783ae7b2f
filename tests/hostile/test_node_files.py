"""The node's temporary files under hostile senders and a full disk.

pynetdicom streams each data set to a temporary file; the node keeps those in the spool's own
``tmp`` folder and removes them when the sender aborts, when the node restarts after a kill -9,
and when a write fails because the disk is full (answered 0xA700, never silence).
"""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import P_DATA_TF

from dicom_node.core import statuses
from dicom_node.core.spool import Spool
from tests.support.dicom_data import (
    CR_IMAGE_STORAGE,
    EXPLICIT_LE,
    RG1_UNCR,
    VERIFICATION,
    make_instance,
)
from tests.support.hostile_node import MAX_GROWTH, hostile_config, hostile_node
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.settings import NODE_AET, write_config

pytestmark = pytest.mark.integration

DISK_BYTES = 24 << 20  # three RG1 copies (7.2 MB each) fit, a fourth does not


def _associate(port: int) -> Association:
    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CR_IMAGE_STORAGE, [EXPLICIT_LE])
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    return assoc


def _send_half_a_store(assoc: Association, path: Path) -> None:
    """The C-STORE-RQ command and the first half of the data set's PDUs, then nothing."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CR_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = generate_uid()
    request.Priority = 2
    _, offset = split_dataset(path)
    request.DataSet = io.BytesIO(path.read_bytes()[offset:])
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    assert context_id is not None
    p_datas = list(message.encode_msg(context_id, 16382))
    sock = assoc.dul.socket
    assert sock is not None and sock.socket is not None
    for p_data in p_datas[: len(p_datas) // 2]:
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        sock.socket.sendall(pdu.encode())


@pytest.fixture
def rg1_copy(tmp_path: Path) -> Path:
    path = tmp_path / "rg1.dcm"
    make_instance(RG1_UNCR, path)
    return path


def test_an_aborted_store_leaves_no_temporary_file(
    tmp_path: Path, redis: RedisServer, rg1_copy: Path
) -> None:
    with hostile_node(hostile_config(tmp_path, redis.url), tmp_path) as node:
        assoc = _associate(node.port)
        _send_half_a_store(assoc, rg1_copy)
        wait_until(node.temp_files, 10, "the partial data set on disk")
        assoc.abort()
        wait_until(lambda: node.temp_files() == [], 10, "the partial data set to be removed")
        assert node.store(rg1_copy).Status == statuses.SUCCESS
        assert node.temp_files() == []


def test_a_kill_9_mid_store_leaves_no_temporary_file_after_restart(
    tmp_path: Path, redis: RedisServer, rg1_copy: Path
) -> None:
    data = hostile_config(tmp_path, redis.url)
    with hostile_node(data, tmp_path) as node:
        assoc = _associate(node.port)
        _send_half_a_store(assoc, rg1_copy)
        wait_until(node.temp_files, 10, "the partial data set on disk")
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(30)
        left = node.temp_files()
        assoc.abort()
    assert len(left) == 1  # what a crash leaves: the restart must sweep it
    with hostile_node(data, tmp_path) as restarted:
        assert restarted.temp_files() == []
        assert "removed 1 partial writes" in restarted.process.text()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_BYTES mounted by the test (as root), removed afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=30)


def test_a_full_disk_answers_out_of_resources_and_the_node_lives_on(
    tmp_path: Path, redis: RedisServer, small_disk: Path
) -> None:
    data = hostile_config(
        tmp_path,
        redis.url,
        # No free-space floor: this is the last wall, a write that fails on a full disk.
        storage={
            "spool_dir": str(small_disk / "spool"),
            "outbox_dir": str(tmp_path / "out"),
            "min_free_bytes": 0,
        },
    )
    copies = [tmp_path / "in" / f"{n}.dcm" for n in range(5)]
    for path in copies:
        make_instance(RG1_UNCR, path)
    with hostile_node(data, tmp_path) as node, node.growth() as growth:
        assoc = _associate(node.port)
        answers = [int(assoc.send_c_store(path).Status) for path in copies]
        # Still answering on the same association: no dead thread, no silence.
        assert assoc.send_c_echo().Status == statuses.SUCCESS
        assoc.release()
        assert answers[:3] == [statuses.SUCCESS] * 3
        assert answers[3:] == [statuses.OUT_OF_RESOURCES] * 2
        assert node.temp_files() == []  # a failed write gives its space back
        assert "cannot write the received data set" in node.process.text()
        # Space is freed: the same instances are stored now.
        spool = Spool(node.spool_dir)
        for key in spool.study_keys()[:2]:
            shutil.rmtree(node.spool_dir / key)
        assoc = _associate(node.port)
        assert [int(assoc.send_c_store(p).Status) for p in copies[3:]] == [statuses.SUCCESS] * 2
        assoc.release()
        assert node.echo_seconds() < 5
    assert growth.bytes < MAX_GROWTH


def test_a_spool_folder_that_is_a_file_is_a_configuration_error(
    tmp_path: Path, redis: RedisServer
) -> None:
    not_a_folder = tmp_path / "spool"
    not_a_folder.write_text("a file", encoding="utf-8")
    data = hostile_config(tmp_path, redis.url)
    data["storage"]["spool_dir"] = str(not_a_folder)
    config = write_config(tmp_path / "node.yaml", data)
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "node", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"storage.spool_dir {not_a_folder} is not a folder" in result.stderr
    assert "Traceback" not in result.stderr
