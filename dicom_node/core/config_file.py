"""Admin edits of the allowed callers and the destinations in the YAML configuration file.

The file is edited as a round-trip YAML document (ruamel.yaml), so comments and key order are
kept.  The new text is validated with the same model as ``coronet config check`` before it
atomically replaces the old file (:func:`dicom_node.core.durable.replace_text`).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.tokens import CommentToken

from dicom_node.core.durable import replace_text
from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import (
    Settings,
    named_stream,
    settings_from_data,
    validate_ae_title,
)

logger = logging.getLogger(__name__)


def _yaml() -> YAML:
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(type(None), _represent_null)
    return rt


def _represent_null(representer: Any, _data: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _last_key_owner(node: Any) -> tuple[CommentedMap, Any] | None:
    """The innermost mapping and key whose comment slot holds text that follows ``node``."""
    if isinstance(node, CommentedMap) and node:
        key = list(node.keys())[-1]
        inner = _last_key_owner(node[key])
        return inner if inner is not None else (node, key)
    if isinstance(node, CommentedSeq) and node:
        return _last_key_owner(node[-1])
    return None


def _detach_trailing(node: Any) -> str:
    """Remove and return the comments and blank lines after ``node``'s own last line.

    ruamel.yaml attaches the text between a list's last item and the next section to that item;
    moving it keeps the layout when items are appended or removed.
    """
    owner = _last_key_owner(node)
    if owner is None:
        return ""
    mapping, key = owner
    slot = mapping.ca.items.get(key)
    if not slot or len(slot) < 3 or slot[2] is None:
        return ""
    value: str = slot[2].value
    cut = value.find("\n") + 1
    if cut <= 0:
        return ""
    own, trailing = value[:cut], value[cut:]
    slot[2].value = own
    return trailing


def _attach_trailing(node: Any, text: str) -> None:
    if not text:
        return
    owner = _last_key_owner(node)
    if owner is None:
        return
    mapping, key = owner
    slot = mapping.ca.items.setdefault(key, [None, None, None, None])
    if slot[2] is None:
        slot[2] = CommentToken("\n" + text, CommentMark(0), None)
    else:
        slot[2].value += text


class ConfigDocument:
    """A configuration file opened for editing, with its comments and layout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._original = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read {path}: {err.strerror or err}") from err
        try:
            data = _yaml().load(named_stream(self._original, path))
        except YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        self.data: CommentedMap = data if data is not None else CommentedMap()
        if not isinstance(self.data, CommentedMap):
            raise ConfigError(f"{path} must hold a mapping at the top level")

    def _list(self, key: str) -> CommentedSeq:
        items = self.data.get(key)
        if items is None or (isinstance(items, list) and not items):
            items = CommentedSeq()
            self.data[key] = items
        if not isinstance(items, CommentedSeq):
            raise ConfigError(f"{self.path}: {key} must be a list")
        return items

    def add_caller(self, ae_title: str, host: str | None = None) -> None:
        title = _checked_title(ae_title, "callers.ae_title")
        callers = self._list("callers")
        if any(_title_of(c) == title for c in callers):
            raise ConfigError(f"caller {title!r} is already allowed", [("callers", "duplicate")])
        entry = CommentedMap(ae_title=title)
        if host:
            entry["host"] = host
        _append(callers, entry)

    def remove_caller(self, ae_title: str) -> None:
        title = _checked_title(ae_title, "callers.ae_title")
        self._remove("callers", lambda c: _title_of(c) == title, f"caller {title!r}")

    def add_destination(
        self, name: str, ae_title: str, host: str, port: int, tls: dict[str, Any] | None = None
    ) -> None:
        destinations = self._list("destinations")
        if any(isinstance(d, dict) and d.get("name") == name for d in destinations):
            raise ConfigError(
                f"destination {name!r} already exists", [("destinations", "duplicate")]
            )
        entry = CommentedMap(name=name, ae_title=_checked_title(ae_title, "destinations.ae_title"))
        entry["host"] = host
        entry["port"] = port
        if tls:
            entry["tls"] = CommentedMap(tls)
        _append(destinations, entry)

    def remove_destination(self, name: str) -> None:
        self._remove(
            "destinations",
            lambda d: isinstance(d, dict) and d.get("name") == name,
            f"destination {name!r}",
        )

    def _remove(self, key: str, match: Any, what: str) -> None:
        items = self.data.get(key) or []
        for index, item in enumerate(items):
            if match(item):
                trailing = _detach_trailing(item) if index == len(items) - 1 else ""
                del items[index]
                if items:
                    _attach_trailing(items[-1], trailing)
                return
        raise ConfigError(f"{what} is not in {self.path}", [(key, "not found")])

    def render(self) -> str:
        stream = io.StringIO()
        _yaml().dump(self.data, stream)
        return stream.getvalue()

    def validate(self) -> Settings:
        text = self.render()
        return settings_from_data(yaml.safe_load(text) or {}, str(self.path))

    def save(self) -> Settings:
        """Validate the edited document, then atomically replace the file."""
        settings = self.validate()
        replace_text(self.path, self.render())
        logger.info("rewrote %s", self.path)
        return settings


def _append(items: CommentedSeq, entry: CommentedMap) -> None:
    trailing = _detach_trailing(items[-1]) if items else ""
    items.append(entry)
    _attach_trailing(entry, trailing)


def _title_of(entry: Any) -> str | None:
    if isinstance(entry, dict) and isinstance(entry.get("ae_title"), str):
        return str(entry["ae_title"]).strip()
    return None


def _checked_title(value: str, field: str) -> str:
    try:
        return validate_ae_title(value)
    except ValueError as err:
        raise ConfigError(f"{field}: {err}", [(field, str(err))]) from err
