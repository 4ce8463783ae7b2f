"""docker-compose.yml and docker-compose.worker.yml against the Compose Specification, the real
CLI and configuration (no Docker engine runs here).

Both files are validated against the Compose Specification's JSON schema (vendored in
``tests/data``, see its README) and parsed with PyYAML: every command of our image must parse
with the ``coronet`` parser, the mounted configuration must exist and validate, and the ports,
AE titles, queue and Lua script must agree between the compose file, the node's configuration
and Orthanc's.  No worker shares a volume with the node: workers fetch their instances.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dicom_node.cli import build_parser
from dicom_node.core.settings import Settings, load_settings
from dicom_node.stack.plan import ORTHANC_MODALITY
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
WORKER_COMPOSE = ROOT / "docker-compose.worker.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
IMAGE_SERVICES = ("node", "worker-gpu", "worker-cpu")
CONFIG_IN_CONTAINER = "/etc/coronet/node.yaml"
#: A project name (the Compose Specification, "name" top-level element).
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def worker_compose() -> dict[str, Any]:
    return _load(WORKER_COMPOSE)


@pytest.mark.parametrize("path", [COMPOSE, WORKER_COMPOSE], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    data = _load(path)
    assert PROJECT_NAME.match(data.pop("name"))  # newer than the vendored schema (README)
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, errors
    broken = {**data, "services": {"node": {"image": "x", "no_such_key": 1}}}
    assert not validator.is_valid(broken)  # the schema does refuse what Compose refuses


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service = compose["services"][name]
    assert isinstance(service, dict)
    return service


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the bind mounts (named volumes are skipped)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = ROOT / source
    return mounts


def _settings(compose: dict[str, Any]) -> Settings:
    host_path = _mounts(_service(compose, "node"))[CONFIG_IN_CONTAINER]
    return load_settings(host_path, environ={})


def _orthanc_config(compose: dict[str, Any]) -> dict[str, Any]:
    orthanc = _service(compose, "orthanc")
    config_target = orthanc["command"][-1]
    config: dict[str, Any] = json.loads(_mounts(orthanc)[config_target].read_text())
    return config


def _published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> published port."""
    ports = {}
    for mapping in service.get("ports", []):
        parts = str(mapping).split(":")
        ports[int(parts[-1])] = int(parts[-2])
    return ports


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "orthanc", *IMAGE_SERVICES}
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_commands_parse_with_the_cli(compose: dict[str, Any], name: str) -> None:
    command = _service(compose, name)["command"]
    assert command[0] == "coronet"
    args = build_parser().parse_args(command[1:])
    assert args.config == Path(CONFIG_IN_CONTAINER)
    assert CONFIG_IN_CONTAINER in _mounts(_service(compose, name))


def _named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """Named volume -> container path."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith("."):
            found[source] = target
    return found


def test_mounted_config_validates_and_matches_the_services(compose: dict[str, Any]) -> None:
    settings = _settings(compose)
    node = _service(compose, "node")
    assert settings.node.host == "0.0.0.0"
    assert _published(node)[settings.node.port] == settings.node.port
    assert settings.broker.url.startswith("redis://redis:")  # the Compose service
    assert settings.storage.spool_dir.is_absolute() and settings.storage.outbox_dir.is_absolute()
    node_volumes = _named_volumes(node)
    assert any(str(settings.storage.spool_dir).startswith(t) for t in node_volumes.values())
    # The workers fetch from the node's admin service and share no volume with the node.
    assert settings.fetch.url == f"http://node:{settings.admin.port}"
    for name in ("worker-cpu", "worker-gpu"):
        volumes = _named_volumes(_service(compose, name))
        assert volumes and not set(volumes) & set(node_volumes)
        assert str(settings.fetch.cache_dir).startswith(next(iter(volumes.values())))


@pytest.mark.parametrize("name", ["worker-gpu", "worker-cpu"])
def test_workers_consume_the_node_queue(compose: dict[str, Any], name: str) -> None:
    settings = _settings(compose)
    args = build_parser().parse_args(_service(compose, name)["command"][1:])
    assert (args.queue or settings.broker.queue) == settings.broker.queue
    healthcheck = " ".join(_service(compose, name)["healthcheck"]["test"])
    kind = _service(compose, name)["environment"]["WORKER_KIND"]
    assert args.hostname == f"coronet-{kind}@%h"
    assert "celery -A worker.celery_app inspect ping" in healthcheck


def test_gpu_reservation_and_cpu_fallback(compose: dict[str, Any]) -> None:
    gpu = _service(compose, "worker-gpu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    cpu = _service(compose, "worker-cpu")
    assert "deploy" not in cpu
    # Plain `docker compose up` starts the CPU worker; the GPU worker comes with --profile gpu.
    assert gpu["profiles"] == ["gpu"] and "profiles" not in cpu
    args = build_parser().parse_args(cpu["command"][1:])
    assert (
        load_settings(_mounts(cpu)[CONFIG_IN_CONTAINER], args.overrides, environ={}).model.device
        == "cpu"
    )


def test_orthanc_routes_to_the_node_and_receives_results(compose: dict[str, Any]) -> None:
    settings = _settings(compose)
    config = _orthanc_config(compose)
    aet, host, port = config["DicomModalities"][ORTHANC_MODALITY]
    assert (aet, host, port) == (settings.node.ae_title, "node", settings.node.port)
    (destination,) = settings.destinations
    assert (destination.ae_title, destination.host, destination.port) == (
        config["DicomAet"],
        "orthanc",
        config["DicomPort"],
    )
    caller = settings.caller(config["DicomAet"])
    assert caller is not None and caller.host == "orthanc"
    orthanc = _service(compose, "orthanc")
    assert _published(orthanc)[config["DicomPort"]] == config["DicomPort"]
    assert _published(orthanc)[config["HttpPort"]] == config["HttpPort"]
    (script,) = config["LuaScripts"]
    assert _mounts(orthanc)[script] == ROOT / "configs" / "orthanc" / "autoroute.lua"


def test_the_admin_service_is_published_on_the_host_loopback_only(
    compose: dict[str, Any],
) -> None:
    settings = _settings(compose)
    admin = settings.admin
    assert admin.enabled and admin.host == "0.0.0.0" and admin.allow_plain_http
    published = [str(p) for p in _service(compose, "node")["ports"]]
    assert f"127.0.0.1:{admin.port}:{admin.port}" in published
    for path in (admin.users_file, admin.secret_file, settings.audit.file):
        assert str(path).startswith("/var/lib/coronet/")  # the data volume, not the config


def test_healthchecks_use_allowed_callers(compose: dict[str, Any]) -> None:
    settings = _settings(compose)
    test = _service(compose, "node")["healthcheck"]["test"]
    calling = test[test.index("-aet") + 1]
    called = test[test.index("-aec") + 1]
    assert settings.caller(calling) is not None and called == settings.node.ae_title
    assert test[-1] == str(settings.node.port)


def test_lua_script_routes_cr_dx_only() -> None:
    script = (ROOT / "configs" / "orthanc" / "autoroute.lua").read_text(encoding="utf-8")
    assert f"TARGET = '{ORTHANC_MODALITY}'" in script
    assert re.search(r"ROUTED_MODALITIES = \{ CR = true, DX = true \}", script)
    for never in ("SR", "OT", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7'"):
        assert f"'{never}'" not in script and f" {never} =" not in script
    assert "function OnStoredInstance(instanceId, tags, metadata, origin)" in script


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_dockerfile_matches_the_compose_file(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"(?m)^FROM python:3\.11-slim$", dockerfile)
    assert "dcmtk" in dockerfile and "orthanc" in dockerfile
    # torch from the PyTorch index first (the CPU build unless TORCH_INDEX says otherwise), at
    # the version pyproject.toml pins, so that installing the project pulls no CUDA build.
    assert f"ARG TORCH_INDEX={CPU_INDEX}\n" in dockerfile
    pinned = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={pinned.removeprefix('torch==')}\n" in dockerfile
    torch_at = dockerfile.index('--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"')
    assert torch_at < dockerfile.index('pip install --no-cache-dir ".[demo]"')
    cpu_image = {compose["services"][name]["image"] for name in ("node", "worker-cpu", "orthanc")}
    assert len(cpu_image) == 1
    gpu = _service(compose, "worker-gpu")
    assert gpu["image"] not in cpu_image
    assert gpu["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")


def test_the_image_can_send_the_demo_radiograph() -> None:
    """``coronet demo send`` needs pydicom-data: the image installs the ``demo`` extra."""
    extras = _pyproject()["project"]["optional-dependencies"]
    assert any(d.startswith("pydicom-data==") for d in extras["demo"])
    assert set(extras["demo"]) <= set(extras["dev"])


def test_worker_hosts_compose_file(worker_compose: dict[str, Any]) -> None:
    services = worker_compose["services"]
    assert set(services) == {"worker-gpu", "worker-cpu"}
    assert "profiles" not in services["worker-gpu"] and services["worker-cpu"]["profiles"]
    for name, service in services.items():
        args = build_parser().parse_args(service["command"][1:])
        mounts = _mounts(service)
        settings = load_settings(mounts[CONFIG_IN_CONTAINER], args.overrides, environ={})
        assert settings.destinations and not settings.fetch.direct_spool
        assert settings.broker.url.startswith("rediss://")  # TLS to a remote Redis
        environment = service["environment"]
        assert environment["CORONET_BROKER__URL"].startswith("${CORONET_BROKER_URL:?")
        assert environment["WORKER_KIND"] in args.hostname
        assert settings.fetch.ca_file is not None
        assert str(settings.fetch.ca_file).startswith("/etc/coronet/tls/")
        assert "/etc/coronet/tls" in mounts
        volumes = _named_volumes(service)
        assert list(volumes.values()) == ["/var/lib/coronet"], name
        assert str(settings.storage.outbox_dir).startswith("/var/lib/coronet/")
        assert "celery -A worker.celery_app inspect ping" in " ".join(
            service["healthcheck"]["test"]
        )


@pytest.mark.integration
def test_worker_healthcheck_command_finds_the_app(redis: RedisServer, tmp_path: Path) -> None:
    """``celery -A worker.celery_app inspect ping`` builds the app lazily from $CORONET_CONFIG."""
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"broker": {"url": redis.url}}), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORONET_")}
    env["CORONET_CONFIG"] = str(config)
    celery = Path(sys.executable).parent / "celery"
    proc = subprocess.run(
        [str(celery), "-A", "worker.celery_app", "inspect", "ping", "--timeout", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    # No worker runs, so no node replies: but the app was found and reached the broker.
    assert "No nodes replied" in output, output
    assert "Unable to load celery application" not in output
