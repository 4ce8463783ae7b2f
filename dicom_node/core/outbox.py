"""The durable outbox store: results waiting for delivery, delivery state per destination, dead
letters.  The worker writes it and sends from it (:mod:`worker.rounds`); the admin console reads it
and marks dead letters for a retry.  This module only reads and writes the folder.

On-disk format (version 1)::

    <outbox_dir>/
      results/<key>.dcm                   a result (SR or SC), DICOM File Format (PS3.10)
      results/<key>.json                  {"format", "kind", "sop_class_uid", "sop_instance_uid",
                                           "study_key", "instance_key", "created"}
      sources/<study_key>/<instance_key>.json
                                          the source instance was analysed: {"format", "results":
                                          [key, ...], "outcome", "received", "processed",
                                          "timings"}; written after its results, so it is the
                                          commit point of one analysis
      delivered/<destination>/<key>.json  {"status", "at"}: the destination stored the result
      dead-letter/results/<destination>/<key>.json
                                          {"status", "reason", "at"}: refused for good, or given
                                          up after the last retry; ``coronet outbox retry`` sends
                                          it again
      dead-letter/sources/<study_key>/<instance_key>.json
                                          {"reason", "at"}: the instance could not be analysed
                                          (unreadable or missing after bounded retries, no
                                          result can be built from its header, internal error,
                                          its analysis or its task started too often)
      dead-letter/studies/<study_key>.json
                                          {"reason", "at"}: a task's whole study was not in the
                                          spool after bounded retries

``<key>`` is the spool key (32 hex digits of the SHA-256) of the result's SOP Instance UID, and
the study and instance keys are the spool's, so no file name comes from peer data.  Result UIDs
are deterministic (``worker.results.uids``): analysing the same image with the same model gives
the same key, the first stored copy is kept, and a result already delivered to a destination is
never sent there again.  Every file is written to a temporary name, fsync'ed, renamed (or
hard-linked, for keep-the-first-copy) into place, and its folder fsync'ed.

A result is *pending* for a destination while it has neither a ``delivered`` marker nor a
dead-letter entry there.  An analysed source instance is *settled* once every one of its results
is delivered or dead-lettered for every configured destination; only then may its spool
instance be marked done.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Literal

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_node.core.durable import TMP_SUFFIX, fsync_dir, read_json, replace_json, write_temp
from dicom_node.core.errors import ConfigError, IngestError, TransientDeliveryError
from dicom_node.core.settings import Destination
from dicom_node.core.spool import check_key, key_for

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
RESULTS: Final = "results"
SOURCES: Final = "sources"
DELIVERED: Final = "delivered"
DEAD_LETTER: Final = "dead-letter"
STUDIES: Final = "studies"
#: The instance part of the key of a dead letter for a whole study.
WHOLE_STUDY: Final = "*"
_DESTINATION_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]+$")

#: Results of one source are sent in this order: the SR references the SC, so the SC goes first.
KIND_ORDER: Final = {"sc": 0, "other": 1, "sr": 2}

State = Literal["pending", "delivered", "dead"]
STATES: Final[tuple[State, ...]] = ("pending", "delivered", "dead")


def result_kind(sop_class_uid: str) -> str:
    """``sr``, ``sc`` or ``other``, from the SOP Class UID."""
    if sop_class_uid == Comprehensive3DSRStorage:
        return "sr"
    if sop_class_uid == SecondaryCaptureImageStorage:
        return "sc"
    return "other"


def _now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_first(path: Path, write: Callable[[IO[bytes]], None]) -> bool:
    """Create ``path`` durably unless it exists (the first copy wins); True if written."""
    if path.exists():
        return False
    tmp = write_temp(path.parent, path.name, write)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def check_destination_name(name: str) -> str:
    """Return ``name`` if it can name a folder (config names do; ``.``/``..`` do not)."""
    if not _DESTINATION_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"destination name {name!r} cannot name an outbox folder")
    return name


@dataclass(frozen=True)
class ResultRecord:
    """One result object in the outbox."""

    key: str
    kind: str
    sop_class_uid: str
    study_key: str
    instance_key: str
    path: Path
    created: float


@dataclass(frozen=True)
class SourceRecord:
    """An analysed source instance and the results made from it."""

    study_key: str
    instance_key: str
    results: tuple[str, ...]
    outcome: str
    received: float | None
    processed: float
    timings: Mapping[str, float]


@dataclass(frozen=True)
class DeadLetter:
    """Why a result was not delivered to a destination, or a source not analysed."""

    key: str
    where: str
    status: int | None
    reason: str
    at: str


class Outbox:
    """The outbox under one root folder (format in the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ paths

    def result_path(self, key: str) -> Path:
        return self.root / RESULTS / f"{check_key(key)}.dcm"

    def _result_meta(self, key: str) -> Path:
        return self.root / RESULTS / f"{check_key(key)}.json"

    def _source_path(self, study_key: str, instance_key: str) -> Path:
        return self.root / SOURCES / check_key(study_key) / f"{check_key(instance_key)}.json"

    def _delivered_path(self, key: str, destination: str) -> Path:
        name = check_destination_name(destination)
        return self.root / DELIVERED / name / f"{check_key(key)}.json"

    def _dead_path(self, key: str, destination: str) -> Path:
        name = check_destination_name(destination)
        return self.root / DEAD_LETTER / RESULTS / name / f"{check_key(key)}.json"

    def _dead_source_path(self, study_key: str, instance_key: str) -> Path:
        return (
            self.root
            / DEAD_LETTER
            / SOURCES
            / check_key(study_key)
            / f"{check_key(instance_key)}.json"
        )

    def _dead_study_path(self, study_key: str) -> Path:
        return self.root / DEAD_LETTER / STUDIES / f"{check_key(study_key)}.json"

    # ------------------------------------------------------------------ writing

    def put(
        self,
        study_key: str,
        instance_key: str,
        datasets: Sequence[Dataset],
        *,
        outcome: str,
        received: float | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> SourceRecord:
        """Store the results of one source instance durably, then record the analysis.

        A result whose key is already in the outbox keeps its first copy.
        """
        keys = []
        try:
            for ds in datasets:
                keys.append(self._put_result(study_key, instance_key, ds))
            record = SourceRecord(
                study_key=study_key,
                instance_key=instance_key,
                results=tuple(keys),
                outcome=outcome,
                received=received,
                processed=time.time(),
                timings=dict(timings or {}),
            )
            replace_json(
                self._source_path(study_key, instance_key),
                {
                    "format": FORMAT_VERSION,
                    "results": list(record.results),
                    "outcome": outcome,
                    "received": received,
                    "processed": record.processed,
                    "timings": dict(record.timings),
                },
            )
        except OSError as err:  # e.g. a full disk, which may clear: retried like a delivery
            raise TransientDeliveryError(
                f"cannot write to the outbox: {err.strerror or err}"
            ) from err
        return record

    def _put_result(self, study_key: str, instance_key: str, ds: Dataset) -> str:
        sop_instance_uid = str(ds.SOPInstanceUID)
        sop_class_uid = str(ds.SOPClassUID)
        key = key_for(sop_instance_uid)
        meta = self._result_meta(key)
        if not meta.exists():
            # Metadata first: a .dcm without .json is never listed, so a crash leaves no
            # half-recorded result behind.
            replace_json(
                meta,
                {
                    "format": FORMAT_VERSION,
                    "kind": result_kind(sop_class_uid),
                    "sop_class_uid": sop_class_uid,
                    "sop_instance_uid": sop_instance_uid,
                    "study_key": study_key,
                    "instance_key": instance_key,
                    "created": time.time(),
                },
            )
        _write_first(
            self.result_path(key),
            lambda handle: ds.save_as(handle, enforce_file_format=True),
        )
        return key

    def mark_delivered(self, key: str, destination: str, status: int | None) -> None:
        """Record that ``destination`` stored the result; clears a dead letter."""
        replace_json(self._delivered_path(key, destination), {"status": status, "at": _now_iso()})
        dead = self._dead_path(key, destination)
        if dead.exists():
            dead.unlink()
            fsync_dir(dead.parent)

    def dead_letter(self, key: str, destination: str, status: int | None, reason: str) -> None:
        """Record that the result will not be sent to ``destination`` again by itself."""
        replace_json(
            self._dead_path(key, destination),
            {"status": status, "reason": reason, "at": _now_iso()},
        )

    def dead_letter_source(self, study_key: str, instance_key: str, reason: str) -> None:
        """Record that a source instance could not be analysed."""
        replace_json(
            self._dead_source_path(study_key, instance_key), {"reason": reason, "at": _now_iso()}
        )

    def dead_letter_study(self, study_key: str, reason: str) -> None:
        """Record that a task's whole study could not be found or read in the spool."""
        replace_json(self._dead_study_path(study_key), {"reason": reason, "at": _now_iso()})

    # ------------------------------------------------------------------ reading

    def is_dead_source(self, study_key: str, instance_key: str) -> bool:
        """Whether the source instance was dead-lettered (it will not be analysed again)."""
        return self._dead_source_path(study_key, instance_key).exists()

    def source(self, study_key: str, instance_key: str) -> SourceRecord | None:
        """The analysis of a source instance, or None if it was not analysed yet."""
        data = read_json(self._source_path(study_key, instance_key), "outbox record")
        if data is None:
            return None
        return SourceRecord(
            study_key=study_key,
            instance_key=instance_key,
            results=tuple(str(k) for k in data.get("results", [])),
            outcome=str(data.get("outcome", "")),
            received=data.get("received"),
            processed=float(data.get("processed", 0.0)),
            timings={str(k): float(v) for k, v in dict(data.get("timings", {})).items()},
        )

    def sources(self) -> list[SourceRecord]:
        """Every analysed source instance."""
        records = []
        for path in sorted((self.root / SOURCES).glob("*/*.json")):
            record = self.source(path.parent.name, path.stem)
            if record is not None:
                records.append(record)
        return records

    def result(self, key: str) -> ResultRecord | None:
        data = read_json(self._result_meta(key), "outbox record")
        if data is None or not self.result_path(key).exists():
            return None
        return ResultRecord(
            key=key,
            kind=str(data.get("kind", "other")),
            sop_class_uid=str(data.get("sop_class_uid", "")),
            study_key=str(data.get("study_key", "")),
            instance_key=str(data.get("instance_key", "")),
            path=self.result_path(key),
            created=float(data.get("created", 0.0)),
        )

    def results(self) -> list[ResultRecord]:
        """Every result in the outbox, oldest first."""
        records = []
        for meta in (self.root / RESULTS).glob("*.json"):
            try:
                record = self.result(meta.stem)
            except IngestError:
                continue
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.created, KIND_ORDER.get(r.kind, 1)))

    def state(self, key: str, destination: str) -> State:
        if self._delivered_path(key, destination).exists():
            return "delivered"
        if self._dead_path(key, destination).exists():
            return "dead"
        return "pending"

    def dead_letters(self, destination: str) -> list[DeadLetter]:
        folder = self.root / DEAD_LETTER / RESULTS / check_destination_name(destination)
        letters = []
        for path in sorted(folder.glob("*.json")):
            data = read_json(path, "outbox record") or {}
            letters.append(
                DeadLetter(
                    key=path.stem,
                    where=destination,
                    status=data.get("status"),
                    reason=str(data.get("reason", "")),
                    at=str(data.get("at", "")),
                )
            )
        return letters

    def dead_sources(self) -> list[DeadLetter]:
        """Source instances (key ``study/instance``) and whole studies (``study/*``) that could
        not be analysed, with their reasons."""
        letters = []
        for path in sorted((self.root / DEAD_LETTER / STUDIES).glob("*.json")):
            data = read_json(path, "outbox record") or {}
            letters.append(
                DeadLetter(
                    key=f"{path.stem}/{WHOLE_STUDY}",
                    where="analysis",
                    status=None,
                    reason=str(data.get("reason", "")),
                    at=str(data.get("at", "")),
                )
            )
        for path in sorted((self.root / DEAD_LETTER / SOURCES).glob("*/*.json")):
            data = read_json(path, "outbox record") or {}
            letters.append(
                DeadLetter(
                    key=f"{path.parent.name}/{path.stem}",
                    where="analysis",
                    status=None,
                    reason=str(data.get("reason", "")),
                    at=str(data.get("at", "")),
                )
            )
        return letters

    # ------------------------------------------------------------------ one study

    def sources_of(self, study_key: str) -> list[SourceRecord]:
        """The analysed source instances of one study."""
        folder = self.root / SOURCES / check_key(study_key)
        records = []
        for path in sorted(folder.glob("*.json")):
            record = self.source(study_key, path.stem)
            if record is not None:
                records.append(record)
        return records

    def dead_letter_of(self, key: str, destination: str) -> DeadLetter | None:
        """Why the result was not delivered to ``destination``, or None."""
        path = self._dead_path(key, destination)
        data = read_json(path, "outbox record")
        if data is None:
            return None
        return DeadLetter(
            key=key,
            where=destination,
            status=data.get("status"),
            reason=str(data.get("reason", "")),
            at=str(data.get("at", "")),
        )

    def dead_sources_of(self, study_key: str) -> list[DeadLetter]:
        """The dead letters of one study's analysis (instances, or the whole study)."""
        return [
            letter
            for letter in self.dead_sources()
            if letter.key.split("/")[0] == check_key(study_key)
        ]

    def delivered_at(self, key: str, destination: str) -> float | None:
        """When the destination stored the result (the marker's time), or None."""
        try:
            return self._delivered_path(key, destination).stat().st_mtime
        except OSError:
            return None

    def clear_dead_letters(self, study_key: str, destinations: Iterable[str]) -> list[str]:
        """Make a study's dead letters pending again (a retry); return the instance keys whose
        results or analysis were dead-lettered (the whole-study letter is ``*``)."""
        instances: set[str] = set()
        for record in self.sources_of(study_key):
            for key in record.results:
                for name in destinations:
                    path = self._dead_path(key, name)
                    if path.exists():
                        path.unlink()
                        fsync_dir(path.parent)
                        instances.add(record.instance_key)
        folder = self.root / DEAD_LETTER / SOURCES / check_key(study_key)
        for path in sorted(folder.glob("*.json")):
            path.unlink()
            instances.add(path.stem)
        whole = self._dead_study_path(study_key)
        if whole.exists():
            whole.unlink()
            instances.add(WHOLE_STUDY)
        return sorted(instances)

    def remove_study(self, study_key: str) -> int:
        """Delete a study's results, analysis records and delivery markers; return the bytes
        freed.  Dead letters are left alone (the caller prunes only settled studies)."""
        freed = 0
        records = self.sources_of(study_key)
        for record in records:
            for key in record.results:
                for path in (self.result_path(key), self._result_meta(key)):
                    freed += _unlink(path)
                for marker in (self.root / DELIVERED).glob(f"*/{check_key(key)}.json"):
                    freed += _unlink(marker)
        folder = self.root / SOURCES / check_key(study_key)
        for path in folder.glob("*.json"):
            freed += _unlink(path)
        if folder.is_dir():
            folder.rmdir()
        return freed

    def is_settled(self, record: SourceRecord, destinations: Iterable[Destination]) -> bool:
        """Every result of ``record`` is delivered or dead-lettered for every destination."""
        names = [d.name for d in destinations]
        return all(self.state(key, name) != "pending" for key in record.results for name in names)

    def remove_temporary(self) -> int:
        """Delete leftovers of interrupted writes; return how many were removed."""
        removed = 0
        for tmp in self.root.rglob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed


def _unlink(path: Path) -> int:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


__all__ = [
    "KIND_ORDER",
    "STATES",
    "WHOLE_STUDY",
    "DeadLetter",
    "Outbox",
    "ResultRecord",
    "SourceRecord",
    "State",
    "check_destination_name",
    "result_kind",
]
