"""The durable spool of received instances, shared by the node (writer) and the worker (reader).

On-disk format (version 1)::

    <spool_dir>/
      <study_key>/                 one folder per study
        study.json                 {"format": 1, "study_uid": "<Study Instance UID>", and from the
                                    first instance received (optional, for the admin console):
                                    "accession_number", "study_date", "modality",
                                    "patient_id", "patient_name"}
        <instance_key>.dcm         the instance as received, DICOM File Format (PS3.10)
        <instance_key>.json        {"format": 1, "sop_instance_uid", "sop_class_uid",
                                    "selected", "reason", "bytes", "received"}
        queued/<instance_key>      empty marker: a task covering the instance was published
        done/<instance_key>        empty marker: a worker finished the instance
        .<name>.<random>.tmp       a write in progress (removed by ``remove_temporary``)

Removal: :meth:`Spool.remove_study` deletes a study's folder (``coronet storage prune`` and the
node's retention job, for delivered studies only); :meth:`Spool.unmark_done` makes instances
pending again (a retry from the admin console).

Keys are the first 32 hex digits of the SHA-256 of the UID, so no file name is ever built from
peer data; the UIDs are kept as data in the JSON files.

Commit protocol of :meth:`Spool.store`: the data goes to a temporary file in the study folder
and is fsync'ed; the instance's JSON is written the same way and renamed into place; then the
temporary file is hard-linked to ``<instance_key>.dcm`` (which fails if the name exists, so the
first copy wins even between concurrent associations), unlinked, and the study folder is
fsync'ed.  Only then is the instance reported stored.

Duplicates: an instance whose ``<instance_key>.dcm`` already exists is a duplicate.  The policy
is *keep the first copy*: the new data is discarded, the caller answers Success (the data is
safe) and queues no second task.

Task state: the node writes ``queued/`` markers after a task was published, the worker writes
``done/`` markers.  An instance is *pending* while it is selected and has no ``done`` marker;
on start the node queues every study with pending instances again, so the worker must treat a
task for already-done instances as a no-op.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import pydicom
from pydicom.dataset import FileDataset

from dicom_node.core.durable import (
    TMP_SUFFIX,
    fsync_dir,
    fsync_file,
    read_json,
    temp_path,
    write_json_atomic,
)
from dicom_node.core.errors import ConfigError, IngestError
from dicom_node.core.uids import strip_padding

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_LENGTH = 32
_KEY = re.compile(rf"^[0-9a-f]{{{KEY_LENGTH}}}$")
_STUDY_FILE = "study.json"
_QUEUED = "queued"
_DONE = "done"
_COPY_CHUNK = 1 << 20


def key_for(uid: str) -> str:
    """The spool key of a UID: 32 hex digits of the SHA-256 of its bytes (never the UID itself).

    Trailing NUL and space padding (PS3.5 9.1) is not part of the UID.  Every character is
    hashed as it is (UTF-8, undecodable bytes kept by ``surrogateescape``), so two different
    values never share a key; the node refuses non-conformant UIDs before they get here.
    """
    digest = hashlib.sha256(strip_padding(uid).encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()[:KEY_LENGTH]


def check_key(key: str) -> str:
    """Return ``key`` if it is a well-formed spool key, else raise IngestError."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise IngestError(f"{key!r} is not a spool key")
    return key


@dataclass(frozen=True)
class StoredInstance:
    """The result of :meth:`Spool.store`."""

    study_key: str
    instance_key: str
    path: Path
    duplicate: bool
    bytes: int


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance and its task state."""

    study_key: str
    instance_key: str
    path: Path
    sop_instance_uid: str | None
    sop_class_uid: str | None
    selected: bool
    reason: str
    bytes: int
    queued: bool
    done: bool
    received: float | None = None


#: The header fields kept in ``study.json`` (see the module docstring), by keyword.
STUDY_INFO_FIELDS: Final = {
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
    "modality": "Modality",
    "patient_id": "PatientID",
    "patient_name": "PatientName",
}


class Spool:
    """Durable storage of received instances under one root folder (format in module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def prepare(self, field: str = "storage.spool_dir") -> None:
        """Create the spool folder if needed; ConfigError naming ``field`` if it cannot be one."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{field} {self.root} is not a folder", [(field, "not a folder")])
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = temp_path(self.root, "write-probe")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"{field} {self.root} is not a writable folder: {err.strerror or err}",
                [(field, "not writable")],
            ) from err

    # ------------------------------------------------------------------ writing

    def store(
        self,
        source: Path | IO[bytes],
        sop_instance_uid: str,
        study_uid: str,
        *,
        sop_class_uid: str | None = None,
        selected: bool = True,
        reason: str = "",
        move: bool = False,
        study_info: Mapping[str, str] | None = None,
    ) -> StoredInstance:
        """Persist one instance durably; raise IngestError if it cannot be written.

        ``source`` is a file in the DICOM File Format, as a path or a binary stream.  With
        ``move=True`` a path is renamed into the spool (copied if it is on another file system)
        instead of copied, so the source file is gone afterwards.  ``study_info`` (keys of
        :data:`STUDY_INFO_FIELDS`) is kept with a new study.
        """
        study_key, instance_key = key_for(study_uid), key_for(sop_instance_uid)
        folder = self.root / study_key
        final = folder / f"{instance_key}.dcm"
        try:
            self._ensure_study(folder, study_uid, study_info or {})
            if final.exists():
                return self._duplicate(folder, final, study_key, instance_key, source, move)
            tmp = self._receive(source, folder, instance_key, move)
            try:
                size = tmp.stat().st_size
                write_json_atomic(
                    folder / f"{instance_key}.json",
                    {
                        "format": FORMAT_VERSION,
                        "sop_instance_uid": sop_instance_uid,
                        "sop_class_uid": sop_class_uid,
                        "selected": selected,
                        "reason": reason,
                        "bytes": size,
                        "received": time.time(),
                    },
                )
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return self._duplicate(folder, final, study_key, instance_key, None, False)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(folder)
        except OSError as err:
            raise IngestError(f"cannot write to the spool: {err.strerror or err}") from err
        logger.debug("stored instance %s/%s (%d bytes)", study_key, instance_key, size)
        return StoredInstance(study_key, instance_key, final, False, size)

    def _ensure_study(self, folder: Path, study_uid: str, info: Mapping[str, str]) -> None:
        study_file = folder / _STUDY_FILE
        if study_file.exists():
            return
        folder.mkdir(parents=True, exist_ok=True)
        extra = {k: str(v) for k, v in info.items() if k in STUDY_INFO_FIELDS}
        write_json_atomic(study_file, {"format": FORMAT_VERSION, "study_uid": study_uid, **extra})
        fsync_dir(folder)
        fsync_dir(folder.parent)

    def _receive(self, source: Path | IO[bytes], folder: Path, name: str, move: bool) -> Path:
        """Bring the data into a fsync'ed temporary file inside ``folder``."""
        tmp = temp_path(folder, name)
        try:
            if isinstance(source, Path) and move:
                try:
                    os.replace(source, tmp)
                except OSError as err:
                    if err.errno != errno.EXDEV:
                        raise
                    shutil.copyfile(source, tmp)
                    source.unlink(missing_ok=True)
                fsync_file(tmp)
            else:
                with tmp.open("wb") as out:
                    if isinstance(source, Path):
                        with source.open("rb") as src:
                            shutil.copyfileobj(src, out, _COPY_CHUNK)
                    else:
                        shutil.copyfileobj(source, out, _COPY_CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _duplicate(
        self,
        folder: Path,
        final: Path,
        study_key: str,
        instance_key: str,
        source: Path | IO[bytes] | None,
        move: bool,
    ) -> StoredInstance:
        """Keep the first copy; discard the new data (a moved source file is removed)."""
        if move and isinstance(source, Path):
            source.unlink(missing_ok=True)
        logger.info("duplicate instance %s/%s: kept the first copy", study_key, instance_key)
        return StoredInstance(study_key, instance_key, final, True, final.stat().st_size)

    def mark_queued(self, study_key: str, instance_keys: Iterable[str]) -> None:
        """Record that a task covering these instances was published."""
        self._mark(study_key, _QUEUED, instance_keys, durable=False)

    def mark_done(self, study_key: str, instance_keys: Iterable[str]) -> None:
        """Record (durably) that a worker finished these instances."""
        self._mark(study_key, _DONE, instance_keys, durable=True)

    def _mark(self, study_key: str, kind: str, instance_keys: Iterable[str], durable: bool) -> None:
        folder = self._study_dir(study_key) / kind
        keys = [check_key(k) for k in instance_keys]
        try:
            folder.mkdir(exist_ok=True)
            for key in keys:
                (folder / key).touch()
            if durable:
                fsync_dir(folder)
        except OSError as err:
            raise IngestError(f"cannot record task state in the spool: {err}") from err

    def unmark_done(self, study_key: str, instance_keys: Iterable[str]) -> None:
        """Make finished instances pending again (they will be queued and processed again)."""
        folder = self._study_dir(study_key) / _DONE
        try:
            for key in [check_key(k) for k in instance_keys]:
                (folder / key).unlink(missing_ok=True)
            if folder.exists():
                fsync_dir(folder)
        except OSError as err:
            raise IngestError(f"cannot record task state in the spool: {err}") from err

    def remove_study(self, study_key: str) -> int:
        """Delete a study's folder; return the bytes freed."""
        folder = self._study_dir(study_key)
        freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        try:
            shutil.rmtree(folder)
            fsync_dir(self.root)
        except OSError as err:
            raise IngestError(f"cannot remove study {study_key}: {err}") from err
        return freed

    def remove_temporary(self) -> int:
        """Delete leftovers of interrupted writes; return how many were removed."""
        removed = 0
        for study_key in self.study_keys():
            for tmp in (self.root / study_key).glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    # ------------------------------------------------------------------ reading

    def _study_dir(self, study_key: str) -> Path:
        folder = self.root / check_key(study_key)
        if not folder.is_dir():
            raise IngestError(f"no study {study_key} in the spool")
        return folder

    def study_keys(self) -> list[str]:
        """Every study in the spool, sorted."""
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        except OSError as err:
            raise IngestError(f"cannot list the spool: {err}") from err
        return sorted(e.name for e in entries if _KEY.match(e.name) and e.is_dir())

    def study_uid(self, study_key: str) -> str:
        """The Study Instance UID of a spooled study."""
        data = read_json(self._study_dir(study_key) / _STUDY_FILE, "spool metadata")
        if data is None or not isinstance(data.get("study_uid"), str):
            raise IngestError(f"study {study_key} has no readable {_STUDY_FILE}")
        return str(data["study_uid"])

    def study_created(self, study_key: str) -> float:
        """When the study's first instance was stored (Unix time)."""
        try:
            return (self._study_dir(study_key) / _STUDY_FILE).stat().st_mtime
        except OSError as err:
            raise IngestError(f"study {study_key} has no readable {_STUDY_FILE}") from err

    def study_info(self, study_key: str) -> dict[str, str]:
        """The header fields kept for a study (see the module docstring); may be empty."""
        data = read_json(self._study_dir(study_key) / _STUDY_FILE, "spool metadata") or {}
        return {k: str(data[k]) for k in STUDY_INFO_FIELDS if data.get(k) is not None}

    def _markers(self, folder: Path, kind: str) -> set[str]:
        try:
            return {p.name for p in (folder / kind).iterdir() if _KEY.match(p.name)}
        except FileNotFoundError:
            return set()

    def instances(self, study_key: str, *, selected_only: bool = False) -> list[InstanceRecord]:
        """The committed instances of a study, sorted by key."""
        folder = self._study_dir(study_key)
        queued, done = self._markers(folder, _QUEUED), self._markers(folder, _DONE)
        records = []
        for path in sorted(folder.glob("*.dcm")):
            key = path.stem
            if not _KEY.match(key):
                continue
            meta = read_json(folder / f"{key}.json", "spool metadata")
            if meta is None:
                # Crash between the link and the folder fsync: keep it and let the worker decide.
                meta = {
                    "selected": True,
                    "reason": "metadata missing",
                    "bytes": path.stat().st_size,
                }
            record = InstanceRecord(
                study_key=study_key,
                instance_key=key,
                path=path,
                sop_instance_uid=meta.get("sop_instance_uid"),
                sop_class_uid=meta.get("sop_class_uid"),
                selected=bool(meta.get("selected", True)),
                reason=str(meta.get("reason", "")),
                bytes=int(meta.get("bytes", 0)),
                queued=key in queued,
                done=key in done,
                received=_float_or_none(meta.get("received")),
            )
            if record.selected or not selected_only:
                records.append(record)
        return records

    def pending_instances(self, study_key: str) -> list[str]:
        """Selected instances of the study without a finished task."""
        return [r.instance_key for r in self.instances(study_key, selected_only=True) if not r.done]

    def unqueued_instances(self, study_key: str) -> list[str]:
        """Selected instances of the study with neither a published nor a finished task."""
        return [
            r.instance_key
            for r in self.instances(study_key, selected_only=True)
            if not r.done and not r.queued
        ]

    def lost_instances(self, study_key: str) -> list[str]:
        """Instances a task was published for whose file is gone: queued, not done, and no
        ``.dcm`` (removed by hand, or lost by the storage).  A half-written instance is never
        among them: it is only queued once committed."""
        folder = self._study_dir(study_key)
        queued, done = self._markers(folder, _QUEUED), self._markers(folder, _DONE)
        return sorted(k for k in queued - done if not (folder / f"{k}.dcm").exists())

    def queued_at(self, study_key: str) -> float | None:
        """When a task for the study was last published (the newest ``queued`` marker)."""
        folder = self._study_dir(study_key)
        times = []
        for key in self._markers(folder, _QUEUED):
            try:
                times.append((folder / _QUEUED / key).stat().st_mtime)
            except FileNotFoundError:
                continue
        return max(times, default=None)

    def pending_studies(self) -> list[str]:
        """Studies with at least one selected instance without a finished task."""
        return [key for key in self.study_keys() if self.pending_instances(key)]

    def instance_path(self, study_key: str, instance_key: str) -> Path:
        """The path of a committed instance; raise IngestError if it is not there."""
        path = self._study_dir(study_key) / f"{check_key(instance_key)}.dcm"
        if not path.is_file():
            raise IngestError(f"no instance {study_key}/{instance_key} in the spool")
        return path

    def read_instance(self, study_key: str, instance_key: str, **kwargs: Any) -> FileDataset:
        """Read a spooled instance with pydicom (``kwargs`` go to ``pydicom.dcmread``)."""
        path = self.instance_path(study_key, instance_key)
        return read_dataset(path, f"{study_key}/{instance_key}", **kwargs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.study_keys())


def read_dataset(path: Path, name: str, **kwargs: Any) -> FileDataset:
    """Read an instance file with pydicom (``kwargs`` go to ``pydicom.dcmread``); IngestError
    naming ``name`` (keys, never UIDs) if it cannot be read."""
    try:
        return pydicom.dcmread(path, **kwargs)
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise IngestError(f"cannot read {name}: {err}") from err


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
