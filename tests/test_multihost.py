"""Three hosts made of Linux namespaces (``tests.support.netns``): the node, Redis and a
``storescp`` PACS on one; a worker on each of the two others, in a mount namespace in which the
node's spool folder is empty, so the workers can only fetch.  A burst of 12 studies is sent and
one worker host, a batching one (``--batch 2``), is killed (kill -9, every process in its
namespace) while it works; every study must get exactly one SR SOP Instance UID at the PACS,
and nothing may stay queued, unacknowledged or pending on the node.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

import monai_bundle
from dicom_node.core.outbox import Outbox
from dicom_node.core.spool import Spool
from tests.support.netns import Host, HostNetwork
from tests.support.polling import wait_until
from tests.support.processes import ChildProcess
from tests.support.results import phantom_source
from tests.support.settings import write_config

pytestmark = pytest.mark.integration

BUNDLE = Path(monai_bundle.__file__).resolve().parent
STUDIES = 12
REDIS_PORT, NODE_PORT, ADMIN_PORT, PACS_PORT = 6379, 11112, 8480, 4242
#: Short limits, so that the killed host's message comes back within the test.
WORKER_OPTIONS = (
    *("--threads", "1", "--heatmap", "off", "--loglevel", "INFO"),
    *("--time-limit", "20", "--visibility-timeout", "25"),
    *("--retry-backoff", "0.5", "--retry-backoff-max", "5"),
)
#: w1, the host that is killed, runs a batching worker (two tasks at once in one process, their
#: images analysed together); w2 a prefork worker with one process.
HOST_OPTIONS = {"w1": ("--batch", "2"), "w2": ("--concurrency", "1")}


def _data(folder: Path, hub: Host, name: str) -> dict[str, Any]:
    """The configuration of the node (``name`` node) or of a worker host."""
    own = folder / name
    return {
        "node": {"ae_title": "CORONET", "host": "0.0.0.0", "port": NODE_PORT},
        "callers": [{"ae_title": "STORESCU", "host": hub.address}],
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": hub.address, "port": PACS_PORT}
        ],
        # The same spool path everywhere: the node's folder, empty on the worker hosts.
        "storage": {"spool_dir": str(folder / "node" / "spool"), "outbox_dir": str(own / "out")},
        "broker": {"url": f"redis://{hub.address}:{REDIS_PORT}/0", "queue": "coronet"},
        "model": {"bundle_dir": str(BUNDLE), "device": "cpu"},
        "grouping": {"mode": "study", "quiet_seconds": 0.2},
        "admin": {
            "host": "0.0.0.0",
            "port": ADMIN_PORT,
            "allow_plain_http": True,  # the test's own network, which nothing else reaches
            "users_file": str(own / "admin" / "users"),
            "secret_file": str(own / "admin" / "secret"),
            "worker_timeout": 0,
        },
        "fetch": {
            "url": f"http://{hub.address}:{ADMIN_PORT}",
            "direct_spool": True,  # allowed, but the spool they see is not the node's
            "cache_dir": str(own / "cache"),
            "timeout": 5,
        },
        "audit": {"sink": "file", "file": str(own / "audit.log")},
    }


def _on(host: Host, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.argv(argv), capture_output=True, text=True, timeout=60)


def _srs_by_study(pacs: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in pacs.iterdir():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # still being written
            continue
        if ds.SOPClassUID == Comprehensive3DSRStorage:
            found.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return found


@pytest.fixture(name="net")
def net_fixture() -> Iterator[HostNetwork]:
    with HostNetwork(["node", "w1", "w2"]) as net:
        yield net


def test_two_worker_hosts_without_the_spool_one_killed_mid_burst(
    net: HostNetwork, tmp_path: Path
) -> None:
    hub = net.hub
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    node_config = write_config(tmp_path / "node.yaml", _data(tmp_path, hub, "node"))
    processes: list[ChildProcess] = []

    def start(host: Host, argv: list[str], **kwargs: Any) -> ChildProcess:
        process = ChildProcess(host.argv(argv, **kwargs), cwd=tmp_path)
        processes.append(process)
        return process

    coronet = [sys.executable, "-m", "dicom_node.cli"]
    try:
        redis = start(
            hub,
            [
                *("redis-server", "--save", "", "--appendonly", "no", "--port", str(REDIS_PORT)),
                *("--bind", hub.address, "--protected-mode", "no"),
            ],
        )
        redis.wait_for_line("Ready to accept connections", 30)
        start(hub, ["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(PACS_PORT)])
        node = start(hub, [*coronet, "-v", "node", "serve", "--config", str(node_config)])
        node.wait_for_line("listening on", 60)
        workers = {}
        for name in ("w1", "w2"):
            config = write_config(tmp_path / f"{name}.yaml", _data(tmp_path, hub, name))
            workers[name] = start(
                net.host(name),
                [*coronet, "worker", "--config", str(config), *WORKER_OPTIONS, *HOST_OPTIONS[name]],
                empty=[tmp_path / "node" / "spool"],
            )
        for worker in workers.values():
            worker.wait_for(lambda out: "loaded on" in out and " ready." in out, "a worker", 180)
        wait_until(
            lambda: (
                _on(hub, "echoscu", "-aec", "PACS", hub.address, str(PACS_PORT)).returncode == 0
            ),
            30,
            "the PACS",
        )

        inputs = []
        for i in range(STUDIES):
            path = tmp_path / "in" / f"{i:02d}.dcm"
            phantom_source(path, study_uid=generate_uid(), seed=i)
            inputs.append(path)
        study_uids = {str(pydicom.dcmread(p).StudyInstanceUID) for p in inputs}
        burst = start(
            hub,
            [
                *("storescu", "-aet", "STORESCU", "-aec", "CORONET", hub.address),
                *(str(NODE_PORT), *map(str, inputs)),
            ],
        )
        # kill -9 every process of host w1 while it works: two tasks received and one more
        # received or finished, so tasks are in flight in its threads.
        workers["w1"].wait_for(
            lambda out: out.count("coronet.process_study[") >= 3, "w1 to work", 60
        )
        delivered_before = len(_srs_by_study(pacs_dir))
        for pid in net.host("w1").pids():
            subprocess.run(["kill", "-9", str(pid)], check=False, timeout=10)
        assert burst.wait(60) == 0, burst.text()
        assert delivered_before < STUDIES  # the kill came mid-burst

        wait_until(
            lambda: set(_srs_by_study(pacs_dir)) >= study_uids,
            150,
            "an SR for every study at the PACS",
            interval=0.5,
        )
        spool = Spool(tmp_path / "node" / "spool")
        wait_until(lambda: not spool.pending_studies(), 60, "nothing pending on the node")
        srs = _srs_by_study(pacs_dir)
        assert {uid: len(srs[uid]) for uid in study_uids} == dict.fromkeys(study_uids, 1)
        assert not Outbox(tmp_path / "node" / "out").dead_sources()
        for command in (("LLEN", "coronet"), ("HLEN", "unacked")):
            # A task is acknowledged after it told the node it is done (acks_late): poll.
            def empty(command: tuple[str, str] = command) -> bool:
                answer = _on(hub, "redis-cli", "-h", hub.address, "-p", str(REDIS_PORT), *command)
                return answer.stdout.strip() == "0"

            wait_until(empty, 30, f"{' '.join(command)} to be 0", interval=0.5)
        audit = (tmp_path / "node" / "audit.log").read_text()
        for name in ("w1", "w2"):  # both hosts fetched over the test network
            assert f'NetworkAccessPointID="{net.host(name).address}"' in audit, name
    finally:
        for process in reversed(processes):
            process.stop(timeout=10)
