"""The node against hostile PDUs on raw sockets: bounded memory, deadlines, free slots.

Every test runs against a real ``coronet node serve`` process and asserts on what the attacker
sees (the connection closed, and when) and on the node's RSS from ``/proc/PID/status``.
Attackers connect from other loopback addresses (127.0.0.2, ...) than the legitimate callers
(127.0.0.1), as they would from other hosts.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from tests.support import memory
from tests.support.attacks import (
    associate_rq,
    connect,
    seconds_until_closed,
    send_until_refused,
)
from tests.support.dicom_data import CR_IMAGE_STORAGE, EXPLICIT_LE
from tests.support.hostile_node import (
    ACSE_TIMEOUT_S,
    LIMITS,
    MAX_GROWTH,
    NETWORK_TIMEOUT_S,
    HostileNode,
    hostile_config,
    hostile_node,
)
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.settings import NODE_AET

pytestmark = pytest.mark.integration

SLACK_S = 1.5
GIANT = b"\x01\x00\xff\xff\xff\xff"  # A-ASSOCIATE-RQ declaring 4 GB


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[HostileNode]:
    workdir = tmp_path_factory.mktemp("hostile-pdus")
    with hostile_node(hostile_config(workdir, redis_server.url), workdir) as started:
        yield started
    assert started.process.process.returncode == 0, started.process.text()


@pytest.fixture
def node(running: HostileNode) -> HostileNode:
    """The module's node, with nothing left over from the previous test."""
    running.wait_quiet()
    return running


def test_a_giant_associate_request_is_closed_before_it_is_read(node: HostileNode) -> None:
    with node.growth() as growth:
        sock = connect(node.port, "127.0.0.2")
        sock.sendall(GIANT)
        sent = send_until_refused(sock, 64 << 20)
        closed = seconds_until_closed(sock, 5)
        sock.close()
    assert closed is not None and sent < 16 << 20
    assert growth.bytes < MAX_GROWTH
    node.echo_seconds()
    assert "A-ASSOCIATE-RQ declares 4294967295 bytes" in node.process.text()


def test_two_hundred_giant_requests_leave_memory_and_threads_bounded(node: HostileNode) -> None:
    def attack(source: str) -> None:
        try:
            sock = connect(node.port, source)
        except OSError:  # refused by the pending caps: fine
            return
        with sock:
            try:
                sock.sendall(GIANT)
            except OSError:
                return
            send_until_refused(sock, 8 << 20)

    sources = [f"127.0.{n // 200 + 1}.{n % 200 + 2}" for n in range(200)]
    with node.growth() as growth:
        workers = [threading.Thread(target=attack, args=(s,)) for s in sources]
        for worker in workers:
            worker.start()
        most_threads = 0
        while any(w.is_alive() for w in workers):
            most_threads = max(most_threads, memory.threads(node.pid))
            time.sleep(0.01)
    assert growth.bytes < MAX_GROWTH
    # Three threads per connection at most (listener thread, association, DUL), for the
    # connections the pending cap lets in, plus the node's own.
    assert most_threads < 3 * LIMITS["max_pending_connections"] + 20
    node.echo_seconds()


@pytest.mark.parametrize("how", ["silent", "trickle"])
def test_a_partial_associate_request_is_closed_within_the_acse_timeout(
    node: HostileNode, how: str
) -> None:
    request = associate_rq("SCU", NODE_AET)
    with node.growth() as growth:
        sock = connect(node.port, "127.0.0.3")
        started = time.monotonic()
        sock.sendall(request[:6])  # the header only
        if how == "trickle":
            for byte in request[6:40]:  # one byte every 0.2 s: never done in time
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.2)
        closed = seconds_until_closed(sock, ACSE_TIMEOUT_S + 5)
        sock.close()
    assert closed is not None
    assert time.monotonic() - started <= ACSE_TIMEOUT_S + SLACK_S
    assert growth.bytes < MAX_GROWTH


def test_pending_connections_take_no_association_slot(node: HostileNode) -> None:
    """Partial requests up to the pending cap, from other peers: a PACS is still served."""
    request = associate_rq("SCU", NODE_AET)
    with node.growth() as growth:
        partial = [connect(node.port, f"127.0.4.{n}") for n in range(2, 2 + 8)]
        try:
            for sock in partial:
                sock.sendall(request[:20])
            wait_until(lambda: _pending(node) >= 8, 5, "the partial requests to be accepted")
            assert node.echo_seconds() < 5.0
        finally:
            for sock in partial:
                sock.close()
    assert growth.bytes < MAX_GROWTH


def test_a_peer_over_its_pending_cap_is_refused_at_once(node: HostileNode) -> None:
    cap = LIMITS["max_pending_per_peer"]
    with node.growth() as growth:
        held = [connect(node.port, "127.0.5.2") for _ in range(cap)]
        try:
            wait_until(lambda: _pending(node, "127.0.5.2") >= cap, 5, "the first connections")
            extra = connect(node.port, "127.0.5.2")
            closed = seconds_until_closed(extra, 2)
            extra.close()
            assert closed is not None and closed < 1.0
            assert node.echo_seconds() < 5.0  # others are still served
        finally:
            for sock in held:
                sock.close()
    assert growth.bytes < MAX_GROWTH
    assert "refused connection from 127.0.5.2" in node.process.text()


def test_a_p_data_pdu_longer_than_negotiated_is_closed(node: HostileNode) -> None:
    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CR_IMAGE_STORAGE, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    sock = _raw_socket(assoc)
    with node.growth() as growth:
        try:
            sock.sendall(b"\x04\x00\xff\xff\xff\xff")
            send_until_refused(sock, 64 << 20)
        except OSError:
            pass
        wait_until(lambda: not assoc.is_established, 10, "the node to drop the association")
    assert growth.bytes < MAX_GROWTH
    assert "P-DATA-TF declares 4294967295 bytes" in node.process.text()


def test_an_established_association_that_stops_mid_pdu_is_closed(node: HostileNode) -> None:
    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CR_IMAGE_STORAGE, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    sock = _raw_socket(assoc)
    with node.growth() as growth:
        started = time.monotonic()
        sock.sendall(b"\x04\x00\x00\x00\x10\x00" + b"\0" * 100)  # 4 KB announced, 100 sent
        wait_until(lambda: not assoc.is_established, NETWORK_TIMEOUT_S + 10, "the deadline")
    assert time.monotonic() - started <= NETWORK_TIMEOUT_S + SLACK_S + 1
    assert growth.bytes < MAX_GROWTH


def _raw_socket(assoc: Association) -> socket.socket:
    """The association's own connection, to write raw bytes on."""
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    return assoc.dul.socket.socket


def _pending(node: HostileNode, peer: str | None = None) -> int:
    """Connections to the node that ``peer`` (or anyone) holds open."""
    return sum(1 for source in node.connections() if peer is None or source == peer)
