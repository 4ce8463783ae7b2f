"""Admin edits of the callers and destinations, from the CLI or the API, the same way: the
comment-keeping, validated, atomic rewrite of :class:`~dicom_node.core.config_file.ConfigDocument`,
then one audit message (PS3.15 A.5.3.10 Security Alert) naming who changed what.

Edits are serialised by a lock within one process; the file itself is replaced atomically.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.core import audit
from dicom_node.core.audit_trail import AuditTrail
from dicom_node.core.config_file import ConfigDocument
from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import Settings


@dataclass(frozen=True)
class Actor:
    """Who asks for a change: an admin user (API) or an operating-system user (CLI)."""

    user: str
    address: str | None = None


class ConfigEditor:
    """Edits of one configuration file, each audited (see the module docstring)."""

    def __init__(self, path: Path, trail: AuditTrail) -> None:
        self.path = path
        self.trail = trail
        self._lock = threading.Lock()

    def _resource(self, section: str, name: str) -> str:
        return f"file://{self.path.resolve()}#{section}/{name}"

    def _audit(
        self, kind: audit.Code, actor: Actor, section: str, name: str, change: str, ok: bool
    ) -> None:
        self.trail.record(
            audit.configuration_change(
                kind,
                actor.user,
                actor.address,
                self._resource(section, name),
                change,
                outcome=audit.SUCCESS if ok else audit.MINOR_FAILURE,
            )
        )

    def add_caller(self, actor: Actor, ae_title: str, host: str | None) -> Settings:
        change = f"allow caller {ae_title.strip()}" + (f" from {host}" if host else "")
        return self._edit(
            actor,
            audit.SECURITY_CONFIGURATION,
            "callers",
            ae_title.strip(),
            change,
            lambda doc: doc.add_caller(ae_title, host),
        )

    def remove_caller(self, actor: Actor, ae_title: str) -> Settings:
        return self._edit(
            actor,
            audit.SECURITY_CONFIGURATION,
            "callers",
            ae_title.strip(),
            f"remove caller {ae_title.strip()}",
            lambda doc: doc.remove_caller(ae_title),
        )

    def add_destination(
        self,
        actor: Actor,
        name: str,
        ae_title: str,
        host: str,
        port: int,
        tls: dict[str, Any] | None,
    ) -> Settings:
        change = f"add destination {name}: {ae_title.strip()} at {host}:{port}" + (
            " (TLS)" if tls else ""
        )
        return self._edit(
            actor,
            audit.NETWORK_CONFIGURATION,
            "destinations",
            name,
            change,
            lambda doc: doc.add_destination(name, ae_title, host, port, tls),
        )

    def remove_destination(self, actor: Actor, name: str) -> Settings:
        return self._edit(
            actor,
            audit.NETWORK_CONFIGURATION,
            "destinations",
            name,
            f"remove destination {name}",
            lambda doc: doc.remove_destination(name),
        )

    def _edit(
        self,
        actor: Actor,
        kind: audit.Code,
        section: str,
        name: str,
        change: str,
        apply: Any,
    ) -> Settings:
        with self._lock:
            try:
                doc = ConfigDocument(self.path)
                apply(doc)
                settings = doc.save()
            except ConfigError:
                self._audit(kind, actor, section, name, change, ok=False)
                raise
            except OSError as err:  # e.g. a read-only configuration file
                self._audit(kind, actor, section, name, change, ok=False)
                raise ConfigError(
                    f"cannot write {self.path}: {err.strerror or err}",
                    [("configuration file", "not writable")],
                ) from err
        self._audit(kind, actor, section, name, change, ok=True)
        return settings


__all__ = ["Actor", "ConfigEditor"]
