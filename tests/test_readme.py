"""Every command line of the README's shell blocks runs as written, in order, in a scratch copy
of the repository's layout (``configs/node.yaml``, ``.venv/bin/coronet``), with the demo stack
(``coronet run``: Redis, Orthanc, the node and a worker) running as ``make run`` starts it."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.admin import parse_metrics
from tests.support.dicom_data import RG1_UNCR, make_instance
from tests.support.polling import wait_until
from tests.support.ports import free_port
from tests.support.processes import ChildProcess, coronet_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"
PASSWORD = "a readme password"
#: The README's admin address; `coronet run` takes another port when that one is taken.
README_ADMIN = "127.0.0.1:8480"

pytestmark = pytest.mark.integration


def shell_lines(markdown: str) -> list[str]:
    """The command lines of the ```sh blocks, in order (comment lines left out)."""
    lines: list[str] = []
    inside = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            inside = not inside and line == "```sh"
            continue
        if inside and line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_the_readme_shell_blocks_hold_only_commands_this_test_can_run() -> None:
    lines = shell_lines(README.read_text(encoding="utf-8"))
    assert len(lines) >= 15
    for line in lines:
        assert line.startswith(("make ", ".venv/bin/coronet ", "curl ")), line
    for target in {line.split()[1] for line in lines if line.startswith("make ")}:
        assert re.search(rf"^{target}:", MAKEFILE.read_text(), re.MULTILINE), target


def _scratch(folder: Path) -> None:
    """The layout the README assumes, and the files its examples name."""
    (folder / "configs").mkdir(parents=True)
    shutil.copyfile(ROOT / "configs" / "node.yaml", folder / "configs" / "node.yaml")
    (folder / "monai_bundle").symlink_to(ROOT / "monai_bundle")
    wrapper = folder / ".venv" / "bin" / "coronet"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dicom_node.cli "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    make_instance(RG1_UNCR, folder / "chest.dcm")
    make_instance(RG1_UNCR, folder / "more" / "studies" / "rg1.dcm")


def _received(admin: str) -> bool:
    result = subprocess.run(
        ["curl", "-s", f"http://{admin}/metrics"], capture_output=True, text=True, timeout=30
    )
    return (
        parse_metrics(result.stdout).get('coronet_instances_received_total{status="success"}', 0)
        >= 1
    )


def test_every_command_line_of_the_readme_runs(tmp_path: Path) -> None:
    _scratch(tmp_path)
    lines = shell_lines(README.read_text(encoding="utf-8"))
    env = {**coronet_env(), "ADMIN_PASSWORD": PASSWORD}
    stack = ChildProcess(
        [
            str(tmp_path / ".venv" / "bin" / "coronet"),
            *("run", "--config", "configs/node.yaml", "--set", f"node.port={free_port()}"),
            *("--heatmap", "fast", "--threads", "1"),
        ],
        cwd=tmp_path,
        env=env,
    )
    with stack:
        stack.wait_for_line("CoroNet is running", timeout=240)
        state = json.loads((tmp_path / "var" / "run" / "state.json").read_text())
        admin = f"127.0.0.1:{state['admin']['port']}"
        for line in lines:
            if line.startswith("make "):
                continue  # the make targets are checked above; this test runs inside them
            if line.startswith("curl "):
                wait_until(lambda: _received(admin), 180, "the demo study at the node", 1.0)
            command = line.replace(README_ADMIN, admin)
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                env=env,
                input=PASSWORD + "\n",
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
            if "/healthz" in line:
                assert json.loads(result.stdout)["checks"]["broker"]["ok"]
            if "/api/v1/studies" in line:
                assert json.loads(result.stdout)[0]["modality"] == "CR"
    config = (tmp_path / "configs" / "node.yaml").read_text()
    assert "HOSPITAL_PACS" in config and "main-pacs" in config and "demo-pacs" not in config
    assert (tmp_path / "results" / "chest.sr.dcm").exists()
