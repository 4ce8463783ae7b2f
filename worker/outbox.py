"""The durable outbox: results waiting for delivery, delivery state per destination, dead letters.

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
                                          (unreadable, internal error, redelivered too often)

``<key>`` is the spool key (32 hex digits of the SHA-256) of the result's SOP Instance UID, and
the study and instance keys are the spool's, so no file name comes from peer data.  Result UIDs
are deterministic (``worker.uids``): analysing the same image with the same model gives the same
key, the first stored copy is kept, and a result already delivered to a destination is never
sent there again.  Every file is written to a temporary name, fsync'ed, renamed (or hard-linked,
for keep-the-first-copy) into place, and its folder fsync'ed.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Literal

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_node.config import Destination, Settings
from dicom_node.durable import TMP_SUFFIX, fsync_dir, read_json, replace_json, write_temp
from dicom_node.errors import DeliveryError, IngestError, PermanentDeliveryError
from dicom_node.spool import Spool, check_key, key_for
from worker.delivery import Disposition, SendOutcome, describe_status, send_files

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
RESULTS: Final = "results"
SOURCES: Final = "sources"
DELIVERED: Final = "delivered"
DEAD_LETTER: Final = "dead-letter"
_DESTINATION_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]+$")

#: Results of one source are sent in this order: the SR references the SC, so the SC goes first.
_KIND_ORDER: Final = {"sc": 0, "other": 1, "sr": 2}

State = Literal["pending", "delivered", "dead"]
_STATES: Final[tuple[State, ...]] = ("pending", "delivered", "dead")
SendFn = Callable[[Destination, Sequence[Path]], list[SendOutcome]]
"""Sends files to one destination (``worker.delivery.send_files`` with its options bound)."""


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
        raise DeliveryError(f"destination name {name!r} cannot name an outbox folder")
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
        except OSError as err:
            raise DeliveryError(f"cannot write to the outbox: {err.strerror or err}") from err
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

    # ------------------------------------------------------------------ reading

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
        return sorted(records, key=lambda r: (r.created, _KIND_ORDER.get(r.kind, 1)))

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
        letters = []
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


# --------------------------------------------------------------------------- delivery rounds


@dataclass
class DeliveryRound:
    """What one round of sending achieved."""

    delivered: list[tuple[str, str]] = field(default_factory=list)
    """(result key, destination) pairs stored by the destination."""
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    """(result key, destination, reason) pairs refused for good (now dead-lettered)."""
    waiting: dict[str, str] = field(default_factory=dict)
    """destination -> reason, for destinations with results still waiting (transient)."""
    waiting_keys: dict[str, list[str]] = field(default_factory=dict)
    """destination -> the result keys that are still waiting there."""

    @property
    def transient(self) -> bool:
        return bool(self.waiting)


def order_for_sending(outbox: Outbox, keys: Iterable[str]) -> list[str]:
    """Unique keys, each source's SC before its SR (the SR references the SC)."""
    unique = list(dict.fromkeys(keys))
    kinds = {}
    for key in unique:
        record = outbox.result(key)
        kinds[key] = _KIND_ORDER.get(record.kind, 1) if record is not None else 1
    return sorted(unique, key=lambda k: kinds[k])


def deliver(
    outbox: Outbox,
    destinations: Sequence[Destination],
    keys: Iterable[str],
    send: SendFn,
    *,
    states: Iterable[State] = ("pending",),
) -> DeliveryRound:
    """Send every result of ``keys`` in one of ``states`` to every destination; record it.

    ``states=("pending", "dead")`` sends dead-lettered results again too.  Results already
    delivered to a destination are never sent there again.
    """
    round_ = DeliveryRound()
    ordered = order_for_sending(outbox, keys)
    wanted = set(states) - {"delivered"}
    for destination in destinations:
        todo = [k for k in ordered if outbox.state(k, destination.name) in wanted]
        todo = [k for k in todo if outbox.result(k) is not None]
        if not todo:
            continue
        _deliver_to(outbox, destination, todo, send, round_)
    return round_


def _deliver_to(
    outbox: Outbox,
    destination: Destination,
    todo: list[str],
    send: SendFn,
    round_: DeliveryRound,
) -> None:
    name = destination.name
    try:
        outcomes = send(destination, [outbox.result_path(k) for k in todo])
    except PermanentDeliveryError as err:
        for key in todo:
            outbox.dead_letter(key, name, None, str(err))
            round_.refused.append((key, name, str(err)))
        logger.error("destination %s refused %d results for good: %s", name, len(todo), err)
        return
    except DeliveryError as err:
        round_.waiting[name] = str(err)
        round_.waiting_keys[name] = list(todo)
        logger.warning("destination %s unavailable, %d results wait: %s", name, len(todo), err)
        return
    by_path = {outcome.path: outcome for outcome in outcomes}
    for key in todo:
        outcome = by_path.get(outbox.result_path(key))
        if outcome is None:
            round_.waiting.setdefault(name, "no answer for some results")
            round_.waiting_keys.setdefault(name, []).append(key)
        elif outcome.disposition is Disposition.DELIVERED:
            outbox.mark_delivered(key, name, outcome.status)
            round_.delivered.append((key, name))
        elif outcome.disposition is Disposition.PERMANENT:
            reason = f"refused: {outcome.detail}"
            outbox.dead_letter(key, name, outcome.status, reason)
            round_.refused.append((key, name, reason))
        else:
            round_.waiting.setdefault(name, describe_status(outcome.status))
            round_.waiting_keys.setdefault(name, []).append(key)


def give_up(outbox: Outbox, round_: DeliveryRound, why: str) -> int:
    """Dead-letter the results still waiting after the last retry; return how many."""
    count = 0
    for name, keys in round_.waiting_keys.items():
        reason = f"{why}; last error: {round_.waiting.get(name, 'unknown')}"
        for key in keys:
            outbox.dead_letter(key, name, None, reason)
            count += 1
    return count


def settle(
    outbox: Outbox,
    spool: Spool,
    destinations: Sequence[Destination],
    records: Iterable[SourceRecord],
) -> list[str]:
    """Mark done in the spool every source instance of ``records`` that is settled.

    Returns the instance keys marked done.  A spool that lacks the study (e.g. the worker runs
    against another spool than the node) is logged and skipped.
    """
    done: list[str] = []
    by_study: dict[str, list[str]] = {}
    for record in records:
        if outbox.is_settled(record, destinations):
            by_study.setdefault(record.study_key, []).append(record.instance_key)
    for study_key, instance_keys in by_study.items():
        try:
            spool.mark_done(study_key, instance_keys)
        except IngestError as err:
            logger.warning("study %s: cannot mark instances done: %s", study_key, err)
            continue
        done.extend(instance_keys)
    return done


# --------------------------------------------------------------------------- the CLI's work


def retry_outbox(
    outbox: Outbox,
    spool: Spool,
    settings: Settings,
    destinations: Sequence[Destination],
    *,
    dead_only: bool = False,
) -> tuple[DeliveryRound, list[str]]:
    """Send dead-lettered (and, unless ``dead_only``, pending) results again, synchronously.

    Returns the round and the spool instance keys that became settled and were marked done.
    """
    states: tuple[State, ...] = ("dead",) if dead_only else ("pending", "dead")

    def send(destination: Destination, paths: Sequence[Path]) -> list[SendOutcome]:
        return send_files(
            destination,
            paths,
            calling_ae=settings.node.ae_title,
            timeouts=settings.node.timeouts,
        )

    records = outbox.results()
    round_ = deliver(outbox, destinations, [r.key for r in records], send, states=states)
    touched = {key for key, _ in round_.delivered} | {key for key, _, _ in round_.refused}
    sources = {(r.study_key, r.instance_key) for r in records if r.key in touched}
    analysed = [outbox.source(study, instance) for study, instance in sorted(sources)]
    done = settle(outbox, spool, settings.destinations, [s for s in analysed if s is not None])
    return round_, done


def format_listing(
    outbox: Outbox, destinations: Sequence[Destination], *, state: State | None = None
) -> str:
    """The text of ``coronet outbox list``."""
    names = [d.name for d in destinations]
    records = outbox.results()
    states = {r.key: {name: outbox.state(r.key, name) for name in names} for r in records}
    if state is not None:
        records = [r for r in records if state in states[r.key].values()]
    lines = [f"outbox {outbox.root}: {len(records)} results"]
    for name in names:
        counts = {s: sum(1 for r in records if states[r.key][name] == s) for s in _STATES}
        lines.append(
            f"  {name}: {counts['delivered']} delivered, {counts['pending']} pending, "
            f"{counts['dead']} dead-lettered"
        )
    if records:
        header = f"{'RESULT':<32}  {'KIND':<5} {'STUDY':<32}  " + "  ".join(names)
        lines += ["", header]
        for r in records:
            cells = "  ".join(f"{states[r.key][name]:<{len(name)}}" for name in names)
            lines.append(f"{r.key:<32}  {r.kind:<5} {r.study_key:<32}  {cells}")
    for name in names:
        letters = outbox.dead_letters(name)
        if letters:
            lines += ["", f"dead-lettered for {name}:"]
            lines += [
                f"  {d.key}  {describe_status(d.status) if d.status is not None else '-'}"
                f"  {d.at}  {d.reason}"
                for d in letters
            ]
    failed = outbox.dead_sources()
    if failed:
        lines += ["", "instances that could not be analysed (study/instance):"]
        lines += [f"  {d.key}  {d.at}  {d.reason}" for d in failed]
    if not names:
        lines.append("(no destinations configured)")
    return "\n".join(lines)


def format_round(round_: DeliveryRound, destinations: Sequence[Destination]) -> str:
    """The report of ``coronet outbox retry``."""
    lines = []
    for destination in destinations:
        name = destination.name
        delivered = sum(1 for _, d in round_.delivered if d == name)
        refused = [r for r in round_.refused if r[1] == name]
        waiting = round_.waiting_keys.get(name, [])
        line = f"{name}: {delivered} delivered, {len(refused)} refused, {len(waiting)} waiting"
        if name in round_.waiting:
            line += f" ({round_.waiting[name]})"
        lines.append(line)
        lines += [f"  refused {key}: {reason}" for key, _, reason in refused]
    if not lines:
        lines.append("no destinations configured")
    if not round_.delivered and not round_.refused and not round_.waiting:
        lines.append("nothing to send")
    return "\n".join(lines)


__all__ = [
    "DeadLetter",
    "DeliveryRound",
    "Outbox",
    "ResultRecord",
    "SendFn",
    "SourceRecord",
    "deliver",
    "format_listing",
    "format_round",
    "give_up",
    "order_for_sending",
    "result_kind",
    "retry_outbox",
    "settle",
]
