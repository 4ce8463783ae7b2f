"""Suite-wide set-up and the fixtures shared by several test modules.

Helpers that are not fixtures live in ``tests/support/``.  Everything talks to real peers on
127.0.0.1: a real ``redis-server``, the node itself, dcmtk's tools, Orthanc.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.certificates import Certificate, make_certificate
from tests.support.redis_server import RedisServer

# The tests run torch in this process and in the workers, nodes and tools they start, on few
# cores, so torch's threads oversubscribe the CPU.  Spinning OpenMP threads then slow every
# process down several times over; sleeping ones do not (see docs/benchmarks.md).  The child
# processes inherit the setting.  torch is imported after this module, by the test modules.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for localhost and 127.0.0.1 (its own CA)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))
