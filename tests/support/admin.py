"""Talking to the node's admin service: an HTTP client, users, metrics and audit messages."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import httpx

from dicom_node.admin.users import UserStore

USER = "admin"
PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class Admin:
    """The admin service of a node started from configuration ``data`` (tests.support.settings)."""

    url: str
    user: str = USER
    password: str = PASSWORD

    @classmethod
    def of(cls, data: dict[str, Any]) -> Admin:
        """The service of ``data``, with the test user added to its users file."""
        UserStore(Path(data["admin"]["users_file"])).add(USER, PASSWORD)
        return cls(f"http://127.0.0.1:{data['admin']['port']}")

    def client(self, *, auth: bool = True) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            auth=(self.user, self.password) if auth else None,
            timeout=30.0,
            follow_redirects=False,
        )

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        with self.client() as client:
            return client.get(path, **kwargs)

    def post(self, path: str, body: Any = None) -> httpx.Response:
        with self.client() as client:
            return client.post(path, json=body if body is not None else {})

    def delete(self, path: str) -> httpx.Response:
        with self.client() as client:
            return client.delete(path)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{'name{labels}': value}`` (the text format, parsed simply)."""
        with self.client(auth=False) as client:
            text = client.get("/metrics").text
        return parse_metrics(text)


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples[match.group(1)] = float(match.group(2))
    return samples


def audit_messages(path: Path) -> list[ET.Element]:
    """Every line of an audit file, parsed (a malformed line fails the test)."""
    return [ET.fromstring(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def event_id(message: ET.Element) -> str:
    element = message.find("EventIdentification/EventID")
    assert element is not None
    return element.attrib["csd-code"]


def event_types(message: ET.Element) -> list[str]:
    return [e.attrib["csd-code"] for e in message.findall("EventIdentification/EventTypeCode")]
