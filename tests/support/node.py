"""Talking to the node: an in-process node, SCU associations, storescu, the broker's queue."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.core.settings import Settings
from dicom_node.scp.node import DicomNode
from tests.support.dicom_data import CR_IMAGE_STORAGE, EXPLICIT_LE, IMPLICIT_LE, VERIFICATION
from tests.support.processes import ChildProcess
from tests.support.redis_server import RedisServer
from tests.support.settings import NODE_AET, SCU_AET


@contextlib.contextmanager
def running_node(settings: Settings) -> Iterator[DicomNode]:
    """An in-process node (listener + queue) with fast broker retries."""
    node = DicomNode.from_settings(settings, retry_initial=0.05, retry_max=0.5)
    node.start()
    try:
        yield node
    finally:
        node.stop()


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


@contextlib.contextmanager
def node_process(config: Path, cwd: Path) -> Iterator[ChildProcess]:
    """``coronet -v node serve`` in a child process, once it prints that it listens."""
    with ChildProcess.coronet(["-v", "node", "serve", "--config", str(config)], cwd=cwd) as proc:
        proc.wait_for_line("listening on")
        yield proc
