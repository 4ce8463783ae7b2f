"""The web console in a real browser: headless Chromium (Debian's chromium and chromium-driver,
driven by selenium; nothing is downloaded) logs in, adds a caller, sees a delivered study and
retries a dead letter, against a node, a worker, Redis and storescp.  The screenshots go to the
test's folder, and to ``$SCREENSHOT_DIR`` when set (``make screenshots`` writes the README's
``docs/images/console-*.png``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, generate_uid
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

import monai_bundle
from dicom_node.core.spool import key_for
from tests.support.admin import PASSWORD, USER, Admin
from tests.support.browser import headless_chromium
from tests.support.node import node_process, run_storescu
from tests.support.polling import wait_until
from tests.support.processes import ChildProcess
from tests.support.redis_server import RedisServer
from tests.support.results import phantom_source
from tests.support.settings import node_data, write_config
from tests.support.storescp import StoreSCP, running_storescp

pytestmark = pytest.mark.integration

BUNDLE = Path(monai_bundle.__file__).resolve().parent
WORKER = ("--concurrency", "1", "--threads", "1", "--heatmap", "off", "--max-retries", "0")
#: The console's screenshots (docs/images/console-*.png) are this size.
WINDOW = (1280, 1100)


@pytest.fixture(name="browser")
def browser_fixture(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile; selenium never looks for a browser online."""
    with headless_chromium(tmp_path / "profile", WINDOW) as driver:
        yield driver


def _send(folder: Path, port: int, accession: str) -> str:
    path = folder / "in" / f"{accession}.dcm"
    ds = phantom_source(path, study_uid=generate_uid())
    ds.AccessionNumber = accession
    ds.StudyDate = "20261201"
    ds.save_as(path, enforce_file_format=True)
    assert run_storescu([path], port).returncode == 0
    return str(ds.StudyInstanceUID)


def _state(admin: Admin, study_uid: str) -> str:
    response = admin.get(f"/api/v1/studies/{key_for(study_uid)}")
    return str(response.json()["state"]) if response.status_code == 200 else ""


def _row_state(browser: WebDriver, study_uid: str) -> str:
    browser.get(browser.current_url.split("?")[0])
    _text_of(browser, "#studies")
    rows = browser.find_elements(By.CSS_SELECTOR, f"tr.study[data-key='{key_for(study_uid)}']")
    return rows[0].get_attribute("data-state") or "" if rows else ""


def _text_of(browser: WebDriver, css: str, contains: str = "") -> str:
    """The text of the element ``css`` once the page shows it (with ``contains``)."""

    def probe() -> str:
        for element in browser.find_elements(By.CSS_SELECTOR, css):
            text = element.text
            if contains in text:
                return text or " "
        return ""

    return wait_until(probe, 30, f"{css} with {contains!r}", 0.1)


def _screenshot(browser: WebDriver, folder: Path, name: str) -> None:
    """The whole page, at the console's usual width, in ``folder`` and ``$SCREENSHOT_DIR``."""
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.set_window_size(1280, min(max(height + 160, 600), 4000))
    folders = [folder]
    if os.environ.get("SCREENSHOT_DIR"):
        folders.append(Path(os.environ["SCREENSHOT_DIR"]))
    for target in folders:
        target.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target / name))


def _submit(browser: WebDriver, form: str, **fields: str) -> None:
    for name, value in fields.items():
        element = browser.find_element(By.CSS_SELECTOR, f"{form} input[name='{name}']")
        element.clear()
        element.send_keys(value)
    browser.find_element(By.CSS_SELECTOR, f"{form} button[type='submit']").click()


def test_an_admin_logs_in_adds_a_caller_sees_a_delivered_study_and_retries_a_dead_letter(
    tmp_path: Path, redis: RedisServer, browser: WebDriver
) -> None:
    with running_storescp(tmp_path / "pacs", ae_title="MAINPACS") as pacs:
        late = StoreSCP(tmp_path / "archive", ae_title="ARCHIVE")  # down until the retry
        data = node_data(
            tmp_path,
            redis.url,
            destinations=[pacs.destination("main-pacs")],
            model={"bundle_dir": str(BUNDLE), "device": "cpu"},
            admin={"worker_timeout": 120},
        )
        config = write_config(tmp_path / "node.yaml", data)
        admin = Admin.of(data)
        port = int(data["node"]["port"])
        worker = ChildProcess.coronet(["worker", "--config", str(config), *WORKER], cwd=tmp_path)
        try:
            with node_process(config, tmp_path):
                worker.wait_for(lambda out: "loaded on" in out, "the worker's model", 180)
                delivered = _send(tmp_path, port, "ACC-1001")
                wait_until(lambda: _state(admin, delivered) == "delivered", 120, "delivery")
                assert admin.post("/api/v1/destinations", late.destination("archive")).is_success
                dead = _send(tmp_path, port, "ACC-1002")
                wait_until(lambda: _state(admin, dead) == "dead-lettered", 120, "a dead letter")

                browser.get(admin.url + "/")
                assert browser.current_url.endswith("/login")
                _screenshot(browser, tmp_path / "screenshots", "console-login.png")
                _submit(browser, "form[action='/login']", username=USER, password=PASSWORD)
                _text_of(browser, "#callers", "STORESCU")

                _submit(browser, "#add-caller", ae_title="WARD_CR_2", host="127.0.0.1")
                _text_of(browser, "#flash", "Caller WARD_CR_2 added")
                assert "WARD_CR_2" in _text_of(browser, "#callers")
                assert "WARD_CR_2" in config.read_text()

                assert _row_state(browser, delivered) == "delivered"
                assert _row_state(browser, dead) == "dead-lettered"
                letters = browser.find_element(By.ID, "dead-letters").text
                assert "archive" in letters and "ACC-1002" in letters
                _screenshot(browser, tmp_path / "screenshots", "console-studies.png")

                late.start()
                browser.find_element(By.CSS_SELECTOR, "#dead-letters button.retry").click()
                _text_of(browser, "#flash", "queued again")
                wait_until(
                    lambda: _row_state(browser, dead) == "delivered", 120, "the retried study"
                )
                assert "none" in browser.find_element(By.ID, "dead-letters").text
                _screenshot(browser, tmp_path / "screenshots", "console-retried.png")
        finally:
            worker.stop()
            late.stop()
    received = [ds for _, ds in late.received() if ds.SOPClassUID == Comprehensive3DSRStorage]
    assert [ds.AccessionNumber for ds in received] == ["ACC-1002"]
