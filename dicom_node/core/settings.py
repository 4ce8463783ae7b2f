"""Typed settings of the CoroNet node, loaded from one YAML file.

Precedence, highest first: ``--set key=value`` on the command line, ``CORONET_*``
environment variables, the YAML file, then the defaults below.

An environment variable names a field path with ``__`` between levels, e.g.
``CORONET_NODE__PORT=11113`` or ``CORONET_BROKER__URL=redis://127.0.0.1:6380/0``.
Values given on the command line or in the environment are parsed as YAML scalars or flow
collections, so ``--set node.port=11113`` is an integer and ``--set selection.modalities=[CR]``
a list.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.core.errors import ConfigError
from dicom_node.core.uids import is_conformant_uid, strip_padding

ENV_PREFIX = "CORONET_"
DEFAULT_CONFIG = Path("configs/node.yaml")

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate_ae_title(value: str) -> str:
    """Check an Application Entity title against the AE value representation (PS3.5 6.2).

    At most 16 characters of the default repertoire, no backslash, no control characters and not
    only spaces.  Leading and trailing spaces are not significant, so they are removed.
    """
    if not isinstance(value, str):
        raise ValueError("an AE title must be a string")
    if _CONTROL_CHARS.search(value):
        raise ValueError("an AE title must not contain control characters (PS3.5 6.2)")
    if "\\" in value:
        raise ValueError("an AE title must not contain a backslash (PS3.5 6.2)")
    if not value.isascii():
        raise ValueError("an AE title must use the default character repertoire (PS3.5 6.2)")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("an AE title must not be empty or all spaces (PS3.5 6.2)")
    if len(stripped) > 16:
        raise ValueError(f"an AE title has at most 16 characters, got {len(stripped)} (PS3.5 6.2)")
    return stripped


def _validate_host(value: str) -> str:
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


def _validate_uid(value: str) -> str:
    if not is_conformant_uid(value) or strip_padding(value) != value:
        raise ValueError(f"{value!r} is not a valid DICOM UID (PS3.5 9.1)")
    return value


AETitle = Annotated[str, AfterValidator(validate_ae_title)]
Host = Annotated[str, AfterValidator(_validate_host)]
Port = Annotated[int, Field(ge=1, le=65535)]
UID = Annotated[str, AfterValidator(_validate_uid)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Model):
    """TLS for a listener or a destination (PS3.15 B.9: TLS 1.2 at minimum)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _pair(self) -> TLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file to verify client certificates")
        return self


class Timeouts(_Model):
    """Association timeouts in seconds (pynetdicom's ACSE, DIMSE and network timeouts)."""

    acse: float = Field(30.0, gt=0)
    dimse: float = Field(60.0, gt=0)
    network: float = Field(60.0, gt=0)


_MB = 1 << 20


class NodeLimits(_Model):
    """What one peer may make the node hold, checked before memory or disk is spent on it.

    Every PDU's declared length is checked before it is read; every read has a deadline (the
    network timeout per PDU, the ACSE timeout until the association is negotiated).
    """

    max_associate_request_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=_MB,
        description="largest A-ASSOCIATE-RQ PDU accepted (PS3.8 9.3.2); larger ones are closed",
    )
    max_pending_connections: int = Field(
        32, ge=1, le=10_000, description="connections not yet associated, from all peers"
    )
    max_pending_per_peer: int = Field(
        4, ge=1, le=1000, description="connections not yet associated, from one address"
    )
    max_instance_bytes: int = Field(
        1024 * _MB, ge=_MB, description="largest data set of one C-STORE, counted while it streams"
    )
    max_element_bytes: int = Field(
        16 * _MB,
        ge=1024,
        description="largest element before Pixel Data; a larger one is refused (0xA700)",
    )
    max_inflated_bytes: int = Field(
        1024 * _MB,
        ge=_MB,
        description="largest Deflated Explicit VR data set once inflated; counted while inflating",
    )


class NodeSettings(_Model):
    """Our own Application Entity: the Storage SCP that the PACS sends to."""

    ae_title: AETitle = "CORONET"
    host: Host = "127.0.0.1"
    port: Port = 11112
    max_associations: int = Field(10, ge=1, le=1000)
    timeouts: Timeouts = Timeouts()
    limits: NodeLimits = NodeLimits()
    tls: TLSSettings | None = None
    extra_sop_classes: list[UID] = Field(
        default_factory=list,
        description="Storage SOP Class UIDs accepted besides CR and DX, e.g. a CT for tests.",
    )
    accept_deflate: bool = False


class Caller(_Model):
    """A calling AE allowed to associate with the node; ``host`` restricts its address."""

    ae_title: AETitle
    host: Host | None = None


class Destination(_Model):
    """A Storage SCP (usually the PACS) that receives our SR and SC results."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: Host
    port: Port
    tls: TLSSettings | None = None


_GB = 1 << 30


class StorageSettings(_Model):
    """Folders for received instances (spool) and results waiting for delivery (outbox), the
    free-space floor, and how long delivered studies are kept."""

    spool_dir: Path = Path("var/spool")
    outbox_dir: Path = Path("var/outbox")
    min_free_bytes: int = Field(
        _GB,
        ge=0,
        description="below this many free bytes on the spool's file system every C-STORE is "
        "answered 0xA700 (Refused: Out of resources) and /healthz fails; 0: no floor",
    )
    retention: float | None = Field(
        30.0,
        gt=0,
        description="days after which a delivered study's spool and outbox files are removed "
        "(by the node every prune_interval, or by `coronet storage prune`); null: keep them. "
        "Dead letters and undelivered studies are never removed automatically",
    )
    prune_interval: float = Field(
        3600.0, ge=1, le=7 * 86400, description="seconds between two prune runs of the node"
    )


class BrokerSettings(_Model):
    """The Celery broker (Redis) and the queue that the node posts studies to."""

    url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^(redis|rediss)://")
    queue: str = Field("coronet", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")


class ModelSettings(_Model):
    """Where the MONAI bundle is, which device runs it, and the limits on decoding an image.

    The worker checks each image against ``max_pixels`` and its own pixel data before decoding
    it, then decodes it in a separate process limited to ``decode_memory_mb`` and
    ``decode_timeout`` (``worker.decoder``); an image beyond a limit is reported unassessable.
    """

    bundle_dir: Path = Path("monai_bundle")
    device: str = Field("auto", description="auto, cpu or cuda:N")
    max_pixels: int = Field(
        25_000_000,
        ge=64 * 64,
        le=8192 * 8192,
        description="largest image decoded, Rows x Columns x Samples per Pixel x frames "
        "(25 Mpx; chest radiographs are 3-18 Mpx)",
    )
    decode_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds one image may take to decode"
    )
    decode_memory_mb: int = Field(
        2048,
        ge=64,
        le=1 << 20,
        description="memory (address space, MB) the decoder process may add to its start-up "
        "size for one image; a 25 Mpx image needs about 700",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu or cuda:N, got {value!r}")
        return value


#: Modalities of chest radiographs: Computed Radiography and Digital X-Ray (PS3.3 C.7.3.1.1.1).
CHEST_MODALITIES: tuple[str, ...] = ("CR", "DX")
#: Body Part Examined of a chest (PS3.16 Annex L); THORAX and LUNG are common vendor spellings.
CHEST_BODY_PARTS: tuple[str, ...] = ("CHEST", "THORAX", "LUNG")
#: Frontal View Positions (PS3.3 C.8.11.5.1.1); laterals and obliques are not for the model.
FRONTAL_VIEW_POSITIONS: tuple[str, ...] = ("PA", "AP")


class SelectionRules(_Model):
    """Which received instances are frontal chest radiographs for the model (``core.chest``).

    The rest are stored but not queued, and the worker calls them not assessable.
    """

    modalities: list[str] = Field(default_factory=lambda: list(CHEST_MODALITIES), min_length=1)
    body_parts: list[str] = Field(default_factory=lambda: list(CHEST_BODY_PARTS))
    allow_missing_body_part: bool = True
    view_positions: list[str] = Field(default_factory=lambda: list(FRONTAL_VIEW_POSITIONS))
    allow_missing_view_position: bool = True

    @field_validator("modalities", "body_parts", "view_positions")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values]


class GroupingSettings(_Model):
    """When a study is queued: after ``quiet_seconds`` without new instances, or per instance."""

    mode: Literal["study", "instance"] = "study"
    quiet_seconds: float = Field(5.0, ge=0, le=3600)


class ResultSettings(_Model):
    """Series of the results we create in the source study."""

    sr_series_number: int = Field(9901, ge=1, le=2**31 - 1)
    sr_series_description: str = Field(
        "CoroNet AI findings (not for diagnostic use)", max_length=64
    )
    sc_series_number: int = Field(9902, ge=1, le=2**31 - 1)
    sc_series_description: str = Field(
        "CoroNet AI attribution map (not for diagnostic use)", max_length=64
    )
    on_unassessable: Literal["report", "skip"] = Field(
        "report", description="report: an SR that says the image cannot be assessed; skip: no SR"
    )


_LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminSettings(_Model):
    """The admin HTTP service of ``coronet node serve``: console, REST API, health, metrics.

    It listens on loopback by default.  Any other address needs ``tls`` (HTTPS) unless
    ``allow_plain_http`` says that plain HTTP is wanted (e.g. behind a TLS proxy).
    """

    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 8480
    tls: TLSSettings | None = Field(
        None, description="HTTPS: cert_file and key_file (PEM) of the service"
    )
    allow_plain_http: bool = Field(
        False, description="allow plain HTTP on a non-loopback address (behind a TLS proxy)"
    )
    users_file: Path = Field(
        Path("var/admin/users"), description="NAME:argon2-hash lines; `coronet admin user add`"
    )
    secret_file: Path = Field(
        Path("var/admin/secret"),
        description="key that signs console sessions; made at the first start (mode 0600)",
    )
    session_minutes: float = Field(480.0, gt=0, le=7 * 24 * 60)
    worker_timeout: float = Field(
        300.0,
        ge=0,
        description="/healthz fails when no worker was seen for this many seconds; 0: no check",
    )
    show_patient_name: bool = Field(
        False, description="show Patient's Name in the study list (default: never)"
    )
    recent_studies: int = Field(100, ge=1, le=10_000, description="studies listed, newest first")

    @model_validator(mode="after")
    def _safe_binding(self) -> AdminSettings:
        if self.tls is not None and (self.tls.cert_file is None or self.tls.key_file is None):
            raise ValueError("admin.tls needs cert_file and key_file")
        if self.tls is None and not self.allow_plain_http and not is_loopback(self.host):
            raise ValueError(
                f"admin.host {self.host} is not a loopback address: set admin.tls "
                "(cert_file, key_file), or admin.allow_plain_http: true"
            )
        return self


class FetchSettings(_Model):
    """How workers get the instances of a task: over HTTP from the node, or from the spool.

    The node serves its spool to workers on its admin service (``/fetch/v1``); each task
    carries a URL signed with the node's secret (``admin.secret_file``) that is valid for
    ``url_ttl`` seconds, so a worker needs no credentials of its own.  A worker fetches
    unless ``direct_spool`` is true *and* its ``storage.spool_dir`` is the node's (the same
    spool identity); fetched instances are kept in ``cache_dir`` until their study is done.
    """

    url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="base URL at which workers reach the node's admin service, e.g. "
        "https://node.example.org:8480; default: from admin.host and admin.port (the host "
        "name when admin.host is 0.0.0.0 or ::)",
    )
    url_ttl: float = Field(
        6 * 3600.0,
        ge=60,
        le=7 * 86400,
        description="seconds a task's signed fetch URL is valid; a study still pending after "
        "that is queued again with a new URL",
    )
    direct_spool: bool = Field(
        False,
        description="worker: read instances from storage.spool_dir instead of fetching them "
        "when that folder is the node's spool (a worker on the node's host)",
    )
    cache_dir: Path = Field(
        Path("var/fetch-cache"), description="worker: fetched instances, until their study is done"
    )
    timeout: float = Field(
        30.0, gt=0, le=600, description="seconds to connect, and between two reads, per request"
    )
    ca_file: Path | None = Field(
        None, description="worker: CA certificates that verify the node's HTTPS certificate"
    )


class SyslogSettings(_Model):
    """An audit record repository reached by syslog (RFC 5424) over UDP (RFC 5426) or TLS
    (RFC 5425)."""

    host: Host
    port: Port = 514
    transport: Literal["udp", "tls"] = "udp"
    tls: TLSSettings | None = Field(
        None,
        description="with transport tls: ca_file verifies the repository, cert_file/"
        "key_file identify us",
    )


class AuditSettings(_Model):
    """The audit trail: DICOM audit messages (PS3.15 A.5, RFC 3881 XML), one per event."""

    sink: Literal["off", "file", "syslog"] = "file"
    file: Path = Field(
        Path("var/audit/audit.log"), description="with sink file: one message per line"
    )
    syslog: SyslogSettings | None = None
    source_id: str | None = Field(
        None,
        max_length=64,
        description="AuditSourceID of our messages (default: our AE title @ the host name)",
    )
    enterprise_site_id: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _sink_configured(self) -> AuditSettings:
        if self.sink == "syslog" and self.syslog is None:
            raise ValueError("audit.sink syslog needs audit.syslog {host, port, transport}")
        return self


class Settings(_Model):
    """The whole configuration file.  Its top-level keys are a contract for admins and docs."""

    node: NodeSettings = NodeSettings()
    callers: list[Caller] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    storage: StorageSettings = StorageSettings()
    broker: BrokerSettings = BrokerSettings()
    model: ModelSettings = ModelSettings()
    selection: SelectionRules = SelectionRules()
    grouping: GroupingSettings = GroupingSettings()
    results: ResultSettings = ResultSettings()
    admin: AdminSettings = AdminSettings()
    fetch: FetchSettings = FetchSettings()
    audit: AuditSettings = AuditSettings()

    @field_validator("callers")
    @classmethod
    def _unique_callers(cls, callers: list[Caller]) -> list[Caller]:
        _reject_duplicates((c.ae_title for c in callers), "caller AE title")
        return callers

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, destinations: list[Destination]) -> list[Destination]:
        _reject_duplicates((d.name for d in destinations), "destination name")
        return destinations

    def caller(self, ae_title: str) -> Caller | None:
        """The allowed caller with this AE title, if any (trailing spaces are not significant)."""
        title = ae_title.strip()
        return next((c for c in self.callers if c.ae_title == title), None)

    def destination(self, name: str) -> Destination:
        """The destination called ``name``; raises ConfigError with the known names."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"no destination named {name!r} (known: {known})")


def _reject_duplicates(values: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.field=value")
    return key.split("."), _parse_scalar(raw)


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any]]:
    overrides = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        overrides.append((path, _parse_scalar(raw)))
    return overrides


def _set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path[: i + 1])]
            continue
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict | list):
            raise ConfigError(
                f"cannot set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section"
            )
        node = child
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    else:
        node[last] = value


def _list_index(items: list[Any], part: str, path: Sequence[str]) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not an index of that list")
    return int(part)


def named_stream(text: str, path: Path) -> io.StringIO:
    """``text`` as a stream that YAML error messages name as ``path``, not ``<unicode string>``."""
    stream = io.StringIO(text)
    stream.name = str(path)
    return stream


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a configuration file into plain data; an empty file is an empty mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(named_stream(text, path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def settings_from_data(data: Mapping[str, Any], source: str = "configuration") -> Settings:
    """Validate plain data; on failure raise ConfigError naming every field path."""
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        problems = [(_field_path(e["loc"]), _reason(e)) for e in err.errors()]
        lines = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        raise ConfigError(f"{source} is invalid:\n{lines}", problems) from err


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _reason(error: Any) -> str:
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    return message


def load_settings(
    path: Path | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load settings with the precedence CLI > environment > file > defaults."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    env = os.environ if environ is None else environ
    for key_path, value in _env_overrides(env):
        _set_path(data, key_path, value)
    for text in overrides:
        key_path, value = parse_override(text)
        _set_path(data, key_path, value)
    return settings_from_data(data, str(path) if path is not None else "configuration")
