"""Fixtures and helpers for the DICOM node tests (import them from the test modules).

Everything talks to real peers on 127.0.0.1: a real ``redis-server`` (see
``tests.support.redis_server``), the node itself (in this process or as ``coronet node serve``
in a child process) and dcmtk's command-line tools.  Waits poll; nothing sleeps a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.config import Settings, settings_from_data
from dicom_node.server import DicomNode
from tests.support.redis_server import RedisServer, free_port

T = TypeVar("T")

NODE_AET = "CORONET"
SCU_AET = "SCU"


def testdata(name: str) -> Path:
    """A file of pydicom's test data (installed with pydicom-data; never downloaded)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom test file {name} is missing"
    return Path(path)


RG1_UNCR = testdata("RG1_UNCR.dcm")
RG1_J2KR = testdata("RG1_J2KR.dcm")
CT_SMALL = testdata("CT_small.dcm")
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

DEFAULT_CALLERS = [
    {"ae_title": "STORESCU", "host": "127.0.0.1"},
    {"ae_title": "ECHOSCU", "host": "127.0.0.1"},
    {"ae_title": SCU_AET, "host": "localhost"},
    {"ae_title": "ORTHANC", "host": "127.0.0.1"},
]


def wait_until(
    probe: Callable[[], T], timeout: float = 15.0, what: str = "condition", interval: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- settings


def node_data(tmp_path: Path, broker_url: str, **sections: Any) -> dict[str, Any]:
    """Plain configuration data for a node on a free port, spooling under ``tmp_path``."""
    data: dict[str, Any] = {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": free_port()},
        "callers": list(DEFAULT_CALLERS),
        "storage": {"spool_dir": str(tmp_path / "spool"), "outbox_dir": str(tmp_path / "out")},
        "broker": {"url": broker_url, "queue": "coronet"},
        "grouping": {"mode": "study", "quiet_seconds": 0.1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def node_settings(tmp_path: Path, broker_url: str, **sections: Any) -> Settings:
    return settings_from_data(node_data(tmp_path, broker_url, **sections))


@contextlib.contextmanager
def running_node(settings: Settings) -> Iterator[DicomNode]:
    """An in-process node (listener + queue) with fast broker retries."""
    node = DicomNode.from_settings(settings, retry_initial=0.05, retry_max=0.5)
    node.start()
    try:
        yield node
    finally:
        node.stop()


# --------------------------------------------------------------------------- redis


@pytest.fixture(scope="module", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server per test module."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(name="redis")
def redis_fixture(redis_server: RedisServer) -> RedisServer:
    """The module's redis-server, emptied for this test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server


@dataclass(frozen=True)
class QueuedTask:
    """A Celery task message found on the broker."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]


def queued_tasks(server: RedisServer, queue_name: str = "coronet") -> list[QueuedTask]:
    """Task messages waiting in the queue, oldest first (kombu's Redis list, not consumed)."""
    client = server.client()
    try:
        raw = client.lrange(queue_name, 0, -1)
    finally:
        client.close()
    tasks = []
    for item in reversed(raw):  # kombu LPUSHes; consumers pop from the right
        message = json.loads(item)
        assert message["properties"]["body_encoding"] == "base64"
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        tasks.append(QueuedTask(message["headers"]["task"], args, kwargs))
    return tasks


# --------------------------------------------------------------------------- DICOM data


def make_instance(
    source: Path,
    target: Path,
    *,
    study_uid: str | None = None,
    fix_pixel_spacing: bool = True,
    **attributes: Any,
) -> Dataset:
    """Copy ``source`` with fresh UIDs (or ``study_uid``) and the given header changes.

    RG1's Pixel Spacing is ``0\\0``, which dciodvfy reports as an error; ``fix_pixel_spacing``
    gives it a plausible value so that the copies are valid CR objects.
    """
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if fix_pixel_spacing and "PixelSpacing" in ds:
        ds.PixelSpacing = [0.171, 0.171]
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return ds


def run_storescu(
    paths: list[Path], port: int, *options: str, calling: str = "STORESCU", called: str = NODE_AET
) -> subprocess.CompletedProcess[str]:
    """dcmtk ``storescu`` with extra ``options`` (e.g. ``-xv`` to propose JPEG 2000)."""
    return subprocess.run(
        ["storescu", *options, "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=120,
    )


TRAILING_PADDING = 0xFFFCFFFC


def same_content(a: Path, b: Path) -> bool:
    """Whether two files hold the same data set, pixel data included.

    The file meta and Data Set Trailing Padding (FFFC,FFFC), which senders may drop
    (PS3.10 7.2), are not content.
    """
    first, second = pydicom.dcmread(a), pydicom.dcmread(b)
    for ds in (first, second):
        if TRAILING_PADDING in ds:
            del ds[TRAILING_PADDING]
    return bool(first == second) and first.PixelData == second.PixelData


def scu(ae_title: str = SCU_AET, contexts: list[tuple[str, list[str]]] | None = None) -> AE:
    """A pynetdicom SCU with the given requested contexts (default CR + Verification)."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    for sop_class, syntaxes in contexts or [
        (CR_IMAGE_STORAGE, [EXPLICIT_LE, IMPLICIT_LE]),
        (VERIFICATION, [IMPLICIT_LE]),
    ]:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


def associate(
    port: int, ae: AE | None = None, called: str = NODE_AET, **kwargs: Any
) -> Association:
    return (ae or scu()).associate("127.0.0.1", port, ae_title=called, **kwargs)


# --------------------------------------------------------------------------- child processes


class NodeProcess:
    """``coronet node serve`` in a child process; stdout lines are collected on a thread."""

    def __init__(self, config: Path, cwd: Path) -> None:
        self.config = config
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("CORONET_")}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dicom_node.cli",
                "-v",
                "node",
                "serve",
                "--config",
                str(config),
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        """Block until a stdout line contains ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.process.poll() is not None and self.lines.empty()):
                raise AssertionError(f"no line with {text!r}; output:\n{''.join(self.output)}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if text in line:
                return line

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=15)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._reader.join(timeout=5)
        return int(self.process.returncode)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def node_process(config: Path, cwd: Path) -> Iterator[NodeProcess]:
    """Start ``coronet node serve`` and wait until it prints that it listens."""
    proc = NodeProcess(config, cwd)
    try:
        proc.wait_for_line("listening on")
        yield proc
    finally:
        proc.stop()
