"""Where pynetdicom streams received data sets: the spool's own ``tmp`` folder, never TMPDIR.

pynetdicom 3.0 writes each received data set (``STORE_RECV_CHUNKED_DATASET``) to a
``NamedTemporaryFile`` in TMPDIR, leaves it there when the association is aborted mid-message,
and a write that fails (a full disk) raises inside its DUL thread, which dies without answering.
It has no option for any of this, so :func:`install` replaces the one name
``pynetdicom.dimse_messages.NamedTemporaryFile`` with a factory that, for an association
accepted by a node, opens a :class:`SpoolTempFile` in that node's :class:`TempFiles` folder:

* the folder is in the spool (``<spool_dir>/tmp``), so the commit into the spool is a rename on
  one file system, and patient data never lands in a shared TMPDIR;
* a failed write never raises into pynetdicom: the file records why, frees its space, and the
  C-STORE is answered 0xA700 (Out of Resources);
* the files of an association are removed when its connection closes (an aborted store leaves
  nothing), and the folder is emptied when the node starts (after a kill -9).

Associations pynetdicom makes for anything else keep its own ``NamedTemporaryFile``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Final

import pynetdicom.dimse_messages

logger = logging.getLogger(__name__)

SUFFIX: Final = ".dcm"

_ORIGINAL = pynetdicom.dimse_messages.NamedTemporaryFile
_STORES: weakref.WeakKeyDictionary[Any, TempFiles] = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


class SpoolTempFile:
    """The writable file pynetdicom streams one data set into (the subset of
    ``NamedTemporaryFile`` it uses: ``name``, ``write``, ``file.flush``, ``close``)."""

    def __init__(self, folder: Path) -> None:
        self.failure: str | None = None
        self._fd: int | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)  # the spool may have been recreated
            fd, name = tempfile.mkstemp(suffix=SUFFIX, dir=folder)
        except OSError as err:
            self.name = str(folder / f"unwritable{SUFFIX}")
            self._fail(err)
        else:
            self.name, self._fd = name, fd

    @property
    def file(self) -> SpoolTempFile:
        return self

    def write(self, data: bytes) -> int:
        if self._fd is not None:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as err:
                self._fail(err)
        return len(data)

    def flush(self) -> None:
        """Data goes straight to the file descriptor; the spool fsyncs on commit."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _fail(self, err: OSError) -> None:
        self.failure = f"cannot write the received data set: {err.strerror or err}"
        self.close()
        with contextlib.suppress(OSError):
            Path(self.name).unlink(missing_ok=True)  # give the space back at once


class TempFiles:
    """The temporary files of one node's associations, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._by_association: dict[int, list[SpoolTempFile]] = {}

    def sweep(self) -> int:
        """Create the folder, remove what an earlier run left in it; return how many."""
        self.folder.mkdir(parents=True, exist_ok=True)
        removed = 0
        for path in self.folder.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def adopt(self, assoc: Any) -> None:
        """Data sets received on ``assoc`` are written here from now on."""
        with _STORES_LOCK:
            _STORES[assoc] = self

    def open(self, assoc: Any) -> SpoolTempFile:
        handle = SpoolTempFile(self.folder)
        with self._lock:
            self._by_association.setdefault(id(assoc), []).append(handle)
        return handle

    def failure(self, path: Path) -> str | None:
        """Why the data set streamed to ``path`` could not be written, if it could not."""
        with self._lock:
            for handles in self._by_association.values():
                for handle in handles:
                    if handle.name == str(path):
                        return handle.failure
        return None

    def release(self, assoc: Any) -> int:
        """The association's connection closed: remove its files; return how many were left."""
        with self._lock:
            handles = self._by_association.pop(id(assoc), [])
        left = 0
        for handle in handles:
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                Path(handle.name).unlink()
                left += 1
        if left:
            logger.info("removed %d partial data sets of a closed association", left)
        return left


def _named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` inside pynetdicom (see the module docstring)."""
    # pynetdicom calls it on the association's DUL thread, a DULServiceProvider.
    assoc = getattr(threading.current_thread(), "assoc", None)
    with _STORES_LOCK:
        store = _STORES.get(assoc) if assoc is not None else None
    if store is None:
        return _ORIGINAL(*args, **kwargs)
    return store.open(assoc)


def install() -> None:
    """Route pynetdicom's received data sets through :class:`TempFiles` (idempotent)."""
    pynetdicom.dimse_messages.NamedTemporaryFile = _named_temporary_file
