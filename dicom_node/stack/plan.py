"""The plan of one ``coronet run``: ports, folders, and the configuration the children read.

The given configuration file and overrides are loaded once; the broker URL is pointed at our
Redis and, with the demo Orthanc, the destinations are replaced by it and it is allowed as a
caller.  The result is written to ``<var>/run/coronet.yaml``, which the node and the worker read.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import Settings, load_settings, settings_from_data

LOOPBACK: Final = "127.0.0.1"
ORTHANC_MODALITY: Final = "coronet"
"""Name of the node in Orthanc's ``DicomModalities``; the Lua script routes to it."""
DEMO_DESTINATION: Final = "demo-pacs"
DEFAULT_ORTHANC_AET: Final = "ORTHANC"
PREFERRED_ORTHANC_PORTS: Final = (4242, 8042)
LUA_SCRIPT: Final = Path("configs/orthanc/autoroute.lua")


@dataclass(frozen=True)
class RunOptions:
    """What ``coronet run`` was asked for."""

    config: Path
    overrides: list[str] = field(default_factory=list)
    orthanc: bool = True
    var_dir: Path = Path("var")
    redis_port: int | None = None
    worker_args: list[str] = field(default_factory=list)


def port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _pick_port(preferred: int, taken: set[int]) -> int:
    port = preferred if preferred not in taken and port_free(preferred) else free_port()
    while port in taken:
        port = free_port()
    taken.add(port)
    return port


def lua_script_path() -> Path:
    """The auto-routing script: next to the sources (checkout) or under the current folder."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = base / LUA_SCRIPT
        if candidate.is_file():
            return candidate
    raise ConfigError(f"cannot find {LUA_SCRIPT} (run from the repository root)")


@dataclass(frozen=True)
class Plan:
    """Ports, folders and the effective configuration of one ``coronet run``."""

    settings: Settings
    config_path: Path
    var_dir: Path
    redis_port: int
    orthanc_aet: str | None
    orthanc_dicom_port: int | None
    orthanc_http_port: int | None
    admin_port: int | None = None

    @property
    def broker_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    @property
    def admin_url(self) -> str | None:
        """The admin console's address, when the node serves one."""
        admin = self.settings.admin
        if not admin.enabled or self.admin_port is None:
            return None
        host = LOOPBACK if admin.host in ("0.0.0.0", "::") else admin.host
        return f"{'https' if admin.tls else 'http'}://{host}:{self.admin_port}/"

    @property
    def orthanc_web(self) -> str | None:
        if self.orthanc_http_port is None:
            return None
        return f"http://{LOOPBACK}:{self.orthanc_http_port}/app/explorer.html"


def effective_data(
    settings: Settings,
    broker_url: str,
    orthanc: tuple[str, int] | None,
) -> dict[str, Any]:
    """The configuration the children read: our broker and, with Orthanc, our demo PACS."""
    data = settings.model_dump(mode="json")
    data["broker"]["url"] = broker_url
    if orthanc is not None:
        aet, port = orthanc
        data["destinations"] = [
            {"name": DEMO_DESTINATION, "ae_title": aet, "host": LOOPBACK, "port": port}
        ]
        callers = [c for c in data["callers"] if c["ae_title"] != aet]
        data["callers"] = [*callers, {"ae_title": aet, "host": LOOPBACK}]
    return data


def make_plan(options: RunOptions) -> Plan:
    """Load the configuration, choose ports and write the effective configuration."""
    settings = load_settings(options.config, options.overrides)
    var_dir = options.var_dir
    for sub in ("run", "log", "redis"):
        (var_dir / sub).mkdir(parents=True, exist_ok=True)
    taken = {settings.node.port}
    redis_port = options.redis_port or free_port()
    while redis_port in taken:
        redis_port = free_port()
    taken.add(redis_port)
    orthanc_aet = dicom_port = http_port = None
    if options.orthanc:
        orthanc_aet = (
            settings.destinations[0].ae_title if settings.destinations else DEFAULT_ORTHANC_AET
        )
        dicom_port = _pick_port(PREFERRED_ORTHANC_PORTS[0], taken)
        http_port = _pick_port(PREFERRED_ORTHANC_PORTS[1], taken)
    broker_url = f"redis://{LOOPBACK}:{redis_port}/0"
    orthanc = (orthanc_aet, dicom_port) if orthanc_aet and dicom_port else None
    admin_port = _pick_port(settings.admin.port, taken) if settings.admin.enabled else None
    data = effective_data(settings, broker_url, orthanc)
    if admin_port is not None:
        data["admin"]["port"] = admin_port
    data["fetch"]["cache_dir"] = str(var_dir / "fetch-cache")
    config_path = var_dir / "run" / "coronet.yaml"
    effective = settings_from_data(data, str(config_path))
    header = f"# Written by `coronet run` from {options.config}; edit that file instead.\n"
    config_path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return Plan(
        effective, config_path, var_dir, redis_port, orthanc_aet, dicom_port, http_port, admin_port
    )


def orthanc_configuration(plan: Plan, lua: Path) -> dict[str, Any]:
    """Orthanc's JSON configuration for the demo PACS (loopback HTTP, Lua auto-routing)."""
    node = plan.settings.node
    storage = (plan.var_dir / "orthanc" / "db").resolve()
    return {
        "Name": "CoroNet demo PACS",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [],
        "LuaScripts": [str(lua.resolve())],
        "HttpServerEnabled": True,
        "HttpPort": plan.orthanc_http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": True,
        "HttpDescribeErrors": True,
        "DicomServerEnabled": True,
        "DicomAet": plan.orthanc_aet,
        "DicomPort": plan.orthanc_dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {ORTHANC_MODALITY: [node.ae_title, LOOPBACK, node.port]},
        "StableAge": 2,
        "ConcurrentJobs": 2,
        "SaveJobs": False,
    }
