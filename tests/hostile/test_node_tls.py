"""The TLS listener against silent and broken clients: handshakes happen off the accept loop.

A silent TCP connection used to stall every accept for the 10 s handshake timeout; now each
handshake runs on its connection's thread with its own deadline, so a PACS is served at once.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.attacks import associate_rq, connect, seconds_until_closed
from tests.support.certificates import Certificate
from tests.support.hostile_node import MAX_GROWTH, HostileNode, hostile_config, hostile_node
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.settings import NODE_AET

pytestmark = pytest.mark.integration


def _client_context(certificate: Certificate) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificate.cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, certificate: Certificate
) -> Iterator[HostileNode]:
    workdir = tmp_path_factory.mktemp("hostile-tls")
    tls = {"cert_file": str(certificate.cert), "key_file": str(certificate.key)}
    data = hostile_config(workdir, redis_server.url, node={"tls": tls})
    with hostile_node(data, workdir) as running:
        yield running


def test_a_pacs_is_served_while_silent_and_partial_tls_connections_wait(
    node: HostileNode, certificate: Certificate
) -> None:
    context = _client_context(certificate)
    with node.growth() as growth:
        silent = [connect(node.port, f"127.0.6.{n}") for n in range(2, 7)]  # 5, no handshake
        partial = [connect(node.port, f"127.0.7.{n}", tls=context) for n in range(2, 5)]
        try:
            for sock in partial:
                sock.sendall(associate_rq("SCU", NODE_AET)[:6])  # 3 partial requests over TLS
            wait_until(lambda: len(node.connections()) >= 8, 5, "the attackers' connections")
            took = node.echo_seconds(tls=(context, "localhost"))
            assert took < 5.0
        finally:
            for sock in silent + partial:
                sock.close()
    assert growth.bytes < MAX_GROWTH


def test_a_silent_tls_connection_is_closed_at_its_handshake_deadline(
    node: HostileNode,
) -> None:
    sock = connect(node.port, "127.0.8.2")
    started = time.monotonic()
    closed = seconds_until_closed(sock, 20)
    sock.close()
    assert closed is not None
    assert time.monotonic() - started < 12.0  # the 10 s handshake deadline
    wait_until(
        lambda: "TLS handshake with 127.0.8.2 failed" in node.process.text(), 5, "the log line"
    )


def test_a_failed_handshake_is_logged_once_with_the_peer(node: HostileNode) -> None:
    sock = connect(node.port, "127.0.8.3")
    sock.sendall(b"\x16\x03\x01\x00\x05hello")  # not a TLS ClientHello
    assert seconds_until_closed(sock, 5) is not None
    sock.close()
    wait_until(
        lambda: "TLS handshake with 127.0.8.3 failed" in node.process.text(), 5, "the log line"
    )
    lines = [ln for ln in node.process.text().splitlines() if "127.0.8.3" in ln]
    assert len(lines) == 1


def test_plain_dicom_to_the_tls_port_is_refused(node: HostileNode, tmp_path: Path) -> None:
    sock = connect(node.port, "127.0.8.4")
    sock.sendall(associate_rq("SCU", NODE_AET))
    assert seconds_until_closed(sock, 5) is not None
    sock.close()
