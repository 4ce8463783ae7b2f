"""Durable small-file writes shared by the spool, the outbox and the configuration file.

A file is written to a temporary name beside its target (``.<name>.<random>.tmp``), flushed
and fsync'ed, then renamed or hard-linked into place; the folder is fsync'ed by the caller
(or by :func:`replace_json`) so the new name survives a crash.  Leftover temporaries end in
:data:`TMP_SUFFIX`, so a sweep on start-up can remove them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Final

logger = logging.getLogger(__name__)

TMP_SUFFIX: Final = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make the names in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the contents of file ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(folder: Path, name: str) -> Path:
    """A new empty temporary file in ``folder`` for the target ``name``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    return Path(tmp)


def write_temp(folder: Path, name: str, write: Callable[[IO[bytes]], object]) -> Path:
    """Write with ``write`` to a fsync'ed temporary file in ``folder``; the caller renames or
    links it into place.  The temporary file is removed if ``write`` fails."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(folder, name)
    try:
        with tmp.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace_text(path: Path, text: str, new_mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never a mix.

    The file keeps its permission bits (``new_mode`` for a new file); the folder is fsync'ed.
    """
    mode = path.stat().st_mode & 0o777 if path.exists() else new_mode
    tmp = write_temp(path.parent, path.name, lambda handle: handle.write(text.encode("utf-8")))
    try:
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON (temporary file, fsync, rename).

    The folder is not fsync'ed, so callers that write several files can do it once.
    """
    text = json.dumps(dict(data), sort_keys=True).encode("utf-8")
    tmp = write_temp(path.parent, path.name, lambda handle: handle.write(text))
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_json(path: Path, data: Mapping[str, Any]) -> None:
    """:func:`write_json_atomic`, then fsync the folder."""
    write_json_atomic(path, data)
    fsync_dir(path.parent)


def read_json(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; None (logged as an unreadable ``what``) if it is missing,
    unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("unreadable %s %s: %s", what, path.name, err)
        return None
    return data if isinstance(data, dict) else None
