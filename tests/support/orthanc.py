"""A real Orthanc (Debian package, ``/usr/sbin/Orthanc``) for tests, on loopback ports.

Usage::

    from tests.support.orthanc import Modality, running_orthanc

    with running_orthanc(tmp_path, aet="PACS",
                         modalities={"node": Modality("CORONET", 11112)}) as pacs:
        ...  # send to ("127.0.0.1", pacs.dicom_port, pacs.aet)
        study_ids = pacs.find_studies(study_instance_uid)
        series = pacs.study_series(study_ids[0])

:func:`running_orthanc` writes its own JSON configuration (only that file is passed, so no
system configuration or plugins are loaded), picks free ports, starts Orthanc, waits until
``GET /system`` answers and the DICOM port accepts connections (polling, never a fixed
sleep), yields an :class:`OrthancServer` and stops Orthanc on exit.  HTTP accepts loopback
clients only (``RemoteAccessAllowed`` false); Orthanc 1.10 has no option to bind its DICOM
port to one interface, so tests must connect to it on 127.0.0.1 only.

:class:`OrthancServer` has small REST helpers: ``studies()``, ``series()``,
``instances()``, ``find_studies(study_uid)`` (``/tools/find``), ``study_series(id)``,
``study_instances(id)``, ``instance_tags(id)`` and ``download_instance(id)``, plus
``get_json``/``post_json``/``get_bytes`` for anything else.  Set ``credentials`` to turn
HTTP authentication on; the helpers then send them.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.polling import wait_until
from tests.support.ports import free_ports
from tests.support.processes import ChildProcess

ORTHANC_BINARY = "/usr/sbin/Orthanc"
LOOPBACK = "127.0.0.1"
#: Seconds to wait for Orthanc to answer after it was started.
STARTUP_TIMEOUT_S = 30.0
#: Seconds to wait for Orthanc to exit after SIGTERM before killing it.
SHUTDOWN_TIMEOUT_S = 15.0
#: Seconds between readiness polls (each poll also checks that Orthanc is still alive).
POLL_INTERVAL_S = 0.1
HTTP_TIMEOUT_S = 30.0

# Loopback only: never route test traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancError(RuntimeError):
    """Orthanc could not be started, or a REST call failed."""


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc knows (``DicomModalities``), e.g. the node under test."""

    aet: str
    port: int
    host: str = LOOPBACK


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc: its addresses, files and REST helpers."""

    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    log_path: Path
    credentials: tuple[str, str] | None = None
    host: str = LOOPBACK
    pid: int = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    # -- raw REST ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.credentials is not None:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with _OPENER.open(request, timeout=HTTP_TIMEOUT_S) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise OrthancError(f"{method} {path} -> HTTP {err.code}: {detail}") from err

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def get_json(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        return json.loads(self._request("POST", path, json.dumps(payload).encode()))

    # -- resources --------------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        """``GET /system``: version, AET and ports."""
        result: dict[str, Any] = self.get_json("/system")
        return result

    def studies(self) -> list[str]:
        """Orthanc identifiers of all studies."""
        return list(self.get_json("/studies"))

    def series(self) -> list[str]:
        """Orthanc identifiers of all series."""
        return list(self.get_json("/series"))

    def instances(self) -> list[str]:
        """Orthanc identifiers of all instances."""
        return list(self.get_json("/instances"))

    def find_studies(self, study_instance_uid: str) -> list[str]:
        """Orthanc identifiers of the studies with this StudyInstanceUID (``/tools/find``)."""
        query = {"Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid}}
        return list(self.post_json("/tools/find", query))

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """Series resources (with ``MainDicomTags``) of an Orthanc study."""
        return list(self.get_json(f"/studies/{study_id}/series"))

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """Instance resources (with ``MainDicomTags``) of an Orthanc study."""
        return list(self.get_json(f"/studies/{study_id}/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``keyword -> value`` tags of an instance (``/simplified-tags``)."""
        result: dict[str, Any] = self.get_json(f"/instances/{instance_id}/simplified-tags")
        return result

    def download_instance(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        return self.get_bytes(f"/instances/{instance_id}/file")


def orthanc_config(
    workdir: Path,
    *,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Mapping[str, Modality] | None = None,
    lua_scripts: Sequence[Path] = (),
    credentials: tuple[str, str] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration :func:`running_orthanc` writes; ``extra_config`` overrides keys."""
    storage = workdir / "storage"
    config: dict[str, Any] = {
        "Name": f"test-{aet}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "Plugins": [],
        "LuaScripts": [str(Path(p).resolve()) for p in lua_scripts],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": credentials is not None,
        "RegisteredUsers": dict([credentials]) if credentials is not None else {},
        "HttpDescribeErrors": True,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "MetricsEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {
            name: [m.aet, m.host, m.port] for name, m in (modalities or {}).items()
        },
        "DicomThreadsCount": 2,
        "HttpThreadsCount": 4,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "StableAge": 1,
    }
    config.update(extra_config or {})
    return config


@contextlib.contextmanager
def running_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, Modality] | None = None,
    lua_scripts: Sequence[Path] = (),
    credentials: tuple[str, str] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[OrthancServer]:
    """Start Orthanc in ``workdir`` (created if needed), yield it ready, stop it on exit."""
    if not Path(ORTHANC_BINARY).exists() and shutil.which("Orthanc") is None:
        raise OrthancError(f"{ORTHANC_BINARY} is not installed (run `make system-deps`)")
    binary = ORTHANC_BINARY if Path(ORTHANC_BINARY).exists() else "Orthanc"
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_ports(2)
    config = orthanc_config(
        workdir,
        aet=aet,
        dicom_port=dicom_port,
        http_port=http_port,
        modalities=modalities,
        lua_scripts=lua_scripts,
        credentials=credentials,
        extra_config=extra_config,
    )
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    server = OrthancServer(
        aet=aet,
        dicom_port=dicom_port,
        http_port=http_port,
        workdir=workdir,
        log_path=log_path,
        credentials=credentials,
    )
    with ChildProcess(
        [binary, "--no-jobs", f"--logfile={log_path}", str(config_path)], cwd=workdir
    ) as proc:
        wait_until(
            lambda: _ready(server, proc), startup_timeout_s, "Orthanc to answer", POLL_INTERVAL_S
        )
        yield dataclasses.replace(server, pid=proc.pid)


def _ready(server: OrthancServer, proc: ChildProcess) -> bool:
    if not proc.alive():
        raise OrthancError(f"Orthanc exited; output:\n{proc.text()}{_tail(server.log_path)}")
    return _http_ready(server) and _port_open(server.host, server.dicom_port)


def _http_ready(server: OrthancServer) -> bool:
    try:
        server.system()
    except (OSError, OrthancError):
        return False
    return True


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
