"""The node against hostile data sets: bombs, oversized elements and instances, bad UIDs.

Each case runs against a real ``coronet node serve`` process; it asserts the DIMSE status (or
the abort) the sender gets, that nothing was stored, and the node's RSS growth.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import config
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.dsutils import split_dataset

from dicom_node.core import statuses
from dicom_node.core.spool import Spool
from tests.support.attacks import deflate_bomb, with_private_element
from tests.support.dicom_data import EXPLICIT_LE, RG1_UNCR, make_instance
from tests.support.hostile_node import (
    LIMITS,
    MAX_GROWTH,
    MB,
    HostileNode,
    hostile_config,
    hostile_node,
)
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[HostileNode]:
    workdir = tmp_path_factory.mktemp("hostile-datasets")
    with hostile_node(hostile_config(workdir, redis_server.url), workdir) as running:
        yield running


@pytest.fixture
def send_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes unchanged (no re-encoding)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _stored(node: HostileNode) -> int:
    spool = Spool(node.spool_dir)
    return sum(len(spool.instances(key)) for key in spool.study_keys())


@pytest.mark.usefixtures("send_as_is")
def test_a_deflate_bomb_is_refused_while_it_inflates(node: HostileNode, tmp_path: Path) -> None:
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 4 * LIMITS["max_inflated_bytes"])
    assert bomb.stat().st_size < MB
    before = _stored(node)
    with node.growth() as growth:
        response = node.store(bomb, [DeflatedExplicitVRLittleEndian])
    assert response.Status == statuses.OUT_OF_RESOURCES
    assert growth.bytes < MAX_GROWTH
    assert _stored(node) == before
    assert "inflates beyond node.limits.max_inflated_bytes" in node.process.text()


@pytest.mark.usefixtures("send_as_is")
def test_a_deflated_instance_within_the_cap_is_stored_as_received(
    node: HostileNode, tmp_path: Path
) -> None:
    small = deflate_bomb(tmp_path / "small.dcm", LIMITS["max_element_bytes"] // 2)
    response = node.store(small, [DeflatedExplicitVRLittleEndian])
    assert response.Status == statuses.SUCCESS
    uid = pydicom.dcmread(small, stop_before_pixels=True).SOPInstanceUID
    spooled = [
        r.path
        for key in Spool(node.spool_dir).study_keys()
        for r in Spool(node.spool_dir).instances(key)
        if r.sop_instance_uid == uid
    ]
    assert len(spooled) == 1
    _, sent_at = split_dataset(small)
    _, stored_at = split_dataset(spooled[0])
    sent, stored = small.read_bytes()[sent_at:], spooled[0].read_bytes()[stored_at:]
    assert stored[: len(sent)] == sent  # still deflated, byte for byte (plus even-length pad)
    assert len(stored) - len(sent) <= 1


def test_an_element_over_the_cap_is_refused_without_being_read(
    node: HostileNode, tmp_path: Path
) -> None:
    path = tmp_path / "big-element.dcm"
    with_private_element(RG1_UNCR, path, 20 * LIMITS["max_element_bytes"])
    before = _stored(node)
    with node.growth() as growth:
        response = node.store(path)
    assert response.Status == statuses.OUT_OF_RESOURCES
    assert growth.bytes < MAX_GROWTH
    assert _stored(node) == before
    assert "more than node.limits.max_element_bytes" in node.process.text()


def test_an_instance_over_max_instance_bytes_is_aborted_and_leaves_nothing(
    node: HostileNode, tmp_path: Path
) -> None:
    path = tmp_path / "huge.dcm"
    with_private_element(RG1_UNCR, path, LIMITS["max_instance_bytes"] + 8 * MB, vr="OB")
    before = _stored(node)
    with node.growth() as growth:
        response = node.store(path)
    assert not response  # no status: the association was closed mid-transfer
    assert growth.bytes < MAX_GROWTH
    assert _stored(node) == before
    wait_until(lambda: node.temp_files() == [], 10, "the partial data set to be removed")


@pytest.mark.parametrize(
    ("uid", "status"),
    [
        ("1.2.3.4.5.6.7.\u00e9", statuses.INVALID_SOP_INSTANCE),
        ("1.2.3.4.5.6.7.\u00fc", statuses.INVALID_SOP_INSTANCE),
        ("1.2.03.4", statuses.INVALID_SOP_INSTANCE),
        ("1..2.3", statuses.INVALID_SOP_INSTANCE),
    ],
    ids=["e-acute", "u-umlaut", "leading-zero", "empty-component"],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_non_conformant_sop_instance_uid_is_refused_and_nothing_is_stored(
    node: HostileNode, tmp_path: Path, uid: str, status: int
) -> None:
    """Two UIDs that differ in one non-ASCII character used to share a spool key; both are
    refused now, as every UID that breaks PS3.5 9.1 is."""
    ds = make_instance(RG1_UNCR, tmp_path / "in.dcm")
    ds.SOPInstanceUID = UID(uid, validation_mode=config.IGNORE)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    before = _stored(node)
    response = node.store_dataset(ds)
    assert response.Status == status
    assert _stored(node) == before


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_non_conformant_study_uid_is_refused(node: HostileNode, tmp_path: Path) -> None:
    ds = make_instance(RG1_UNCR, tmp_path / "in.dcm", study_uid="1.2.3\u00e9")
    before = _stored(node)
    assert node.store_dataset(ds).Status == statuses.UID_NOT_CONFORMANT
    assert _stored(node) == before


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_uid_with_a_newline_cannot_forge_a_log_line(node: HostileNode, tmp_path: Path) -> None:
    forged = "2020-01-01 00:00:00 INFO x: FORGED LINE"  # the UID stays within 64 characters
    uid = f"1.2.3\n{forged}"
    ds = make_instance(RG1_UNCR, tmp_path / "in.dcm")
    ds.SOPInstanceUID = UID(uid, validation_mode=config.IGNORE)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert node.store_dataset(ds).Status == statuses.INVALID_SOP_INSTANCE
    ds = make_instance(RG1_UNCR, tmp_path / "in2.dcm", study_uid=uid)
    assert node.store_dataset(ds).Status == statuses.UID_NOT_CONFORMANT
    log = node.process.text()
    assert not [line for line in log.splitlines() if line.startswith("2020-01-01")]
    assert "FORGED LINE" not in log  # third-party echoes of values are redacted


def test_the_node_still_stores_a_good_instance_after_every_attack(
    node: HostileNode, tmp_path: Path
) -> None:
    path = tmp_path / "good.dcm"
    make_instance(RG1_UNCR, path)
    before = _stored(node)
    assert node.store(path, [EXPLICIT_LE]).Status == statuses.SUCCESS
    assert _stored(node) == before + 1
    assert node.temp_files() == []
