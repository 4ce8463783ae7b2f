"""Instances over the network: the contract between the node's fetch endpoint and the workers.

A worker on another host shares no folder with the node.  The node publishes each task with
a *fetch URL* for its study (:class:`Locator`), signed with the node's secret and valid for
``fetch.url_ttl`` seconds; a worker needs nothing else to reach the instances::

    GET  <base>/fetch/v1/studies/<study_key>?ticket=T                    the study (JSON below)
    GET  <base>/fetch/v1/studies/<study_key>/instances/<instance_key>?ticket=T
                                                                         the instance, PS3.10
    POST <base>/fetch/v1/studies/<study_key>/report?ticket=T             what the worker finished

The ticket ``T`` (itsdangerous, HMAC-SHA1 of the node's secret, with a salt of its own and a
timestamp) names one study key and grants those three requests for that study only, until it
expires.  A tampered ticket, one for another study and an expired one are all refused (403).

The study (``application/json``): ``{"format": 1, "study_key", "instances": [{"instance_key",
"selected", "done", "bytes", "received"}], "lost": [instance_key, ...]}`` (lost: queued, not
done, file gone; see :meth:`dicom_node.core.spool.Spool.lost_instances`).

An instance (``application/dicom``) comes with ``Content-Length`` and ``Repr-Digest:
sha-256=:<base64>:`` (RFC 9530); the worker checks both before it uses a byte.

A report (``application/json``, at most :data:`MAX_REPORT_BYTES`): ``{"done": [instance_key,
...], "dead": {instance_key: reason}}``; the node marks them done in its spool and records the
dead letters in its own outbox, where the console shows them.

Status codes, and what a worker makes of them: 200 (fine), 403 (ticket refused: the task is
stale), 404 (the study or instance is gone from the node: permanent), anything else or no
answer (transient: retry with backoff).  Keys are spool keys (hashes), never UIDs.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit, urlunsplit

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from dicom_node.core.durable import replace_text
from dicom_node.core.errors import IngestError
from dicom_node.core.settings import Settings
from dicom_node.core.spool import check_key

PATH_PREFIX: Final = "/fetch/v1"
TICKET_PARAM: Final = "ticket"
DIGEST_HEADER: Final = "Repr-Digest"
MAX_REPORT_BYTES: Final = 1 << 20
MAX_STUDY_BYTES: Final = 16 << 20
"""Largest study listing a worker reads (about 100 000 instances)."""
MAX_URL_LENGTH: Final = 2048
SPOOL_ID_FILE: Final = "spool.id"
_SALT: Final = "coronet-fetch-ticket"


class TicketRefused(Exception):
    """A fetch ticket is malformed, tampered with, for another study, or expired."""


class TicketSigner:
    """Signs and checks the tickets of :mod:`dicom_node.core.fetch`."""

    def __init__(self, secret: bytes, ttl: float) -> None:
        self.ttl = ttl
        self._serializer = URLSafeTimedSerializer(secret, salt=_SALT)

    def sign(self, study_key: str) -> str:
        return self._serializer.dumps({"s": check_key(study_key)})

    def check(self, ticket: str, study_key: str) -> None:
        """Raise :class:`TicketRefused` unless ``ticket`` grants ``study_key`` now."""
        if not ticket or len(ticket) > MAX_URL_LENGTH:
            raise TicketRefused("no ticket")
        try:
            data = self._serializer.loads(ticket, max_age=int(self.ttl))
        except SignatureExpired as err:
            raise TicketRefused("the ticket expired") from err
        except BadSignature as err:
            raise TicketRefused("the ticket's signature does not match") from err
        if not isinstance(data, dict) or data.get("s") != study_key:
            raise TicketRefused("the ticket is for another study")


def study_path(study_key: str) -> str:
    return f"{PATH_PREFIX}/studies/{check_key(study_key)}"


def study_url(base: str, study_key: str, ticket: str) -> str:
    """The fetch URL of a study (what a task carries)."""
    return f"{base.rstrip('/')}{study_path(study_key)}?{TICKET_PARAM}={quote(ticket, safe='')}"


def _below(url: str, *parts: str) -> str:
    split = urlsplit(url)
    path = "/".join([split.path.rstrip("/"), *parts])
    return urlunsplit((split.scheme, split.netloc, path, split.query, ""))


def instance_url(study: str, instance_key: str) -> str:
    """The URL of one instance, from its study's fetch URL."""
    return _below(study, "instances", check_key(instance_key))


def report_url(study: str) -> str:
    """The URL that takes a worker's report, from the study's fetch URL."""
    return _below(study, "report")


def check_study_url(url: str, study_key: str) -> str:
    """``url`` if it can be a fetch URL of ``study_key``; IngestError otherwise."""
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        raise IngestError("a fetch URL must be a string of at most 2048 characters")
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.netloc:
        raise IngestError("a fetch URL must be http or https")
    if not split.path.endswith(study_path(study_key)) or f"{TICKET_PARAM}=" not in split.query:
        raise IngestError("the fetch URL is not the task's study")
    return url


def digest_header(sha256: bytes) -> str:
    """``Repr-Digest`` (RFC 9530) of a SHA-256 digest."""
    return f"sha-256=:{base64.b64encode(sha256).decode('ascii')}:"


def parse_digest(value: str | None) -> bytes | None:
    """The SHA-256 of a ``Repr-Digest`` header, or None if it has none."""
    for item in (value or "").split(","):
        name, _, encoded = item.strip().partition("=")
        if name.strip().lower() == "sha-256" and encoded.startswith(":") and encoded.endswith(":"):
            try:
                raw = base64.b64decode(encoded[1:-1], validate=True)
            except ValueError:
                return None
            return raw if len(raw) == hashlib.sha256().digest_size else None
    return None


def spool_identity(spool_dir: Path, *, create: bool = False) -> str | None:
    """The random identity of a spool folder (``spool.id``), made by the node at its start.

    A worker compares it with the one its task carries to know that its ``spool_dir`` is the
    node's (``fetch.direct_spool``)."""
    path = spool_dir / SPOOL_ID_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    if text or not create:
        return text or None
    text = secrets.token_hex(16)
    replace_text(path, text + "\n")
    return text


def default_base_url(settings: Settings) -> str:
    """``fetch.url``, or the admin service's own address (see :class:`FetchSettings`)."""
    if settings.fetch.url:
        return settings.fetch.url.rstrip("/")
    admin = settings.admin
    host = admin.host
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if admin.tls is not None else "http"
    return f"{scheme}://{host}:{admin.port}"


@dataclass(frozen=True)
class Locator:
    """What the node adds to each task: its study's signed fetch URL and the spool identity."""

    signer: TicketSigner
    base_url: str
    spool_id: str

    def task_kwargs(self, study_key: str) -> Mapping[str, str]:
        url = study_url(self.base_url, study_key, self.signer.sign(study_key))
        return {"fetch": url, "spool": self.spool_id}


__all__ = [
    "DIGEST_HEADER",
    "MAX_REPORT_BYTES",
    "MAX_STUDY_BYTES",
    "PATH_PREFIX",
    "TICKET_PARAM",
    "Locator",
    "TicketRefused",
    "TicketSigner",
    "check_study_url",
    "default_base_url",
    "digest_header",
    "instance_url",
    "parse_digest",
    "report_url",
    "spool_identity",
    "study_url",
]
