"""The ``coronet`` command line: config check and the AE-title admin commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.cli import build_parser, main
from dicom_node.cli.common import EXIT_OK, EXIT_USAGE

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "node.yaml"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the example, in the current folder (its var/ audit file goes there too)."""
    path = tmp_path / "node.yaml"
    shutil.copyfile(EXAMPLE, path)
    monkeypatch.chdir(tmp_path)
    return path


def test_config_check_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(EXAMPLE)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "OK" in out
    assert "CORONET listening on 127.0.0.1:11112" in out
    assert "demo-pacs" in out and "ORTHANC at 127.0.0.1:4242" in out


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["node"].update(ae_title="A" * 17), "node.ae_title"),
        (lambda d: d["destinations"].append(dict(d["destinations"][0])), "destinations"),
        (lambda d: d["node"].update(port=70000), "node.port"),
        (lambda d: d["destinations"][0].update(port=70000), "destinations.0.port"),
        (lambda d: d["callers"].append({"ae_title": "ORTHANC"}), "callers"),
    ],
    ids=[
        "17-char-title",
        "duplicate-destination",
        "port-70000",
        "destination-port",
        "duplicate-caller",
    ],
)
def test_config_check_rejects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: object, field: str
) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    edit(data)  # type: ignore[operator]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["config", "check", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"  {field}: " in err


def test_config_check_with_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(EXAMPLE), "--set", "node.port=70000"]) == EXIT_USAGE
    assert "node.port" in capsys.readouterr().err


def test_aet_add_then_remove_is_byte_identical(config: Path) -> None:
    before = config.read_bytes()
    assert (
        main(["aet", "add", "caller", "--config", str(config), "MODALITY1", "--host", "10.1.2.3"])
        == 0
    )
    argv = ["aet", "add", "destination", "--config", str(config), "archive"]
    argv += ["--ae-title", "ARCHIVE", "--host", "pacs.example.org", "--port", "104"]
    assert main(argv) == 0
    changed = config.read_text()
    assert "ae_title: MODALITY1" in changed and "name: archive" in changed
    assert main(["config", "check", str(config)]) == EXIT_OK
    assert main(["aet", "remove", "caller", "--config", str(config), "MODALITY1"]) == 0
    assert main(["aet", "remove", "destination", "--config", str(config), "archive"]) == 0
    assert config.read_bytes() == before


def test_aet_add_keeps_comments_and_order(config: Path) -> None:
    main(["aet", "add", "caller", "--config", str(config), "NEWONE"])
    text = config.read_text()
    assert "# Calling AE titles allowed to send to us." in text
    assert text.index("callers:") < text.index("NEWONE") < text.index("destinations:")
    assert list(yaml.safe_load(text)) == list(yaml.safe_load(EXAMPLE.read_text()))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["aet", "add", "caller", "A" * 17], "at most 16"),
        (["aet", "add", "caller", "ORTHANC"], "already allowed"),
        (["aet", "add", "caller", "BAD\\AE"], "backslash"),
        (["aet", "add", "caller", "NEWAE", "--host", "bad host!"], "callers.2.host"),
        (["aet", "remove", "caller", "NOBODY"], "not in"),
        (["aet", "remove", "destination", "nowhere"], "not in"),
        (
            [
                "aet",
                "add",
                "destination",
                "demo-pacs",
                "--ae-title",
                "X",
                "--host",
                "h",
                "--port",
                "1",
            ],
            "already exists",
        ),
        (
            [
                "aet",
                "add",
                "destination",
                "new",
                "--ae-title",
                "X",
                "--host",
                "h",
                "--port",
                "70000",
            ],
            "destinations.1.port",
        ),
    ],
)
def test_aet_errors_leave_file_untouched(
    config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = config.read_bytes()
    assert main([*argv[:3], "--config", str(config), *argv[3:]]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert config.read_bytes() == before
    assert not [p for p in config.parent.iterdir() if p.name.endswith(".tmp")]


def test_aet_list(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["aet", "list", "--config", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "our AE title: CORONET" in out
    assert "STORESCU" in out and "demo-pacs" in out


def test_aet_add_to_empty_lists(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("node:\n  ae_title: X\ncallers: []\n")
    assert main(["aet", "add", "caller", "--config", str(path), "FIRST"]) == 0
    assert yaml.safe_load(path.read_text())["callers"] == [{"ae_title": "FIRST"}]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["config"],
        ["config", "check"],
        ["aet"],
        ["aet", "add"],
        ["aet", "add", "caller"],
        ["aet", "add", "destination"],
        ["aet", "remove"],
        ["aet", "list"],
        ["admin", "user", "add"],
        ["storage", "prune"],
        ["node", "serve"],
        ["node", "reload"],
    ],
)
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: coronet")
    assert len(out.splitlines()) > 3


def test_console_script_runs() -> None:
    exe = Path(sys.executable).with_name("coronet")
    result = subprocess.run(
        [str(exe), "config", "check", str(EXAMPLE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["aet", "add", "--config", "{config}", "caller", "FRONT", "--host", "10.20.30.40"],
        ["aet", "add", "caller", "--config", "{config}", "FRONT"],
        ["aet", "add", "caller", "FRONT", "--config", "{config}"],
    ],
    ids=["before-the-kind", "after-the-kind", "at-the-end"],
)
def test_config_is_accepted_before_and_after_the_kind(config: Path, argv: list[str]) -> None:
    assert main([a.format(config=config) for a in argv]) == EXIT_OK
    assert "FRONT" in [c["ae_title"] for c in yaml.safe_load(config.read_text())["callers"]]
    assert main(["aet", "remove", "--config", str(config), "caller", "FRONT"]) == EXIT_OK
    assert "FRONT" not in config.read_text()


def test_aet_changes_are_audited_with_the_operating_system_user(config: Path) -> None:
    assert main(["aet", "add", "--config", str(config), "caller", "AUDITED"]) == EXIT_OK
    lines = (config.parent / "var" / "audit" / "audit.log").read_text().splitlines()
    assert len(lines) == 1
    assert 'csd-code="110129"' in lines[0] and "AUDITED" in lines[0]


def test_node_reload_refuses_set_instead_of_ignoring_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["node", "reload", "--set", "node.port=1"])
    assert info.value.code == EXIT_USAGE
    assert "unrecognized arguments: --set" in capsys.readouterr().err


def test_a_yaml_syntax_error_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("node:\n  port: [1,\n")
    assert main(["config", "check", str(path)]) == EXIT_USAGE
    assert main(["aet", "add", "caller", "X", "--config", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count(f'in "{path}", line') >= 2
    assert "<unicode string>" not in err


def test_piping_aet_list_into_head_prints_no_traceback(tmp_path: Path) -> None:
    """The reader goes away after one line while coronet still writes (more than a pipe holds)."""
    callers = [{"ae_title": f"C{i}", "host": "127.0.0.1"} for i in range(4000)]
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump({"callers": callers}))
    result = subprocess.run(
        f"{sys.executable} -m dicom_node.cli aet list --config {path} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        executable="/bin/bash",
    )
    assert result.stdout.startswith("our AE title: CORONET")
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


@pytest.mark.parametrize(("exported", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_unless_the_user_says_otherwise(
    exported: str | None, seen: str
) -> None:
    """The wait policy is set before torch loads (in a fresh process), and an exported value
    wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if exported:
        env["OMP_WAIT_POLICY"] = exported
    probe = (
        "import os, sys\n"
        "from dicom_node.cli import main\n"
        "main(['config', 'check', sys.argv[1]])\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(EXAMPLE)],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == seen
