"""Hosts made of Linux namespaces, for tests and benchmarks that need several machines.

    with HostNetwork(["node", "w1", "w2"]) as net:
        argv = net.host("w1").argv(["coronet", "worker", ...], empty=[spool_dir])

Each host is a network namespace of its own (``ip netns``) with loopback up; the first one is
the hub: it holds a bridge, and every other host is wired to it by a veth pair.  Addresses come
from 198.18.0.0/24 (RFC 2544's benchmarking range, never routed), the hub at ``198.18.0.1``.
Nothing leaves the namespaces: they have no route out, and the test's own network is untouched.
A host's command may also run in a mount namespace of its own in which given folders are
empty (a tmpfs mounted over them), so that it cannot see the files the other hosts see there.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), ``ip`` (iproute2) and ``unshare`` (util-linux);
everything it made is removed when the ``with`` block ends, even after a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CLONE_NEWNET = 0x40000000
SUBNET = "198.18.0"
PREFIX = 24
TOOLS = ("ip", "unshare")


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def check_can_make_hosts() -> None:
    """Fail (never skip) when this process cannot make namespaces."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise AssertionError(f"missing tools for network namespaces: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise AssertionError("network namespaces need root (the tests run as root in CI)")


@dataclass(frozen=True)
class Host:
    """One namespace host: its name, its address on the test network."""

    name: str
    namespace: str
    address: str

    def argv(self, command: Sequence[str], *, empty: Sequence[Path] = ()) -> list[str]:
        """``command`` run on this host; with ``empty``, in a mount namespace where those
        folders are empty (and anything written there stays in this host)."""
        prefix = ["ip", "netns", "exec", self.namespace]
        if not empty:
            return [*prefix, *command]
        mounts = " && ".join(f"mkdir -p '{p}' && mount -t tmpfs tmpfs '{p}'" for p in empty)
        script = f'{mounts} && exec "$@"'
        return [
            *prefix,
            *("unshare", "--mount", "--propagation", "private", "--"),
            *("sh", "-c", script, "host"),
            *command,
        ]

    def pids(self) -> list[int]:
        """Every process in this host's network namespace."""
        result = subprocess.run(
            ["ip", "netns", "pids", self.namespace], capture_output=True, text=True, timeout=30
        )
        return [int(p) for p in result.stdout.split()]


class HostNetwork:
    """Namespaces wired to a hub (see the module docstring)."""

    def __init__(self, names: Sequence[str]) -> None:
        if not names or len(names) > 200:
            raise ValueError("between 1 and 200 hosts")
        tag = secrets.token_hex(3)
        self.hosts = [
            Host(name, f"cn{tag}-{name}"[:15], f"{SUBNET}.{1 if i == 0 else 9 + i}")
            for i, name in enumerate(names)
        ]
        self._tag = tag
        self._made: list[str] = []

    @property
    def hub(self) -> Host:
        return self.hosts[0]

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def __enter__(self) -> HostNetwork:
        check_can_make_hosts()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        for host in self.hosts:
            _run("ip", "netns", "add", host.namespace)
            self._made.append(host.namespace)
            _run("ip", "-n", host.namespace, "link", "set", "lo", "up")
        hub = self.hub.namespace
        _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", hub, "addr", "add", f"{self.hub.address}/{PREFIX}", "dev", "br0")
        _run("ip", "-n", hub, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts[1:], start=1):
            near, far = f"cn{self._tag}h{index}", f"cn{self._tag}p{index}"
            _run("ip", "link", "add", near, "type", "veth", "peer", "name", far)
            _run("ip", "link", "set", near, "netns", hub)
            _run("ip", "link", "set", far, "netns", host.namespace)
            _run("ip", "-n", hub, "link", "set", near, "master", "br0")
            _run("ip", "-n", hub, "link", "set", near, "up")
            _run("ip", "-n", host.namespace, "link", "set", far, "name", "eth0")
            _run(
                "ip", "-n", host.namespace, "addr", "add", f"{host.address}/{PREFIX}", "dev", "eth0"
            )
            _run("ip", "-n", host.namespace, "link", "set", "eth0", "up")

    def close(self) -> None:
        """Remove every namespace made (their links go with them); processes left in one are
        killed first."""
        for namespace in reversed(self._made):
            host = next(h for h in self.hosts if h.namespace == namespace)
            for pid in host.pids():
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    continue
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        self._made.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(host: Host) -> Iterator[None]:
    """Run this thread, and the threads and processes it starts meanwhile, on ``host``'s
    network (a benchmark that runs the node's side itself joins the hub this way)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/var/run/netns/{host.namespace}")
        try:
            yield
        finally:
            _setns(f"/proc/self/fd/{own}")
    finally:
        os.close(own)


__all__ = ["Host", "HostNetwork", "check_can_make_hosts", "entered"]
