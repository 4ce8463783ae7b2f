"""The configuration model: good and bad files, AE-title rules, precedence of overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import (
    Settings,
    load_settings,
    parse_override,
    settings_from_data,
    validate_ae_title,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "node.yaml"


def example_data() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(data, dict)
    return data


def with_change(path: str, value: Any) -> dict[str, Any]:
    """The example configuration with one field (``a.b.0.c``) replaced."""
    data = copy.deepcopy(example_data())
    node: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("CORONET", "CORONET"),
        ("A", "A"),
        ("ABCDEFGHIJKLMNOP", "ABCDEFGHIJKLMNOP"),  # 16 characters
        ("  PADDED  ", "PADDED"),  # leading/trailing spaces are not significant
        ("WITH SPACE", "WITH SPACE"),
        ("lower-case_1.2", "lower-case_1.2"),
    ],
)
def test_valid_ae_titles(title: str, expected: str) -> None:
    assert validate_ae_title(title) == expected


@pytest.mark.parametrize(
    ("title", "reason"),
    [
        ("ABCDEFGHIJKLMNOPQ", "at most 16"),
        ("", "all spaces"),
        ("      ", "all spaces"),
        ("BACK\\SLASH", "backslash"),
        ("TAB\tTITLE", "control"),
        ("NEW\nLINE", "control"),
        ("ESC\x1bX", "control"),
        ("CAFÉ", "repertoire"),
    ],
)
def test_invalid_ae_titles(title: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validate_ae_title(title)


def test_example_config_is_valid() -> None:
    settings = settings_from_data(example_data())
    assert settings.node.ae_title == "CORONET"
    assert [c.ae_title for c in settings.callers] == ["ORTHANC", "STORESCU"]
    assert settings.destination("demo-pacs").port == 4242


def test_empty_config_gives_defaults() -> None:
    settings = settings_from_data({})
    assert settings == Settings()
    assert settings.grouping.quiet_seconds == 5
    assert settings.selection.modalities == ["CR", "DX"]


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    [
        ("node.ae_title", "ABCDEFGHIJKLMNOPQ", "node.ae_title", "at most 16"),
        ("node.ae_title", "   ", "node.ae_title", "all spaces"),
        ("node.port", 70000, "node.port", "less than or equal to 65535"),
        ("node.port", 0, "node.port", "greater than or equal to 1"),
        ("node.port", "http", "node.port", "integer"),
        ("node.host", "not a host!", "node.host", "neither an IP address nor a host name"),
        ("node.max_associations", 0, "node.max_associations", "greater than or equal to 1"),
        ("node.timeouts.acse", -1, "node.timeouts.acse", "greater than 0"),
        (
            "node.extra_sop_classes",
            ["1.2.abc"],
            "node.extra_sop_classes.0",
            "not a valid DICOM UID",
        ),
        ("node.tls", {"cert_file": "a.pem"}, "node.tls", "given together"),
        ("node.tls", {"require_client_cert": True}, "node.tls", "needs ca_file"),
        ("node.colour", "blue", "node.colour", "unknown field"),
        ("callers.0.ae_title", "BAD\\TITLE", "callers.0.ae_title", "backslash"),
        ("callers.1.ae_title", "ORTHANC", "callers", "duplicate caller AE title 'ORTHANC'"),
        ("callers.0", {"host": "127.0.0.1"}, "callers.0.ae_title", "Field required"),
        ("destinations.0.port", 70000, "destinations.0.port", "less than or equal to 65535"),
        ("destinations.0.ae_title", "X" * 17, "destinations.0.ae_title", "at most 16"),
        ("destinations.0.name", "has space", "destinations.0.name", "should match pattern"),
        ("broker.url", "amqp://x", "broker.url", "should match pattern"),
        ("model.device", "gpu", "model.device", "auto, cpu or cuda:N"),
        ("model.max_pixels", 10**9, "model.max_pixels", "less than or equal to 67108864"),
        ("model.decode_timeout", 0, "model.decode_timeout", "greater than 0"),
        ("model.decode_memory_mb", 16, "model.decode_memory_mb", "greater than or equal to 64"),
        ("grouping.mode", "series", "grouping.mode", "'study' or 'instance'"),
        ("results.on_unassessable", "maybe", "results.on_unassessable", "'report' or 'skip'"),
        ("selection.modalities", [], "selection.modalities", "at least 1"),
    ],
)
def test_bad_config_names_field(path: str, value: Any, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_data(with_change(path, value), "node.yaml")
    fields = {f for f, _ in info.value.problems}
    assert field in fields, info.value.problems
    assert any(reason in r for f, r in info.value.problems if f == field), info.value.problems
    assert field in str(info.value)


def test_duplicate_destination_name_is_an_error() -> None:
    data = example_data()
    data["destinations"].append(dict(data["destinations"][0], port=4243))
    with pytest.raises(ConfigError) as info:
        settings_from_data(data)
    assert info.value.problems == [("destinations", "duplicate destination name 'demo-pacs'")]


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("node.port=11113", ["node", "port"], 11113),
        ("node.ae_title=MYNODE", ["node", "ae_title"], "MYNODE"),
        ("selection.modalities=[CR]", ["selection", "modalities"], ["CR"]),
        ("node.tls=null", ["node", "tls"], None),
        ("grouping.quiet_seconds=2.5", ["grouping", "quiet_seconds"], 2.5),
        ("results.sr_series_description=a=b", ["results", "sr_series_description"], "a=b"),
    ],
)
def test_parse_override(text: str, path: list[str], value: Any) -> None:
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["node.port", "=3", "node..port=3", ".port=3"])
def test_parse_override_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        parse_override(text)


@pytest.mark.parametrize(
    ("overrides", "environ", "expected_port"),
    [
        ([], {}, 11112),  # file
        ([], {"CORONET_NODE__PORT": "11200"}, 11200),  # environment beats file
        (["node.port=11300"], {"CORONET_NODE__PORT": "11200"}, 11300),  # CLI beats environment
        (["node.port=11300"], {}, 11300),
    ],
)
def test_precedence_cli_env_file(
    overrides: list[str], environ: dict[str, str], expected_port: int
) -> None:
    settings = load_settings(EXAMPLE, overrides, environ)
    assert settings.node.port == expected_port


def test_defaults_apply_when_file_omits_a_section(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("node:\n  ae_title: SMALL\n")
    settings = load_settings(path, environ={})
    assert settings.node.ae_title == "SMALL"
    assert settings.node.port == 11112
    assert settings.broker.queue == "coronet"


def test_override_into_list_by_index() -> None:
    settings = load_settings(EXAMPLE, ["destinations.0.port=104"], {})
    assert settings.destination("demo-pacs").port == 104


def test_environment_ignores_unrelated_variables() -> None:
    settings = load_settings(EXAMPLE, [], {"CORONET_HOME": "/x", "PATH": "/bin"})
    assert settings.node.port == 11112


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- just\n- a list\n", "mapping at the top level"),
        ("node: [unclosed\n", "not valid YAML"),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path, environ={})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(Path("does/not/exist.yaml"), environ={})


def test_unknown_destination_lists_known_names() -> None:
    settings = load_settings(EXAMPLE, environ={})
    with pytest.raises(ConfigError, match="known: demo-pacs"):
        settings.destination("nope")
