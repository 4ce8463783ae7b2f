"""Instances over the network: the node's ``/fetch/v1``, its tickets, and the worker's client.

The tickets and the client are checked against a node process (``coronet node serve``) with a
real Redis, and the client's limits against a small HTTP server of the test's own that
misbehaves on purpose (a transfer cut short, a wrong digest, an oversized answer).  The
module's stack then runs a real ``coronet worker`` whose ``storage.spool_dir`` is an empty
folder of its own: it processes studies by fetching them, a node restart while its task waits
loses nothing, and an instance gone from the node is dead-lettered, never "done".
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

import monai_bundle
from dicom_node.core.fetch import (
    Locator,
    TicketRefused,
    TicketSigner,
    default_base_url,
    digest_header,
    instance_url,
    parse_digest,
    report_url,
    spool_identity,
    study_url,
)
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import settings_from_data
from dicom_node.core.spool import Spool, key_for
from dicom_node.scp.queueing import CeleryQueue
from tests.support.node import node_process, queued_tasks, run_storescu
from tests.support.polling import wait_until
from tests.support.processes import ChildProcess
from tests.support.redis_server import RedisServer
from tests.support.results import phantom_source
from tests.support.settings import node_data, write_config
from tests.support.storescp import StoreSCP
from worker.fetching import FetchCache, NodeClient, RemoteSource
from worker.sources import SourceGone, SourceRefused, SourceUnavailable

BUNDLE = Path(monai_bundle.__file__).resolve().parent
STUDY = key_for("1.2.3")
OTHER = key_for("1.2.4")
SECRET = b"s" * 64


# --------------------------------------------------------------------------- tickets


def test_a_ticket_grants_its_study_only_until_it_expires() -> None:
    signer = TicketSigner(SECRET, ttl=600)
    ticket = signer.sign(STUDY)
    signer.check(ticket, STUDY)
    with pytest.raises(TicketRefused, match="another study"):
        signer.check(ticket, OTHER)
    tampered = ticket[:-2] + ("A" if ticket[-2] != "A" else "B") + ticket[-1]
    with pytest.raises(TicketRefused, match="signature"):
        signer.check(tampered, STUDY)
    with pytest.raises(TicketRefused, match="signature"):
        TicketSigner(b"t" * 64, ttl=600).check(ticket, STUDY)
    with mock.patch("itsdangerous.timed.time.time", return_value=time.time() - 601):
        old = signer.sign(STUDY)
    with pytest.raises(TicketRefused, match="expired"):
        signer.check(old, STUDY)
    with pytest.raises(TicketRefused):
        signer.check("", STUDY)


def test_urls_and_digests() -> None:
    url = study_url("https://node.example:8480/", STUDY, "a.b-c_d")
    assert url == f"https://node.example:8480/fetch/v1/studies/{STUDY}?ticket=a.b-c_d"
    instance = key_for("1.2.3.4")
    assert instance_url(url, instance) == (
        f"https://node.example:8480/fetch/v1/studies/{STUDY}/instances/{instance}?ticket=a.b-c_d"
    )
    assert report_url(url).endswith(f"/studies/{STUDY}/report?ticket=a.b-c_d")
    sha = hashlib.sha256(b"x").digest()
    assert parse_digest(digest_header(sha)) == sha
    assert parse_digest("md5=:AAAA:, " + digest_header(sha)) == sha
    assert parse_digest("sha-256=:notbase64!:") is None and parse_digest(None) is None


# --------------------------------------------------------------------------- a misbehaving server


class Misbehaving:
    """An HTTP/1.1 server on loopback answering every request with one canned response."""

    def __init__(self, head: bytes, body: bytes, *, pause: float = 0.0) -> None:
        self.head, self.body, self.pause = head, body, pause
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.requests += 1
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(self.head)
                    for i in range(0, len(self.body), 1024):
                        conn.sendall(self.body[i : i + 1024])
                        time.sleep(self.pause)
                except OSError:
                    continue

    def url(self) -> str:
        return study_url(f"http://127.0.0.1:{self.port}", STUDY, "t")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(name="serve")
def serve_fixture() -> Iterator[Any]:
    servers: list[Misbehaving] = []

    def serve(head: str, body: bytes = b"", **kwargs: Any) -> Misbehaving:
        server = Misbehaving(head.replace("\n", "\r\n").encode() + b"\r\n", body, **kwargs)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.close()


def _fetch(server: Misbehaving, tmp_path: Path, *, expected: int | None = None, **kw: Any) -> Path:
    client = NodeClient(2.0, kw.pop("limit", 1 << 20), attempts=2, pause=0.01, **kw)
    target = tmp_path / "cache" / "x.dcm"
    try:
        client.instance(instance_url(server.url(), key_for("9")), target, expected)
    finally:
        client.close()
    return target


def test_a_transfer_cut_short_or_corrupted_leaves_nothing_and_is_transient(
    serve: Any, tmp_path: Path
) -> None:
    body = b"D" * 5000
    good = digest_header(hashlib.sha256(body).digest())
    short = serve(f"HTTP/1.1 200 OK\nContent-Length: 9000\n{_digest(good)}\n", body)
    with pytest.raises(SourceUnavailable, match=r"broke off|ended after"):
        _fetch(short, tmp_path)
    assert short.requests == 2  # tried again at once, then left to the task's retry
    wrong = digest_header(hashlib.sha256(b"other").digest())
    corrupt = serve(f"HTTP/1.1 200 OK\nContent-Length: 5000\n{_digest(wrong)}\n", body)
    with pytest.raises(SourceUnavailable, match="SHA-256"):
        _fetch(corrupt, tmp_path)
    undigested = serve("HTTP/1.1 200 OK\nContent-Length: 5000\n", body)
    with pytest.raises(SourceUnavailable, match="Repr-Digest"):
        _fetch(undigested, tmp_path)
    assert not list((tmp_path / "cache").iterdir())  # no partial file is ever kept
    fine = serve(f"HTTP/1.1 200 OK\nContent-Length: 5000\n{_digest(good)}\n", body)
    assert _fetch(fine, tmp_path).read_bytes() == body


def _digest(value: str) -> str:
    return f"Repr-Digest: {value}"


def test_sizes_are_checked_before_anything_is_read(serve: Any, tmp_path: Path) -> None:
    huge = serve("HTTP/1.1 200 OK\nContent-Length: 99999999999\nRepr-Digest: sha-256=:AA==:\n")
    with pytest.raises(SourceGone, match="over the limit"):
        _fetch(huge, tmp_path)
    assert huge.requests == 1  # permanent: not tried again
    listed = serve("HTTP/1.1 200 OK\nContent-Length: 5000\nRepr-Digest: sha-256=:AA==:\n")
    with pytest.raises(SourceGone):  # more than the study listing said
        _fetch(listed, tmp_path, expected=4000)
    client = NodeClient(2.0, 1 << 20, attempts=1)
    endless = serve("HTTP/1.1 200 OK\n", b"[" * (17 << 20))  # no length: read, but bounded
    with pytest.raises(SourceUnavailable, match="exceeds"):
        client.study(endless.url(), STUDY)


def test_a_slow_transfer_is_cut_at_its_deadline(serve: Any, tmp_path: Path) -> None:
    body = b"D" * 40_000
    good = digest_header(hashlib.sha256(body).digest())
    slow = serve(f"HTTP/1.1 200 OK\nContent-Length: 40000\n{_digest(good)}\n", body, pause=0.1)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="too long"):
        client = NodeClient(1.0, 1 << 20, attempts=1)
        client.instance(instance_url(slow.url(), key_for("9")), tmp_path / "x.dcm", None)
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(("status", "error"), [(403, SourceRefused), (404, SourceGone)])
def test_status_codes_are_classified(
    serve: Any, tmp_path: Path, status: int, error: type[Exception]
) -> None:
    server = serve(f"HTTP/1.1 {status} No\nContent-Length: 0\n")
    with pytest.raises(error):
        _fetch(server, tmp_path)
    assert server.requests == 1


def test_an_unreachable_node_is_transient(tmp_path: Path) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = NodeClient(1.0, 1 << 20, attempts=2, pause=0.01)
    with pytest.raises(SourceUnavailable, match="did not answer"):
        client.study(study_url(f"http://127.0.0.1:{port}", STUDY, "t"), STUDY)


# --------------------------------------------------------------------------- the node's endpoint


def _send(folder: Path, port: int, name: str) -> pydicom.Dataset:
    path = folder / "in" / f"{name}.dcm"
    ds = phantom_source(path, study_uid=generate_uid())
    result = run_storescu([path], port)
    assert result.returncode == 0, result.stderr
    return ds


@pytest.mark.integration
def test_the_node_serves_its_spool_to_a_ticket_and_refuses_the_rest(
    tmp_path: Path, redis: RedisServer
) -> None:
    data = node_data(tmp_path, redis.url)
    config = write_config(tmp_path / "node.yaml", data)
    with node_process(config, tmp_path):
        ds = _send(tmp_path, data["node"]["port"], "one")
        study = key_for(str(ds.StudyInstanceUID))
        (task,) = wait_until(lambda: queued_tasks(redis), 30, "the task")
        url = task.kwargs["fetch"]
        spool = Spool(Path(data["storage"]["spool_dir"]))
        assert task.kwargs["spool"] == (spool.root / "spool.id").read_text().strip()
        assert url.startswith(f"http://127.0.0.1:{data['admin']['port']}/fetch/v1/studies/{study}")
        (record,) = spool.instances(study)
        with httpx.Client(timeout=10) as http:
            listing = http.get(url).json()
            assert listing["instances"][0]["instance_key"] == record.instance_key
            got = http.get(instance_url(url, record.instance_key))
            assert got.status_code == 200 and got.content == record.path.read_bytes()
            assert parse_digest(got.headers["repr-digest"]) == hashlib.sha256(got.content).digest()
            base, ticket = url.split("?ticket=")
            flipped = ticket[:-3] + ("x" if ticket[-3] != "x" else "y") + ticket[-2:]
            secret = Path(data["admin"]["secret_file"]).read_text().strip().encode()
            with mock.patch("itsdangerous.timed.time.time", return_value=time.time() - 7 * 3600):
                expired = TicketSigner(secret, 6 * 3600).sign(study)
            foreign = study_url(base.split("/fetch/")[0], key_for("1.2.999"), ticket)
            for refused in (
                f"{base}?ticket={flipped}",
                f"{base}?ticket={expired}",
                base,
                foreign,
                instance_url(f"{base}?ticket={flipped}", record.instance_key),
                report_url(f"{base}?ticket={expired}"),
            ):
                method = "POST" if refused.split("?")[0].endswith("/report") else "GET"
                assert http.request(method, refused, json={}).status_code == 403, refused
            gone = http.get(instance_url(url, key_for("1.2.3.4.5")))
            assert gone.status_code == 404
            too_big = http.post(
                report_url(url), content=b"{" * 2_000_000, headers={"Content-Type": "x"}
            )
            assert too_big.status_code == 413
            done = http.post(report_url(url), json={"done": [record.instance_key]})
            assert done.status_code == 200
        assert spool.pending_studies() == []
    audit = Path(data["audit"]["file"]).read_text()
    assert 'UserID="worker"' in audit  # 110104 Instances Transferred, to the worker


# --------------------------------------------------------------------------- a worker with no spool


@dataclass
class Stack:
    folder: Path
    data: dict[str, Any]
    config: Path
    pacs: StoreSCP
    worker: ChildProcess
    node: ChildProcess | None = None

    @property
    def port(self) -> int:
        return int(self.data["node"]["port"])

    @property
    def spool(self) -> Spool:
        return Spool(Path(self.data["storage"]["spool_dir"]))

    def start_node(self) -> None:
        self.node = ChildProcess.coronet(
            ["-v", "node", "serve", "--config", str(self.config)], cwd=self.folder
        )
        self.node.wait_for_line("listening on")

    def stop_node(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None


def _srs(pacs: StoreSCP, study_uid: str) -> set[str]:
    return {
        str(ds.SOPInstanceUID)
        for _, ds in pacs.received()
        if ds.SOPClassUID == Comprehensive3DSRStorage and ds.StudyInstanceUID == study_uid
    }


@pytest.fixture(scope="module", name="stack")
def stack_fixture(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("fetch")
    client = redis_server.client()
    client.flushall()
    client.close()
    pacs = StoreSCP(folder / "pacs").start()
    data = node_data(
        folder,
        redis_server.url,
        destinations=[pacs.destination()],
        model={"bundle_dir": str(BUNDLE), "device": "cpu"},
    )
    config = write_config(folder / "node.yaml", data)
    worker_data = {
        **data,
        "storage": {"spool_dir": str(folder / "worker-spool"), "outbox_dir": str(folder / "wo")},
        "fetch": {"cache_dir": str(folder / "worker-cache"), "direct_spool": True, "timeout": 5},
        "audit": {"sink": "off"},
    }
    worker_config = write_config(folder / "worker.yaml", worker_data)
    worker = ChildProcess.coronet(
        [
            *("worker", "--config", str(worker_config), "--threads", "1", "--heatmap", "off"),
            *("--retry-backoff", "0.5", "--retry-backoff-max", "2", "--max-retries", "30"),
        ],
        cwd=folder,
    )
    stack = Stack(folder, data, config, pacs, worker)
    try:
        stack.start_node()
        worker.wait_for(lambda out: "loaded on" in out, "the worker to load the model", 180)
        yield stack
    finally:
        worker.stop()
        stack.stop_node()
        pacs.stop()


@pytest.mark.integration
def test_a_worker_with_no_spool_access_processes_studies(stack: Stack) -> None:
    sent = [_send(stack.folder, stack.port, f"nospool-{i}") for i in range(2)]
    uids = [str(ds.StudyInstanceUID) for ds in sent]
    wait_until(lambda: all(_srs(stack.pacs, uid) for uid in uids), 120, "the SRs at the PACS")
    wait_until(lambda: not stack.spool.pending_studies(), 30, "the node to hear it is done")
    assert not (stack.folder / "worker-spool").exists() or not any(
        (stack.folder / "worker-spool").iterdir()
    )
    # The worker drops its cached copies once it told the node the study is done.
    cache = stack.folder / "worker-cache"
    wait_until(lambda: not list(cache.glob("*/*.dcm")), 30, "the worker's cache to be emptied")
    for ds in sent:
        assert len(_srs(stack.pacs, str(ds.StudyInstanceUID))) == 1


def _held_node(stack: Stack) -> ChildProcess:
    """The stack's node, started again so that it stores studies but queues none by itself."""
    stack.stop_node()
    node = ChildProcess.coronet(
        [
            *("-v", "node", "serve", "--config", str(stack.config)),
            *("--set", "grouping.quiet_seconds=3600"),
        ],
        cwd=stack.folder,
    )
    node.wait_for_line("listening on")
    return node


def _publish(stack: Stack, study_key: str) -> None:
    """Publish the study's task as the node does (its secret, its address, its spool)."""
    data = stack.data
    secret = Path(data["admin"]["secret_file"]).read_text().strip().encode()
    settings = settings_from_data(data)
    locator = Locator(
        TicketSigner(secret, settings.fetch.url_ttl),
        default_base_url(settings),
        spool_identity(stack.spool.root) or "",
    )
    queue = CeleryQueue.from_settings(settings.broker, locator.task_kwargs)
    try:
        queue.enqueue_study(study_key)
    finally:
        queue.close()
    stack.spool.mark_queued(study_key, stack.spool.pending_instances(study_key))


@pytest.mark.integration
def test_a_node_restart_while_a_task_fetches_loses_nothing(stack: Stack) -> None:
    node = _held_node(stack)
    try:
        ds = _send(stack.folder, stack.port, "restart")
    finally:
        node.stop()
    before = len(stack.worker.text())
    study = key_for(str(ds.StudyInstanceUID))
    _publish(stack, study)  # the node is down: every fetch fails, the task is retried
    wait_until(
        lambda: stack.worker.text().count("the node did not answer", before) >= 2,
        60,
        "the worker to find the node down and retry",
    )
    assert not _srs(stack.pacs, str(ds.StudyInstanceUID))
    stack.start_node()
    wait_until(lambda: _srs(stack.pacs, str(ds.StudyInstanceUID)), 120, "the SR, node back")
    wait_until(lambda: not stack.spool.pending_studies(), 30, "the node to hear it is done")
    assert len(_srs(stack.pacs, str(ds.StudyInstanceUID))) == 1
    assert "dead-lettered:" not in stack.worker.text()[before:]


@pytest.mark.integration
def test_an_instance_gone_from_the_node_is_dead_lettered(stack: Stack) -> None:
    node = _held_node(stack)
    try:
        ds = _send(stack.folder, stack.port, "missing")
        study = key_for(str(ds.StudyInstanceUID))
        instance = key_for(str(ds.SOPInstanceUID))
        spool = stack.spool
        spool.mark_queued(study, [instance])
        spool.instance_path(study, instance).unlink()  # lost after it was queued
        _publish(stack, study)
        outbox = Outbox(Path(stack.data["storage"]["outbox_dir"]))  # the node's outbox
        wait_until(lambda: outbox.is_dead_source(study, instance), 120, "the dead letter")
        assert "gone from the node" in outbox.dead_sources_of(study)[0].reason
        wait_until(lambda: not spool.pending_instances(study), 30, "the instance done")
        assert spool.lost_instances(study) == []
        assert not _srs(stack.pacs, str(ds.StudyInstanceUID))
    finally:
        node.stop()
        stack.start_node()


def test_the_cache_keeps_verified_files_per_study(tmp_path: Path) -> None:
    cache = FetchCache(tmp_path)
    path = cache.path(STUDY, OTHER)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    (path.parent / ".x.dcm.abc.tmp").write_bytes(b"partial")
    assert cache.sweep(older_than=3600) == 1 and path.exists()
    source = RemoteSource(NodeClient(1.0, 1 << 20), cache, study_url("http://x", STUDY, "t"), STUDY)
    assert source.instance_file(STUDY, OTHER) == path  # a cached copy needs no request
    source.release(STUDY)
    assert not path.exists()
