"""Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by selenium.

Usage::

    with headless_chromium(tmp_path / "profile") as browser:
        browser.get(url)
        text = page_text(browser)

The system browser and driver are named explicitly, so selenium's manager never downloads one;
the profile is fresh; background networking, component updates, sync and QUIC are off, and
every host name but loopback addresses resolves to nothing, so the page cannot reach beyond
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1600, 1000)
PAGE_LOAD_TIMEOUT_S = 60

#: The flags every test browser runs with.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # WebGL in software: the viewer's renderer needs it, and there is no GPU.
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    # Any host name other than loopback resolves to nothing.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost",
)

#: Everything a person can read on the page: the HTML text and the SVG annotation text.
_PAGE_TEXT_SCRIPT = """
const parts = [document.body.innerText];
for (const node of document.querySelectorAll('svg text')) { parts.push(node.textContent); }
return parts.join('\\n');
"""


class BrowserError(RuntimeError):
    """The browser or its driver is missing."""


@contextlib.contextmanager
def headless_chromium(
    profile: Path, window: tuple[int, int] = WINDOW
) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a fresh profile in ``profile`` and a ``window`` (width,
    height) in pixels; quit on exit."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            raise BrowserError(f"{binary} is not installed (run `make system-deps`)")
    profile.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={window[0]},{window[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Offline: selenium's manager must not look for a browser or driver of its own.
    os.environ["SE_OFFLINE"] = "true"
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver: webdriver.Chrome) -> str:
    """The page's visible text and the text of its SVG drawings (e.g. annotation labels)."""
    text: str = driver.execute_script(_PAGE_TEXT_SCRIPT)
    return text


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """Console messages of level SEVERE since the last call."""
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return [str(e.get("message", "")) for e in entries if e.get("level") == "SEVERE"]
