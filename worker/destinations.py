"""The destination list of a running worker, re-read from the configuration file when it
changes, so that a destination added or removed (``coronet aet add destination``, the admin
API) applies to the next task without a restart.

Before each task the worker compares the file's modification time, size and inode with what it
last read (one ``stat``); when they differ it loads the file again with the same ``--set``
values and environment as at start, and takes its ``destinations``.  A file that no longer
validates is logged and the previous list is kept.  Only the destinations are re-read: every
other setting still needs a restart.  The file is the one source of truth, shared by the node
and the workers (on other hosts: a copy of the file).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import Destination, load_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stamp:
    mtime_ns: int
    size: int
    inode: int


def _stamp(path: Path) -> _Stamp | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return _Stamp(info.st_mtime_ns, info.st_size, info.st_ino)


class DestinationSource:
    """The current destinations (see the module docstring); ``path=None``: a fixed list."""

    def __init__(
        self,
        initial: Sequence[Destination],
        path: Path | None = None,
        overrides: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self.overrides = list(overrides)
        self.environ = environ
        self._destinations = list(initial)
        self._stamp = _stamp(path) if path is not None else None
        self._lock = threading.Lock()

    def __call__(self) -> list[Destination]:
        if self.path is None:
            return list(self._destinations)
        with self._lock:
            stamp = _stamp(self.path)
            if stamp is not None and stamp != self._stamp:
                self._reload(stamp)
            return list(self._destinations)

    def _reload(self, stamp: _Stamp) -> None:
        assert self.path is not None
        try:
            settings = load_settings(self.path, self.overrides, self.environ)
        except ConfigError as err:
            logger.error("%s changed but is invalid; keeping the destinations: %s", self.path, err)
            self._stamp = stamp
            return
        changed = list(settings.destinations) != self._destinations
        self._destinations = list(settings.destinations)
        self._stamp = stamp
        if changed:
            names = ", ".join(d.name for d in self._destinations) or "none"
            logger.info("destinations re-read from %s: %s", self.path, names)


__all__ = ["DestinationSource"]
