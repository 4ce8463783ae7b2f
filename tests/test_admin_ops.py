"""Operations around the admin service: bounded disk (prune), admin users, the console's
session and CSRF checks, audit messages to syslog, and the worker's live destination list."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import httpx
import pytest
from pydicom.uid import generate_uid

from dicom_node.admin.retention import prune
from dicom_node.admin.studies import recent_studies, study_view
from dicom_node.admin.users import UserStore
from dicom_node.core import audit
from dicom_node.core.audit_trail import AuditTrail
from dicom_node.core.errors import ConfigError
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import AuditSettings, Destination, Settings, settings_from_data
from dicom_node.core.spool import Spool
from tests.support.admin import PASSWORD, USER, Admin, audit_messages, event_id, event_types
from tests.support.certificates import Certificate
from tests.support.node import node_process
from tests.support.polling import wait_until
from tests.support.processes import coronet_env
from tests.support.redis_server import RedisServer
from tests.support.results import phantom_source, results_for
from tests.support.settings import node_data, write_config
from worker.destinations import DestinationSource

DESTINATIONS = [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)]


# --------------------------------------------------------------------------- bounded disk


def _study(spool: Spool, outbox: Outbox, folder: Path, state: str, *, selected: bool = True) -> str:
    """A spooled study in ``state``: delivered, pending, received, dead-delivery, dead-analysis."""
    path = folder / f"{generate_uid()}.dcm"
    ds = phantom_source(path)
    stored = spool.store(path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), selected=selected)
    study, instance = stored.study_key, stored.instance_key
    if not selected or state == "received":
        return study
    spool.mark_queued(study, [instance])
    if state == "dead-analysis":
        outbox.dead_letter_source(study, instance, "cannot analyse: a test")
        spool.mark_done(study, [instance])
        return study
    record = outbox.put(study, instance, results_for(ds), outcome="prediction")
    for key in record.results:
        if state == "delivered":
            outbox.mark_delivered(key, "pacs", 0)
        elif state == "dead-delivery":
            outbox.dead_letter(key, "pacs", None, "refused: a test")
    if state != "pending":
        spool.mark_done(study, [instance])
    return study


def test_prune_removes_delivered_studies_only(tmp_path: Path) -> None:
    spool, outbox = Spool(tmp_path / "spool"), Outbox(tmp_path / "out")
    folder = tmp_path / "in"
    studies = {
        state: _study(spool, outbox, folder, state)
        for state in ("delivered", "pending", "received", "dead-delivery", "dead-analysis")
    }
    studies["not-selected"] = _study(spool, outbox, folder, "stored", selected=False)
    delivered_results = outbox.sources_of(studies["delivered"])[0].results
    kept = prune(spool, outbox, DESTINATIONS, older_than_days=30)
    assert kept.removed == []
    assert kept.kept_recent == 2
    report = prune(spool, outbox, DESTINATIONS, older_than_days=0)
    assert sorted(report.removed) == sorted([studies["delivered"], studies["not-selected"]])
    assert report.freed_bytes > 0
    assert (report.kept_undelivered, report.kept_dead_letters) == (2, 2)
    remaining = spool.study_keys()
    assert sorted(remaining) == sorted(
        studies[s] for s in ("pending", "received", "dead-delivery", "dead-analysis")
    )
    for key in delivered_results:
        assert not outbox.result_path(key).exists()
        assert outbox.state(key, "pacs") == "pending"  # no delivery marker left
    assert outbox.sources_of(studies["delivered"]) == []
    assert outbox.dead_letters("pacs") and outbox.dead_sources()  # dead letters stay
    assert outbox.sources_of(studies["pending"])


def test_storage_prune_command_and_the_node_remove_delivered_studies(
    tmp_path: Path, redis: RedisServer
) -> None:
    data = node_data(tmp_path, redis.url, destinations=[DESTINATIONS[0].model_dump()])
    config = write_config(tmp_path / "node.yaml", data)
    spool = Spool(Path(data["storage"]["spool_dir"]))
    outbox = Outbox(Path(data["storage"]["outbox_dir"]))
    delivered = _study(spool, outbox, tmp_path / "in", "delivered")
    pending = _study(spool, outbox, tmp_path / "in", "pending")
    command = [sys.executable, "-m", "dicom_node.cli", "storage", "prune", "--config", str(config)]
    kept = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert kept.returncode == 0 and "removed 0 delivered studies" in kept.stdout
    dry = subprocess.run(
        [*command, "--older-than", "0", "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert "would remove 1" in dry.stdout and delivered in spool.study_keys()
    removed = subprocess.run(
        [*command, "--older-than", "0"], capture_output=True, text=True, timeout=60
    )
    assert removed.returncode == 0 and delivered in removed.stdout
    assert spool.study_keys() == [pending]
    again = _study(spool, outbox, tmp_path / "in", "delivered")
    data["storage"].update(retention=0.00001, prune_interval=1)  # about a second
    write_config(config, data)
    with node_process(config, tmp_path):
        wait_until(lambda: again not in spool.study_keys(), 30, "the node's prune job")
    assert spool.study_keys() == [pending]


# --------------------------------------------------------------------------- admin users


def _coronet(args: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=coronet_env(),
        timeout=60,
    )


def test_admin_user_add_reads_the_password_from_stdin_and_keeps_an_argon2_hash(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "node.yaml", node_data(tmp_path, "redis://127.0.0.1:1/0"))
    added = _coronet(
        ["admin", "user", "add", "alice", "--config", str(config)], tmp_path, "s3cret-pass\n"
    )
    assert added.returncode == 0, added.stderr
    users = tmp_path / "admin" / "users"
    assert users.stat().st_mode & 0o777 == 0o600
    (line,) = users.read_text().splitlines()
    assert line.startswith("alice:$argon2id$") and "s3cret" not in line
    assert UserStore(users).verify("alice", "s3cret-pass")
    assert not UserStore(users).verify("alice", "wrong-pass")
    short = _coronet(["admin", "user", "add", "bob", "--config", str(config)], tmp_path, "short\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    listing = _coronet(["admin", "user", "list", "--config", str(config)], tmp_path)
    assert listing.stdout.split() == ["alice"]
    removed = _coronet(["admin", "user", "remove", "alice", "--config", str(config)], tmp_path)
    assert removed.returncode == 0 and UserStore(users).users() == {}
    changes = audit_messages(tmp_path / "audit" / "audit.log")
    assert [event_id(m) for m in changes] == ["110113", "110113"]
    assert all(event_types(m) == ["110137"] for m in changes)


# --------------------------------------------------------------------------- console


def _login_token(client: httpx.Client) -> str:
    page = client.get("/login")
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match is not None
    return match.group(1)


def test_the_console_needs_a_login_and_the_csrf_token_of_its_session(
    tmp_path: Path, redis: RedisServer
) -> None:
    data = node_data(tmp_path, redis.url)
    config = write_config(tmp_path / "node.yaml", data)
    admin = Admin.of(data)
    with node_process(config, tmp_path), httpx.Client(base_url=admin.url) as client:
        token = _login_token(client)
        assert (
            client.post(
                "/login", data={"csrf": "forged", "username": USER, "password": PASSWORD}
            ).status_code
            == 400
        )
        token = _login_token(client)
        wrong = client.post("/login", data={"csrf": token, "username": USER, "password": "x"})
        assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
        token = _login_token(client)
        ok = client.post("/login", data={"csrf": token, "username": USER, "password": PASSWORD})
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        page = client.get("/")
        assert page.status_code == 200 and "Allowed callers" in page.text
        match = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert match is not None
        forged = client.post("/console/callers", data={"ae_title": "FORGED", "csrf": "nope"})
        assert forged.status_code == 303 and forged.headers["location"] == "/login"
        added = client.post("/console/callers", data={"ae_title": "CONSOLE", "csrf": match[1]})
        assert added.status_code == 303 and added.headers["location"] == "/"
        assert "Caller CONSOLE added" in client.get("/").text
        client.post("/logout", data={"csrf": match[1]})
        assert client.get("/").headers["location"] == "/login"
    text = config.read_text()
    assert "CONSOLE" in text and "FORGED" not in text
    logins = [
        m for m in audit_messages(tmp_path / "audit" / "audit.log") if event_id(m) == "110114"
    ]
    assert [event_types(m) for m in logins] == [["110122"], ["110122"], ["110123"]]


# --------------------------------------------------------------------------- syslog


def _event() -> audit.AuditEvent:
    return audit.authentication("ALICE", "127.0.0.1", "CORONET admin")


def _check_syslog(frame: bytes) -> ET.Element:
    """One RFC 5424 message: PRI and version, time, host, app, pid, MSGID, no SD, BOM + XML."""
    parts = frame.decode("utf-8").split(" ", 7)
    assert parts[0] == "<85>1"  # facility 10 (security), severity 5 (notice), version 1
    assert parts[3] == "coronet" and parts[5] == "IHE+RFC-3881" and parts[6] == "-"
    assert parts[7].startswith("\ufeff")
    return ET.fromstring(parts[7][1:])


def test_audit_messages_go_to_syslog_over_udp_as_rfc_5424(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(10)
        port = server.getsockname()[1]
        settings = AuditSettings(
            sink="syslog", syslog={"host": "127.0.0.1", "port": port, "transport": "udp"}
        )
        trail = AuditTrail.from_settings(settings, "CORONET@test")
        trail.record(_event())
        frame, _ = server.recvfrom(65536)
    message = _check_syslog(frame)
    assert message.find("AuditSourceIdentification").attrib["AuditSourceID"] == "CORONET@test"  # type: ignore[union-attr]
    assert event_id(message) == "110114"


def test_audit_messages_go_to_syslog_over_tls_with_octet_counting(
    tmp_path: Path, certificate: Certificate
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    received = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        with context.wrap_socket(connection, server_side=True) as tls:
            tls.settimeout(10)
            while received.count(b"</AuditMessage>") < 2:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings = AuditSettings(
        sink="syslog",
        syslog={
            "host": "127.0.0.1",
            "port": port,
            "transport": "tls",
            "tls": {"ca_file": str(certificate.cert)},
        },
    )
    trail = AuditTrail.from_settings(settings, "CORONET@test")
    trail.record(_event())
    trail.record(_event())
    thread.join(20)
    trail.close()
    listener.close()
    data = bytes(received)
    for _ in range(2):
        length, _, rest = data.partition(b" ")
        frame, data = rest[: int(length)], rest[int(length) :]
        assert event_id(_check_syslog(frame)) == "110114"
    assert data == b""


# --------------------------------------------------------------------------- live destinations


def test_the_worker_re_reads_the_destinations_when_the_file_changes(tmp_path: Path) -> None:
    data: dict[str, Any] = {"destinations": [DESTINATIONS[0].model_dump()]}
    config = write_config(tmp_path / "node.yaml", data)
    source = DestinationSource(DESTINATIONS, config, environ={})
    assert [d.name for d in source()] == ["pacs"]
    data["destinations"].append({"name": "second", "ae_title": "SECOND", "host": "::1", "port": 11})
    write_config(config, data)
    assert [d.name for d in source()] == ["pacs", "second"]
    config.write_text("destinations: [{name: broken}]\n")
    assert [d.name for d in source()] == ["pacs", "second"]  # invalid: the last good list
    assert DestinationSource(DESTINATIONS)() == DESTINATIONS


def test_settings_keep_the_retention_floor_and_audit_defaults() -> None:
    settings = Settings()
    assert settings.storage.min_free_bytes == 1 << 30
    assert settings.storage.retention == 30
    assert settings.audit.sink == "file"
    assert settings.admin.host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"audit\.syslog"):
        settings_from_data({"audit": {"sink": "syslog"}})


@pytest.mark.parametrize("show", [False, True])
def test_the_patient_name_shows_only_when_the_admin_turns_it_on(tmp_path: Path, show: bool) -> None:
    """``admin.show_patient_name``: off by default, studies are shown without the name."""
    source = tmp_path / "in.dcm"
    ds = phantom_source(source)
    spool = Spool(tmp_path / "spool")
    stored = spool.store(
        source,
        str(ds.SOPInstanceUID),
        str(ds.StudyInstanceUID),
        study_info={"patient_name": "Doe^Jane", "modality": "CR"},
    )
    outbox = Outbox(tmp_path / "out")
    view = study_view(spool, outbox, stored.study_key, [], show_patient_name=show)
    listed = recent_studies(spool, outbox, [], limit=5, show_patient_name=show)
    assert view.patient_name == ("Doe^Jane" if show else None)
    assert [v.patient_name for v in listed] == [view.patient_name]
    assert view.modality == "CR"
