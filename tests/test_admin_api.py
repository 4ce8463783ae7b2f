"""The admin service of a real node process (``coronet node serve``) with a real Redis: login,
validation, live callers, metrics, health, the free-space floor and the audit trail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from dicom_node.core import statuses
from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import settings_from_data
from dicom_node.core.spool import Spool
from tests.support.admin import Admin, audit_messages, event_id, event_types
from tests.support.dicom_data import CR_IMAGE_STORAGE, EXPLICIT_LE, RG1_UNCR, make_instance
from tests.support.node import associate, node_process, run_storescu, scu
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.settings import node_data, write_config

pytestmark = pytest.mark.integration

API_ROUTES = [
    ("GET", "/api/v1/callers"),
    ("POST", "/api/v1/callers"),
    ("DELETE", "/api/v1/callers/STORESCU"),
    ("GET", "/api/v1/destinations"),
    ("POST", "/api/v1/destinations"),
    ("DELETE", "/api/v1/destinations/pacs"),
    ("GET", "/api/v1/studies"),
    ("POST", "/api/v1/studies/" + "0" * 32 + "/retry"),
]


def _node(tmp_path: Path, redis_url: str, **sections: Any) -> tuple[Path, dict[str, Any], Admin]:
    data = node_data(tmp_path, redis_url, **sections)
    config = tmp_path / "node.yaml"
    config.write_text(
        "# the node of this test; comments stay when the API edits the file\n"
        + write_config(tmp_path / "plain.yaml", data).read_text(),
        encoding="utf-8",
    )
    return config, data, Admin.of(data)


def test_the_api_needs_a_login_and_health_and_metrics_do_not(
    tmp_path: Path, redis: RedisServer
) -> None:
    config, _, admin = _node(tmp_path, redis.url)
    with node_process(config, tmp_path):
        with admin.client(auth=False) as anonymous:
            for method, path in API_ROUTES:
                response = anonymous.request(method, path, json={})
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"].startswith("Basic")
            assert anonymous.get("/healthz").status_code in (200, 503)
            assert anonymous.get("/metrics").status_code == 200
            assert anonymous.get("/").headers["location"] == "/login"
        wrong = Admin(admin.url, password="not the password")
        assert wrong.get("/api/v1/callers").status_code == 401
        assert admin.get("/api/v1/callers").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/callers", {"ae_title": "A" * 17}, "ae_title"),
        ("/api/v1/callers", {"ae_title": "BAD\\TITLE"}, "ae_title"),
        ("/api/v1/callers", {"ae_title": "OK", "host": "not a host!"}, "host"),
        ("/api/v1/callers", {"host": "127.0.0.1"}, "ae_title"),
        (
            "/api/v1/destinations",
            {"name": "p", "ae_title": "PACS", "host": "127.0.0.1", "port": 0},
            "port",
        ),
        (
            "/api/v1/destinations",
            {"name": "p", "ae_title": "PACS", "host": "127.0.0.1", "port": "x"},
            "port",
        ),
        (
            "/api/v1/destinations",
            {"name": "bad name", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            "name",
        ),
    ],
    ids=["17-chars", "backslash", "host", "missing-title", "port-0", "port-text", "name"],
)
def test_bad_input_is_refused_with_422_naming_the_field_and_the_file_is_unchanged(
    tmp_path: Path, redis: RedisServer, path: str, body: dict[str, Any], field: str
) -> None:
    config, _, admin = _node(tmp_path, redis.url)
    before = config.read_bytes()
    with node_process(config, tmp_path):
        response = admin.post(path, body)
    assert response.status_code == 422, response.text
    assert field in [item["loc"][-1] for item in response.json()["detail"]]
    assert config.read_bytes() == before


def test_duplicates_unknown_names_and_non_json_bodies_are_refused(
    tmp_path: Path, redis: RedisServer
) -> None:
    config, _, admin = _node(tmp_path, redis.url)
    before = config.read_bytes()
    with node_process(config, tmp_path):
        assert admin.post("/api/v1/callers", {"ae_title": "STORESCU"}).status_code == 409
        assert admin.delete("/api/v1/callers/NOBODY").status_code == 404
        assert admin.delete("/api/v1/destinations/nowhere").status_code == 404
        with admin.client() as client:
            form = client.post("/api/v1/callers", data={"ae_title": "FORM"})
        assert form.status_code == 415
    assert config.read_bytes() == before


def test_a_caller_added_by_the_api_may_associate_at_once_and_not_after_its_removal(
    tmp_path: Path, redis: RedisServer
) -> None:
    config, data, admin = _node(tmp_path, redis.url)
    port = data["node"]["port"]
    with node_process(config, tmp_path):
        refused = associate(port, scu("NEWMODALITY"))
        assert refused.is_rejected
        added = admin.post("/api/v1/callers", {"ae_title": "NEWMODALITY", "host": "127.0.0.1"})
        assert added.status_code == 201, added.text
        assert added.json() == {"ae_title": "NEWMODALITY", "host": "127.0.0.1"}
        assoc = associate(port, scu("NEWMODALITY"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == statuses.SUCCESS
        assoc.release()
        assert admin.delete("/api/v1/callers/NEWMODALITY").status_code == 204
        assert associate(port, scu("NEWMODALITY")).is_rejected
    text = config.read_text(encoding="utf-8")
    assert text.startswith("# the node of this test; comments stay")
    assert "NEWMODALITY" not in text


def test_metrics_count_associations_and_stored_instances(
    tmp_path: Path, redis: RedisServer
) -> None:
    config, data, admin = _node(tmp_path, redis.url)
    source = tmp_path / "rg1.dcm"
    make_instance(RG1_UNCR, source)
    accepted = 'coronet_associations_total{outcome="accepted",reason=""}'
    rejected = 'coronet_associations_total{outcome="rejected",reason="calling_ae"}'
    stored = 'coronet_instances_received_total{status="success"}'
    with node_process(config, tmp_path):
        before = admin.metrics()
        result = run_storescu([source], data["node"]["port"])
        assert result.returncode == 0, result.stderr
        assert associate(data["node"]["port"], scu("STRANGER")).is_rejected
        after = admin.metrics()
        wait_until(
            lambda: admin.metrics().get("coronet_studies_queued_total", 0) >= 1,
            30,
            "the study to be queued",
        )
    assert after[accepted] == before.get(accepted, 0) + 1
    assert after[rejected] == before.get(rejected, 0) + 1
    assert after[stored] == before.get(stored, 0) + 1
    assert after["coronet_received_bytes_total"] >= source.stat().st_size - 1024
    assert after["coronet_spool_bytes"] >= 0 and after["coronet_free_bytes"] > 0
    assert after["coronet_broker_up"] == 1
    assert 'coronet_queue_depth{queue="coronet"}' in after


def test_healthz_is_503_naming_the_broker_when_redis_stops(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as own_redis:
        config, _, admin = _node(tmp_path, own_redis.url, admin={"worker_timeout": 0})
        with node_process(config, tmp_path), admin.client(auth=False) as client:
            healthy = client.get("/healthz")
            assert healthy.status_code == 200, healthy.text
            assert healthy.json()["status"] == "ok"
            own_redis.stop()
            failing = client.get("/healthz")
    assert failing.status_code == 503
    body = failing.json()
    assert body["failed"] == ["broker"]
    assert body["checks"]["node"]["ok"] and not body["checks"]["broker"]["ok"]


def test_healthz_is_503_naming_the_worker_when_none_was_seen(
    tmp_path: Path, redis: RedisServer
) -> None:
    config, _, admin = _node(tmp_path, redis.url, admin={"worker_timeout": 60})
    with node_process(config, tmp_path), admin.client(auth=False) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["worker"]


def test_min_free_bytes_above_the_free_space_answers_out_of_resources(
    tmp_path: Path, redis: RedisServer
) -> None:
    config, data, admin = _node(
        tmp_path, redis.url, storage={"min_free_bytes": 1 << 60}, admin={"worker_timeout": 0}
    )
    source = tmp_path / "rg1.dcm"
    ds = make_instance(RG1_UNCR, source)
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CR_IMAGE_STORAGE, [EXPLICIT_LE])
    with node_process(config, tmp_path):
        assoc = associate(data["node"]["port"], ae)
        assert assoc.is_established
        status = assoc.send_c_store(ds).Status
        assoc.release()
        with admin.client(auth=False) as client:
            health = client.get("/healthz")
        metrics = admin.metrics()
    assert status == statuses.OUT_OF_RESOURCES
    assert health.status_code == 503
    assert health.json()["failed"] == ["disk"]
    assert "storage.min_free_bytes" in health.json()["checks"]["disk"]["detail"]
    assert Spool(Path(data["storage"]["spool_dir"])).study_keys() == []
    assert metrics['coronet_instances_received_total{status="out_of_resources"}'] == 1


def test_the_audit_file_holds_well_formed_dicom_audit_messages(
    tmp_path: Path, redis: RedisServer
) -> None:
    config, data, admin = _node(tmp_path, redis.url)
    source = tmp_path / "rg1.dcm"
    ds = make_instance(RG1_UNCR, source)
    with node_process(config, tmp_path):
        assert run_storescu([source], data["node"]["port"]).returncode == 0
        assert associate(data["node"]["port"], scu("STRANGER")).is_rejected
        assert admin.post("/api/v1/callers", {"ae_title": "AUDITED"}).status_code == 201
        assert Admin(admin.url, password="wrong password").get("/api/v1/callers").status_code == 401
    messages = audit_messages(Path(data["audit"]["file"]))
    for message in messages:
        assert message.tag == "AuditMessage"
        ident = message.find("EventIdentification")
        assert ident is not None
        assert {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"} <= set(ident.attrib)
        event = ident.find("EventID")
        assert event is not None and event.attrib["codeSystemName"] == "DCM"
        assert event.attrib["originalText"]
        participants = message.findall("ActiveParticipant")
        assert participants and all(p.attrib["UserID"] for p in participants)
        assert all(p.attrib["UserIsRequestor"] in ("true", "false") for p in participants)
        source_id = message.find("AuditSourceIdentification")
        assert source_id is not None and source_id.attrib["AuditSourceID"]
        children = [child.tag for child in message]
        assert children.index("EventIdentification") == 0
        assert children.index("AuditSourceIdentification") > max(
            i for i, tag in enumerate(children) if tag == "ActiveParticipant"
        )
    by_event: dict[str, list[Any]] = {}
    for message in messages:
        by_event.setdefault(event_id(message), []).append(message)
    assert set(by_event) == {"110100", "110114", "110104", "110113"}
    assert [event_types(m) for m in by_event["110100"]] == [["110120"], ["110121"]]
    logins = by_event["110114"]
    outcomes = {
        (event_types(m)[0], m.find("EventIdentification").attrib["EventOutcomeIndicator"])
        for m in logins
    }
    assert ("110122", "0") in outcomes and ("110123", "0") in outcomes  # storescu in and out
    assert ("110122", "4") in outcomes  # the stranger, and the wrong password
    (transfer,) = by_event["110104"]
    (study,) = [
        o
        for o in transfer.findall("ParticipantObjectIdentification")
        if o.find("ParticipantObjectIDTypeCode[@csd-code='110180']") is not None
    ]
    assert (
        study.attrib["ParticipantObjectTypeCode"] == "2"
        and study.attrib["ParticipantObjectID"] == ds.StudyInstanceUID
    )
    sop_class = study.find("SOPClass")
    assert sop_class is not None and sop_class.attrib == {
        "UID": CR_IMAGE_STORAGE,
        "NumberOfInstances": "1",
    }
    roles = [r.attrib["csd-code"] for r in transfer.findall("ActiveParticipant/RoleIDCode")]
    assert roles == ["110153", "110152"]
    (change,) = by_event["110113"]
    assert event_types(change) == ["110129"]
    assert change.find("ActiveParticipant").attrib["UserID"] == admin.user


def test_the_admin_service_refuses_a_non_loopback_address_without_tls() -> None:
    with pytest.raises(ConfigError, match=r"admin\.tls"):
        settings_from_data({"admin": {"host": "0.0.0.0"}})
    plain = settings_from_data({"admin": {"host": "0.0.0.0", "allow_plain_http": True}})
    assert plain.admin.allow_plain_http
    tls = settings_from_data(
        {"admin": {"host": "0.0.0.0", "tls": {"cert_file": "c.pem", "key_file": "k.pem"}}}
    )
    assert tls.admin.tls is not None
    assert settings_from_data({"admin": {"host": "::1"}}).admin.host == "::1"
