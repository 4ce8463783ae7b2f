"""The one settings builder: configuration for a node and worker on free loopback ports,
with every folder under the test's own temporary directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dicom_node.core.settings import Settings, settings_from_data
from tests.support.ports import free_port

NODE_AET = "CORONET"
SCU_AET = "SCU"

DEFAULT_CALLERS = [
    {"ae_title": "STORESCU", "host": "127.0.0.1"},
    {"ae_title": "ECHOSCU", "host": "127.0.0.1"},
    {"ae_title": SCU_AET, "host": "localhost"},
    {"ae_title": "ORTHANC", "host": "127.0.0.1"},
]


def node_data(tmp_path: Path, broker_url: str, **sections: Any) -> dict[str, Any]:
    """Plain configuration data for a node on a free port, spooling under ``tmp_path``."""
    data: dict[str, Any] = {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": free_port()},
        "callers": list(DEFAULT_CALLERS),
        "storage": {"spool_dir": str(tmp_path / "spool"), "outbox_dir": str(tmp_path / "out")},
        "broker": {"url": broker_url, "queue": "coronet"},
        "grouping": {"mode": "study", "quiet_seconds": 0.1},
        "admin": {
            "port": free_port(),
            "users_file": str(tmp_path / "admin" / "users"),
            "secret_file": str(tmp_path / "admin" / "secret"),
        },
        "audit": {"sink": "file", "file": str(tmp_path / "audit" / "audit.log")},
        "fetch": {"cache_dir": str(tmp_path / "fetch-cache")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def node_settings(tmp_path: Path, broker_url: str, **sections: Any) -> Settings:
    """:func:`node_data` as validated settings."""
    return settings_from_data(node_data(tmp_path, broker_url, **sections))


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as a YAML configuration file at ``path``."""
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
