"""A real ``coronet node serve`` process with small limits and short deadlines, for attacks.

Deadlines are seconds, not minutes, so that the tests of them stay fast; the limits are small
enough to be broken cheaply.  Memory is read from ``/proc/PID/status`` of the node process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE

from tests.support import memory
from tests.support.dicom_data import CR_IMAGE_STORAGE, EXPLICIT_LE, VERIFICATION
from tests.support.processes import ChildProcess
from tests.support.settings import NODE_AET, node_data, write_config

ACSE_TIMEOUT_S = 3.0
NETWORK_TIMEOUT_S = 3.0
MB = 1 << 20
LIMITS: dict[str, int] = {
    "max_associate_request_bytes": 64 * 1024,
    "max_pending_connections": 16,
    "max_pending_per_peer": 3,
    "max_instance_bytes": 32 * MB,
    "max_element_bytes": 1 * MB,
    "max_inflated_bytes": 64 * MB,
}
#: RSS growth allowed for any one attack.
MAX_GROWTH = 64 * MB


def hostile_config(tmp_path: Path, broker_url: str, **sections: Any) -> dict[str, Any]:
    """Node configuration data with the limits above (``sections`` are merged in)."""
    node = {
        "timeouts": {"acse": ACSE_TIMEOUT_S, "dimse": 30, "network": NETWORK_TIMEOUT_S},
        "limits": dict(LIMITS),
        "accept_deflate": True,
        "max_associations": 4,
    }
    node.update(sections.pop("node", {}))
    callers = [{"ae_title": title} for title in ("SCU", "STORESCU", "ECHOSCU")]
    return node_data(tmp_path, broker_url, node=node, callers=callers, **sections)


@dataclass
class Growth:
    """Peak RSS growth of the node during a ``with`` block, in bytes."""

    before: int = 0
    peak: int = 0

    @property
    def bytes(self) -> int:
        return self.peak - self.before


@dataclass
class HostileNode:
    """The node process and what the tests ask of it."""

    process: ChildProcess
    port: int
    spool_dir: Path
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def temp_dir(self) -> Path:
        return self.spool_dir / "tmp"

    @contextlib.contextmanager
    def growth(self) -> Iterator[Growth]:
        """Measure the node's peak RSS growth over the block (VmHWM reset first)."""
        memory.reset_peak(self.pid)
        result = Growth(before=memory.rss(self.pid))
        try:
            yield result
        finally:
            result.peak = memory.peak_rss(self.pid)

    def echo_seconds(self, calling: str = "ECHOSCU", tls: Any = None) -> float:
        """Seconds a legitimate C-ECHO took; fails if it was not answered Success."""
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(VERIFICATION)
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET, tls_args=tls)
        assert assoc.is_established, "a legitimate caller was not associated"
        status = assoc.send_c_echo().Status
        assoc.release()
        assert status == 0x0000
        return time.monotonic() - started

    def store(self, path: Path | Dataset, contexts: list[str] | None = None) -> Any:
        """C-STORE ``path`` (a file or a data set) in its own association; returns the
        response (empty when the association was lost)."""
        ae = AE(ae_title="SCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for syntax in contexts or [EXPLICIT_LE]:
            ae.add_requested_context(CR_IMAGE_STORAGE, [syntax])
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
        assert assoc.is_established
        response = assoc.send_c_store(path)
        if assoc.is_established:
            assoc.release()
        return response

    def store_dataset(self, dataset: Dataset) -> Any:
        """C-STORE ``dataset`` as pynetdicom encodes it."""
        return self.store(dataset)

    def connections(self) -> list[str]:
        """Peer addresses of the TCP connections established to the node's port."""
        peers = []
        for row in Path("/proc/net/tcp").read_text(encoding="ascii").splitlines()[1:]:
            fields = row.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state != "01" or int(local.split(":")[1], 16) != self.port:  # 01: ESTABLISHED
                continue
            address = bytes.fromhex(remote.split(":")[0])[::-1]  # little-endian hex
            peers.append(".".join(str(b) for b in address))
        return peers

    def wait_quiet(self, timeout: float = 10.0) -> None:
        """Wait until no connection to the node is left over from an earlier test."""
        deadline = time.monotonic() + timeout
        while self.connections():
            assert time.monotonic() < deadline, f"connections left: {self.connections()}"
            time.sleep(0.05)

    def temp_files(self) -> list[Path]:
        return sorted(self.temp_dir.iterdir()) if self.temp_dir.is_dir() else []


@contextlib.contextmanager
def hostile_node(data: dict[str, Any], workdir: Path) -> Iterator[HostileNode]:
    """Start ``coronet -v node serve`` with ``data`` and wait until it listens."""
    config = write_config(workdir / "hostile-node.yaml", data)
    with ChildProcess.coronet(
        ["-v", "node", "serve", "--config", str(config)], cwd=workdir
    ) as proc:
        proc.wait_for_line("listening on")
        yield HostileNode(proc, int(data["node"]["port"]), Path(data["storage"]["spool_dir"]), data)
