"""Hostile network input against the CoroNet node, dcmtk ``storescp`` and Orthanc, side by side.

    python -m bench.hostile [--redis-port P]

Each attack runs against each server in turn, all on loopback, and prints, per server:

- **RSS growth**: the server's peak RSS during the attack minus its RSS before (VmHWM reset
  first, ``/proc/PID/status``);
- **closed after**: seconds until the server closed the attacker's connection ("open" when it
  was still open at the end of the attack window);
- **legit echo**: seconds a legitimate ``echoscu`` from another address took while the attack
  was going on ("refused" when it failed);
- **answer**: for the data-set attacks (sent with pynetdicom, bytes unchanged), the C-STORE
  status the sender got, and the "closed after" column is the time to that answer.

All three servers get the same deadlines where they have them: ACSE 3 s, network/socket 3 s.
The node runs with its test limits (``tests/support/hostile_node.py``); storescp and Orthanc
with their defaults otherwise.  Nothing leaves 127.0.0.0/8.

Then a second instance of each server runs with DICOM TLS (a self-signed P-256 certificate from
``tests/support/certificates.py``, no client certificate asked for: the node's ``node.tls``,
storescp ``+tls KEY CERT -ic``, Orthanc 1.10's ``DicomTlsEnabled`` with
``DicomTlsRemoteCertificateRequired`` false) against one attack: 5 silent TCP connections (no
ClientHello) and 3 TLS connections that send the first 6 bytes of an A-ASSOCIATE-RQ, from 8
addresses, held for 12 s (past the node's 10 s handshake deadline).  "closed after" is for the
first silent connection, the answer column counts the attackers' completed handshakes, and the
legitimate echo is ``echoscu +tla +cf CERT`` (TLS without a client certificate, the server's
certificate trusted).  A server whose TLS echo fails before the attack prints "no TLS".
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from tests.support import memory
from tests.support.attacks import (
    associate_rq,
    connect,
    deflate_bomb,
    seconds_until_closed,
    send_until_refused,
    with_private_element,
)
from tests.support.certificates import Certificate, make_certificate
from tests.support.dicom_data import CR_IMAGE_STORAGE, RG1_UNCR
from tests.support.hostile_node import hostile_config, hostile_node
from tests.support.orthanc import running_orthanc
from tests.support.ports import free_port
from tests.support.processes import ChildProcess
from tests.support.redis_server import RedisServer

WINDOW_S = 8.0  # how long each attack lasts at most
ECHO_DELAY_S = 1.0  # the legitimate echo starts this long into the attack
GIANT = b"\x01\x00\xff\xff\xff\xff"
TLS_WINDOW_S = 12.0  # the TLS attack lasts past the node's 10 s handshake deadline


@dataclass(frozen=True)
class Target:
    """A server under attack."""

    name: str
    port: int
    called: str
    pid: int
    accepts_deflate: bool
    cert: Path | None = None  # the server's certificate when it speaks TLS


@dataclass
class Result:
    growth_mb: float
    closed_s: float | None
    echo_s: float | None


def echo_seconds(target: Target) -> float | None:
    """dcmtk ``echoscu`` from 127.0.0.1; None if it did not get Success."""
    argv = ["echoscu", "-ta", "10", "-to", "10", "-aet", "ECHOSCU", "-aec", target.called]
    if target.cert is not None:
        argv += ["+tla", "+cf", str(target.cert)]
    started = time.monotonic()
    done = subprocess.run(
        [*argv, "127.0.0.1", str(target.port)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return time.monotonic() - started if done.returncode == 0 else None


def _giant(target: Target) -> float | None:
    sock = connect(target.port, "127.0.9.2")
    with contextlib.suppress(OSError):
        sock.sendall(GIANT)
    send_until_refused(sock, 64 << 20)
    closed = seconds_until_closed(sock, WINDOW_S)
    sock.close()
    return closed


def _many_giants(target: Target) -> float | None:
    def one(source: str) -> None:
        try:
            with connect(target.port, source) as sock:
                sock.sendall(GIANT)
                send_until_refused(sock, 8 << 20)
        except OSError:
            pass

    threads = [threading.Thread(target=one, args=(f"127.0.10.{n}",)) for n in range(2, 202)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WINDOW_S)
    return time.monotonic() - started if not any(t.is_alive() for t in threads) else None


def _partial(target: Target) -> float | None:
    sock = connect(target.port, "127.0.11.2")
    sock.sendall(associate_rq("ECHOSCU", target.called)[:6])
    closed = seconds_until_closed(sock, WINDOW_S)
    sock.close()
    return closed


def _pdata(target: Target) -> float | None:
    sock = connect(target.port, "127.0.12.2")
    sock.sendall(associate_rq("ECHOSCU", target.called, "1.2.840.10008.1.1"))
    reply = sock.recv(6)
    if not reply or reply[0] != 0x02:  # not an A-ASSOCIATE-AC
        sock.close()
        return 0.0
    with contextlib.suppress(OSError):
        sock.recv(65536)
        sock.sendall(b"\x04\x00\xff\xff\xff\xff")
    send_until_refused(sock, 64 << 20)
    closed = seconds_until_closed(sock, WINDOW_S)
    sock.close()
    return closed


def _silent_and_partial_tls(target: Target) -> float | None:
    """5 silent TCP connections and 3 TLS ones stopping 6 bytes into an A-ASSOCIATE-RQ, held
    for TLS_WINDOW_S; seconds until the first silent one was closed.  The handshakes run on
    threads, since a server busy with a silent connection may not answer them."""
    assert target.cert is not None
    context = ssl.create_default_context(cafile=str(target.cert))
    started = time.monotonic()
    silent = [connect(target.port, f"127.0.13.{n}") for n in range(2, 7)]
    partial: list[socket.socket] = []

    def one(source: str) -> None:
        with contextlib.suppress(OSError):
            sock = connect(target.port, source, tls=context, timeout=TLS_WINDOW_S)
            partial.append(sock)
            sock.sendall(associate_rq("ECHOSCU", target.called)[:6])

    threads = [threading.Thread(target=one, args=(f"127.0.14.{n}",)) for n in range(2, 5)]
    for thread in threads:
        thread.start()
    closed = seconds_until_closed(silent[0], TLS_WINDOW_S)
    time.sleep(max(0.0, started + TLS_WINDOW_S - time.monotonic()))
    for thread in threads:
        thread.join()
    NOTES[target.name] = f"{len(partial)}/3 attacker handshakes"
    for sock in [*silent, *partial]:
        sock.close()
    return closed


def _store(target: Target, path: Path, syntax: str) -> float | None:
    """Send the file's data set bytes unchanged (pynetdicom, chunked); seconds to the answer.

    The answer is printed as the note (status, or "no answer" when the connection closed).
    """
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CR_IMAGE_STORAGE, [syntax])
    _config.STORE_SEND_CHUNKED_DATASET = True
    started = time.monotonic()
    try:
        assoc = ae.associate("127.0.0.1", target.port, ae_title=target.called)
        if not assoc.is_established:
            NOTES[target.name] = "no association"
            return time.monotonic() - started
        response = assoc.send_c_store(path)
        NOTES[target.name] = f"0x{int(response.Status):04X}" if response else "no answer"
        if assoc.is_established:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return time.monotonic() - started


NOTES: dict[str, str] = {}


def run_attack(target: Target, attack: Callable[[Target], float | None]) -> Result:
    memory.reset_peak(target.pid)
    before = memory.rss(target.pid)
    echo: list[float | None] = []

    def legit() -> None:
        time.sleep(ECHO_DELAY_S)
        echo.append(echo_seconds(target))

    thread = threading.Thread(target=legit)
    thread.start()
    closed = attack(target)
    thread.join()
    growth = (memory.peak_rss(target.pid) - before) / (1 << 20)
    return Result(growth, closed, echo[0] if echo else None)


@contextlib.contextmanager
def storescp(workdir: Path, cert: Certificate | None = None) -> Iterator[Target]:
    port = free_port()
    out = workdir / ("storescp-tls" if cert else "storescp")
    out.mkdir()
    argv = ["storescp", "-aet", "STORESCP", "-ta", "3", "-ts", "3", "+xd", "-od", str(out)]
    if cert is not None:
        argv += ["+tls", str(cert.key), str(cert.cert), "-pw", "-ic"]
    with ChildProcess([*argv, str(port)]) as proc:
        deadline = time.monotonic() + 10
        trusted = cert.cert if cert else None
        target = Target("storescp", port, "STORESCP", proc.pid, True, trusted)
        while echo_seconds(target) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"storescp did not start:\n{proc.text()}")
        yield target


@contextlib.contextmanager
def servers(workdir: Path, redis_url: str, cert: Certificate | None) -> Iterator[list[Target]]:
    """Our node, storescp and Orthanc, with DICOM TLS when ``cert`` is given."""
    suffix = "-tls" if cert else ""
    trusted = cert.cert if cert else None
    node_tls: dict[str, object] = {}
    orthanc_tls: dict[str, object] = {}
    if cert is not None:
        node_tls = {"tls": {"cert_file": str(cert.cert), "key_file": str(cert.key)}}
        orthanc_tls = {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(cert.cert),
            "DicomTlsPrivateKey": str(cert.key),
            "DicomTlsTrustedCertificates": str(cert.cert),
            "DicomTlsRemoteCertificateRequired": False,
        }
    with contextlib.ExitStack() as stack:
        node_dir = workdir / f"node{suffix}"
        node_dir.mkdir()
        data = hostile_config(node_dir, redis_url, node=node_tls)
        node = stack.enter_context(hostile_node(data, node_dir))
        targets = [
            Target("coronet node", node.port, "CORONET", node.pid, True, trusted),
            stack.enter_context(storescp(workdir, cert)),
        ]
        pacs = stack.enter_context(
            running_orthanc(workdir / f"orthanc{suffix}", aet="ORTHANC", extra_config=orthanc_tls)
        )
        targets.append(Target("Orthanc", pacs.dicom_port, "ORTHANC", pacs.pid, True, trusted))
        yield targets


def _rows(attacks: dict[str, Callable[[Target], float | None]], targets: list[Target]) -> None:
    for name, attack in attacks.items():
        for target in targets:
            if target.cert is not None and echo_seconds(target) is None:
                print(f"{name:<40} {target.name:<14} no TLS", flush=True)
                continue
            result = run_attack(target, attack)
            print(
                f"{name:<40} {target.name:<14} {result.growth_mb:>9.1f}MB "
                f"{_format(result.closed_s, ' s', 'open'):>13} "
                f"{_format(result.echo_s, ' s', 'refused'):>11}  "
                f"{NOTES.pop(target.name, '')}",
                flush=True,
            )
            time.sleep(4)  # let deadlines of the previous attack pass


def _format(value: float | None, unit: str, missing: str) -> str:
    return missing if value is None else f"{value:.2f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="coronet-hostile-"))
    try:
        big = workdir / "big-element.dcm"
        with_private_element(RG1_UNCR, big, 250 << 20)
        bomb = deflate_bomb(workdir / "bomb.dcm", 800 << 20)
        attacks: dict[str, Callable[[Target], float | None]] = {
            "giant A-ASSOCIATE-RQ (4 GB declared)": _giant,
            "200 giant requests at once": _many_giants,
            "partial A-ASSOCIATE-RQ, then silence": _partial,
            "P-DATA-TF declaring 4 GB": _pdata,
            "250 MB element before Pixel Data": lambda t: _store(t, big, ExplicitVRLittleEndian),
            "deflate bomb (800 MB inflated)": lambda t: _store(
                t, bomb, DeflatedExplicitVRLittleEndian
            ),
        }
        tls_attacks: dict[str, Callable[[Target], float | None]] = {
            "TLS: 5 silent + 3 partial, then echo": _silent_and_partial_tls,
        }
        with RedisServer(workdir / "redis") as redis:
            print(f"{'attack':<40} {'server':<14} {'RSS growth':>11} {'closed after':>13} "
                  f"{'legit echo':>11}  answer")  # fmt: skip
            with servers(workdir, redis.url, None) as targets:
                _rows(attacks, targets)
            with servers(workdir, redis.url, make_certificate(workdir / "tls")) as targets:
                _rows(tls_attacks, targets)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
