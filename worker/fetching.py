"""Fetching a task's instances from the node over HTTP (:mod:`dicom_node.core.fetch`).

:class:`NodeClient` makes the three requests with a deadline on every step: connecting, each
read (``fetch.timeout``), and the whole transfer (the timeout plus the declared length at
:data:`MIN_RATE`).  Every length the node sends is checked before memory or disk is spent: an
instance larger than ``node.limits.max_instance_bytes`` (or than the study listing said), a
listing larger than :data:`~dicom_node.core.fetch.MAX_STUDY_BYTES`.  The body is read raw
(``Accept-Encoding: identity``; nothing is inflated), counted, and checked against its
``Content-Length`` and its ``Repr-Digest`` SHA-256 before it is renamed into the cache.

A failed request is tried again at once a few times with :func:`~dicom_node.core.backoff.
backoff_delay` (a blip); then :class:`~worker.sources.SourceUnavailable` makes the Celery task
retry with its own backoff.  403 is :class:`~worker.sources.SourceRefused`, 404
:class:`~worker.sources.SourceGone`.

:class:`FetchCache` keeps verified instances under ``fetch.cache_dir/<study>/<instance>.dcm``
until their study's task is over; :class:`RemoteSource` is the
:class:`~worker.sources.InstanceSource` of one task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx

from dicom_node.core.backoff import backoff_delay
from dicom_node.core.durable import TMP_SUFFIX, fsync_dir, temp_path
from dicom_node.core.errors import ConfigError, IngestError
from dicom_node.core.fetch import (
    DIGEST_HEADER,
    MAX_STUDY_BYTES,
    instance_url,
    parse_digest,
    report_url,
)
from dicom_node.core.settings import Settings
from dicom_node.core.spool import check_key
from worker.sources import SourceGone, SourceRefused, SourceUnavailable

logger = logging.getLogger(__name__)

MIN_RATE: Final = 1 << 20
"""Bytes per second a transfer must average, beyond ``fetch.timeout``, before it is cut."""
ATTEMPTS: Final = 3
"""Tries of one request before the task is retried by Celery."""
_T = TypeVar("_T")


@dataclass(frozen=True)
class RemoteInstance:
    """One instance of a study listing (:mod:`dicom_node.core.fetch`)."""

    instance_key: str
    selected: bool
    done: bool
    bytes: int
    received: float | None


@dataclass(frozen=True)
class StudyListing:
    instances: list[RemoteInstance]
    lost: list[str]


def parse_listing(data: Any, study_key: str) -> StudyListing:
    """A study listing, checked; SourceUnavailable when it is not one (a broken proxy...)."""
    try:
        if not isinstance(data, dict) or data.get("study_key") != study_key:
            raise ValueError("not this study's listing")
        instances = [
            RemoteInstance(
                check_key(item["instance_key"]),
                bool(item["selected"]),
                bool(item["done"]),
                int(item["bytes"]),
                None if item.get("received") is None else float(item["received"]),
            )
            for item in data["instances"]
        ]
        lost = [check_key(key) for key in data.get("lost", [])]
    except (KeyError, TypeError, ValueError, IngestError) as err:
        raise SourceUnavailable(f"the node's study listing is malformed: {err}") from err
    return StudyListing(instances, lost)


class NodeClient:
    """The HTTP side of fetching (see the module docstring); one per worker process."""

    def __init__(
        self,
        timeout: float,
        max_instance_bytes: int,
        *,
        verify: ssl.SSLContext | bool = True,
        attempts: int = ATTEMPTS,
        pause: float = 0.5,
    ) -> None:
        self.timeout = timeout
        self.max_instance_bytes = max_instance_bytes
        self.attempts = attempts
        self.pause = pause
        self._verify = verify
        self._client: httpx.Client | None = None
        self._pid = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeClient:
        verify: ssl.SSLContext | bool = True
        ca_file = settings.fetch.ca_file
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(
                    f"fetch.ca_file {ca_file}: {err}", [("fetch.ca_file", str(err))]
                ) from err
        return cls(settings.fetch.timeout, settings.node.limits.max_instance_bytes, verify=verify)

    def client(self) -> httpx.Client:
        if self._client is None or self._pid != os.getpid():  # never share sockets across fork
            self._client = httpx.Client(
                timeout=httpx.Timeout(self.timeout),
                verify=self._verify,
                follow_redirects=False,
                headers={"Accept-Encoding": "identity", "User-Agent": "coronet-worker"},
            )
            self._pid = os.getpid()
        return self._client

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None

    def _retrying(self, what: str, call: Callable[[], _T]) -> _T:
        for attempt in range(self.attempts):
            try:
                return call()
            except SourceUnavailable as err:
                if attempt + 1 >= self.attempts:
                    raise
                delay = backoff_delay(attempt, self.pause, 8 * self.pause, jitter=True)
                logger.warning("%s: %s; trying again in %.1f s", what, err, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def study(self, url: str, study_key: str) -> StudyListing:
        """The study listing at ``url`` (the task's fetch URL)."""

        def get() -> StudyListing:
            with self._request("GET", url) as response:
                body = _read_bounded(response, MAX_STUDY_BYTES, self._deadline(MAX_STUDY_BYTES))
            try:
                return parse_listing(json.loads(body), study_key)
            except ValueError as err:
                raise SourceUnavailable(f"the node's study listing is not JSON: {err}") from err

        return self._retrying(f"study {study_key}", get)

    def instance(self, url: str, target: Path, expected_bytes: int | None) -> None:
        """Download the instance at ``url`` to ``target``, verified (see the module doc)."""
        limit = self.max_instance_bytes
        if expected_bytes is not None:
            if expected_bytes > limit:
                raise SourceGone(f"the instance has {expected_bytes} bytes, over {limit}")
            limit = expected_bytes

        def get() -> None:
            with self._request("GET", url) as response:
                declared = _content_length(response, limit)
                digest = parse_digest(response.headers.get(DIGEST_HEADER))
                if digest is None:
                    raise SourceUnavailable(f"the node sent no {DIGEST_HEADER} sha-256")
                _download(response, target, declared, digest, self._deadline(declared))

        self._retrying(f"instance {target.stem}", get)

    def report(self, url: str, done: Iterable[str], dead: dict[str, str]) -> None:
        """Tell the node which instances are finished (and which were dead-lettered)."""
        body = json.dumps({"done": list(done), "dead": dead}).encode("utf-8")

        def post() -> None:
            with self._request(
                "POST", url, content=body, headers={"Content-Type": "application/json"}
            ) as response:
                _read_bounded(response, 4096, self._deadline(4096))

        self._retrying("report to the node", post)

    def _deadline(self, size: int) -> float:
        return time.monotonic() + self.timeout + size / MIN_RATE

    def _request(self, method: str, url: str, **kwargs: Any) -> _Response:
        try:
            response = self.client().send(
                self.client().build_request(method, url, **kwargs), stream=True
            )
        except httpx.HTTPError as err:
            raise SourceUnavailable(f"the node did not answer: {_describe(err)}") from err
        return _Response(response)


class _Response:
    """A streamed response whose status is classified on entry and that is closed on exit."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __enter__(self) -> httpx.Response:
        status = self.response.status_code
        if status == 200:
            return self.response
        self.response.close()
        if status == 403:
            raise SourceRefused("the node refused the task's fetch ticket (expired or not valid)")
        if status == 404:
            raise SourceGone("the node does not hold it (removed)")
        raise SourceUnavailable(f"the node answered HTTP {status}")

    def __exit__(self, *exc: object) -> None:
        self.response.close()


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _content_length(response: httpx.Response, limit: int) -> int:
    raw = response.headers.get("content-length")
    if raw is None or not raw.isdigit():
        raise SourceUnavailable("the node sent no Content-Length")
    declared = int(raw)
    if declared > limit:
        raise SourceGone(f"the node offers {declared} bytes, over the limit of {limit}")
    return declared


def _chunks(response: httpx.Response, deadline: float) -> Iterator[bytes]:
    try:
        for chunk in response.iter_raw():
            if time.monotonic() > deadline:
                raise SourceUnavailable("the transfer took too long")
            yield chunk
    except httpx.HTTPError as err:
        raise SourceUnavailable(f"the transfer broke off: {_describe(err)}") from err


def _read_bounded(response: httpx.Response, limit: int, deadline: float) -> bytes:
    body = bytearray()
    for chunk in _chunks(response, deadline):
        body += chunk
        if len(body) > limit:
            raise SourceUnavailable(f"the node's answer exceeds {limit} bytes")
    return bytes(body)


def _download(
    response: httpx.Response, target: Path, declared: int, digest: bytes, deadline: float
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target.parent, target.name)
    try:
        sha256, count = hashlib.sha256(), 0
        with tmp.open("wb") as out:
            for chunk in _chunks(response, deadline):
                count += len(chunk)
                if count > declared:
                    raise SourceUnavailable("the node sent more than its Content-Length")
                sha256.update(chunk)
                out.write(chunk)
        if count != declared:
            raise SourceUnavailable(f"the transfer ended after {count} of {declared} bytes")
        if sha256.digest() != digest:
            raise SourceUnavailable("the instance's SHA-256 does not match the node's digest")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class FetchCache:
    """Verified fetched instances, per study, until the study's task is over."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, study_key: str, instance_key: str) -> Path:
        return self.root / check_key(study_key) / f"{check_key(instance_key)}.dcm"

    def remove_study(self, study_key: str) -> None:
        shutil.rmtree(self.root / check_key(study_key), ignore_errors=True)

    def sweep(self, older_than: float) -> int:
        """Remove partial downloads and studies untouched for ``older_than`` seconds."""
        removed, now = 0, time.time()
        try:
            folders = [p for p in self.root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return 0
        for folder in folders:
            for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                removed += 1
            try:
                stale = now - folder.stat().st_mtime > older_than
            except FileNotFoundError:
                continue
            if stale:
                removed += sum(1 for _ in folder.glob("*.dcm"))
                shutil.rmtree(folder, ignore_errors=True)
        if removed and self.root.exists():
            fsync_dir(self.root)
        return removed


class RemoteSource:
    """The :class:`~worker.sources.InstanceSource` of one task: its study at its fetch URL."""

    def __init__(self, client: NodeClient, cache: FetchCache, url: str, study_key: str) -> None:
        self.client = client
        self.cache = cache
        self.url = url
        self.study_key = study_key
        self._listing: StudyListing | None = None

    def _check(self, study_key: str) -> None:
        if study_key != self.study_key:
            raise IngestError(f"this task's fetch URL is for study {self.study_key}")

    def listing(self, study_key: str) -> StudyListing:
        self._check(study_key)
        if self._listing is None:
            self._listing = self.client.study(self.url, study_key)
        return self._listing

    def instances(self, study_key: str) -> list[RemoteInstance]:
        self._listing = None  # each run lists the study afresh
        return self.listing(study_key).instances

    def lost_instances(self, study_key: str) -> list[str]:
        return list(self.listing(study_key).lost)

    def instance_file(self, study_key: str, instance_key: str) -> Path:
        path = self.cache.path(study_key, instance_key)
        if path.is_file():
            return path
        listed = {i.instance_key: i for i in self.listing(study_key).instances}
        if instance_key not in listed:
            raise SourceGone(f"the node does not list instance {instance_key}")
        started = time.perf_counter()
        self.client.instance(instance_url(self.url, instance_key), path, listed[instance_key].bytes)
        logger.debug(
            "study %s instance %s fetched in %.3f s",
            study_key,
            instance_key,
            time.perf_counter() - started,
        )
        return path

    def mark_done(self, study_key: str, instance_keys: Iterable[str]) -> None:
        self._check(study_key)
        keys = list(instance_keys)
        if keys:
            self.client.report(report_url(self.url), keys, {})

    def mark_dead(self, study_key: str, instance_key: str, reason: str) -> None:
        self._check(study_key)
        self.client.report(report_url(self.url), [], {instance_key: reason})

    def release(self, study_key: str) -> None:
        self.cache.remove_study(study_key)


__all__ = [
    "FetchCache",
    "NodeClient",
    "RemoteInstance",
    "RemoteSource",
    "StudyListing",
    "parse_listing",
]
