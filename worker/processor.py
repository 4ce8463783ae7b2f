"""One study from the spool to the PACS, without Celery: what ``coronet.process_study`` does.

One run of :meth:`StudyProcessor.run`:

1. picks the study's pending instances from the spool (those the node selected as frontal
   chest images and no worker finished), restricted to ``instance_keys`` when given;
2. analyses each one not analysed before (:func:`worker.pipeline.process_dataset`: the image
   checks, inference and the heatmap; a bad image becomes an "unassessable" result);
3. writes the SR and the SC durably to the outbox (:mod:`worker.outbox`);
4. C-STOREs them to every configured destination (:mod:`worker.delivery`), skipping those
   already delivered there;
5. marks the spool instances done once every result is delivered or dead-lettered.

The Celery glue (:mod:`worker.celery_app`) adds what only a queue needs: a bounded number of
redeliveries of one message (a task that kills its worker again and again is dead-lettered,
not retried for ever), Celery retries with exponential backoff and jitter while a destination
is unavailable, and dead letters once the retries are spent.  A task for instances that are
already done is a no-op, so repeated and recovered tasks are harmless; a per-instance lock in
Redis keeps two workers from analysing the same instance at once.

Logs name studies and instances by their spool keys only (hashes, never UIDs or names).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.dataset import Dataset

from dicom_node.core.errors import InferenceError, IngestError
from dicom_node.core.settings import Settings
from dicom_node.core.spool import Spool
from worker.delivery import SendFn
from worker.locks import InstanceLocks
from worker.outbox import Outbox, SourceRecord
from worker.results.outcome import Prediction
from worker.rounds import DeliveryRound, deliver, give_up, settle

logger = logging.getLogger(__name__)


class AnalysisResult(Protocol):
    """What :func:`worker.pipeline.process_dataset` returns (``InstanceResult``)."""

    @property
    def outcome(self) -> object: ...

    @property
    def datasets(self) -> Sequence[Dataset]: ...

    @property
    def timings(self) -> Mapping[str, float]: ...


Analyse = Callable[[Dataset], AnalysisResult]


@dataclass
class StudyReport:
    """What one run did for one study (opaque keys only)."""

    study_key: str
    targets: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    analysed: int = 0
    predictions: int = 0
    unassessable: int = 0
    failed: int = 0
    results: list[str] = field(default_factory=list)
    delivery: DeliveryRound = field(default_factory=DeliveryRound)
    given_up: int = 0
    done: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    received: float | None = None
    last_received: float | None = None
    started: float = field(default_factory=time.time)

    @property
    def waiting(self) -> bool:
        """Results wait for a destination that may come back (a retry is worth it)."""
        return self.delivery.transient and not self.given_up

    def add_timing(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds


class StudyProcessor:
    """Steps 1-5 of the module docstring for one study, with its dependencies explicit."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        outbox: Outbox,
        analyse: Analyse,
        locks: InstanceLocks,
        send: SendFn,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.outbox = outbox
        self.analyse = analyse
        self.locks = locks
        self.send = send

    def targets(self, study_key: str, instance_keys: Sequence[str] | None) -> list[str]:
        """Pending instances of the study, restricted to ``instance_keys`` when given."""
        pending = self.spool.pending_instances(study_key)
        if instance_keys is None:
            return pending
        wanted = set(instance_keys)
        return [key for key in pending if key in wanted]

    def run(
        self,
        study_key: str,
        instance_keys: Sequence[str] | None,
        owner: str,
        *,
        final_attempt: bool = False,
    ) -> StudyReport:
        """Process the study; with ``final_attempt`` dead-letter what still cannot be sent."""
        report = StudyReport(study_key)
        try:
            report.targets = self.targets(study_key, instance_keys)
        except IngestError as err:
            logger.warning("study %s: not in the spool (%s); nothing to do", study_key, err)
            return report
        if not report.targets:
            logger.info("study %s: nothing pending (already done); no-op", study_key)
            return report
        mine = []
        for instance_key in report.targets:
            if self.locks.acquire(study_key, instance_key, owner):
                mine.append(instance_key)
            else:
                report.busy.append(instance_key)
        try:
            self._process(report, mine, final_attempt)
        finally:
            for instance_key in mine:
                self.locks.release(study_key, instance_key, owner)
        log_study(report)
        return report

    def _process(self, report: StudyReport, instance_keys: list[str], final_attempt: bool) -> None:
        records: list[SourceRecord] = []
        for instance_key in instance_keys:
            record = self.outbox.source(report.study_key, instance_key)
            if record is None:
                record = self._analyse(report, instance_key)
            self._note_received(report, instance_key, record)
            if record is not None:
                records.append(record)
                report.results.extend(record.results)
        destinations = self.settings.destinations
        if report.results and not destinations:
            logger.warning("no destinations configured: results stay in the outbox")
        started = time.perf_counter()
        report.delivery = deliver(self.outbox, destinations, report.results, self.send)
        report.add_timing("delivery", time.perf_counter() - started)
        if final_attempt and report.delivery.transient:
            report.given_up = give_up(
                self.outbox, report.delivery, "destination unavailable after the last retry"
            )
        report.done = settle(self.outbox, self.spool, destinations, records)

    def _note_received(
        self, report: StudyReport, instance_key: str, record: SourceRecord | None
    ) -> None:
        received = record.received if record is not None else None
        if received is None:
            try:
                received = self.spool.instance_path(report.study_key, instance_key).stat().st_mtime
            except (IngestError, OSError):
                return
        report.received = min(received, report.received or received)
        report.last_received = max(received, report.last_received or received)

    def _analyse(self, report: StudyReport, instance_key: str) -> SourceRecord | None:
        study_key = report.study_key
        try:
            started = time.perf_counter()
            dataset = self.spool.read_instance(study_key, instance_key)
            report.add_timing("read", time.perf_counter() - started)
            received = self.spool.instance_path(study_key, instance_key).stat().st_mtime
            result = self.analyse(dataset)
        except (IngestError, InferenceError, OSError) as err:
            reason = f"cannot analyse: {type(err).__name__}: {err}"
            logger.error("study %s instance %s: %s", study_key, instance_key, reason)
            self.outbox.dead_letter_source(study_key, instance_key, reason)
            self.spool.mark_done(study_key, [instance_key])
            report.failed += 1
            return None
        for name, seconds in result.timings.items():
            report.add_timing(name, seconds)
        outcome = "prediction" if isinstance(result.outcome, Prediction) else "unassessable"
        report.analysed += 1
        if outcome == "prediction":
            report.predictions += 1
        else:
            report.unassessable += 1
        started = time.perf_counter()
        record = self.outbox.put(
            study_key,
            instance_key,
            list(result.datasets),
            outcome=outcome,
            received=received,
            timings=dict(result.timings),
        )
        report.add_timing("outbox", time.perf_counter() - started)
        return record

    def dead_letter_study(
        self, study_key: str, instance_keys: Sequence[str] | None, reason: str
    ) -> list[str]:
        """Give up on the study's pending instances (e.g. a poison message); return them."""
        try:
            targets = self.targets(study_key, instance_keys)
        except IngestError:
            return []
        for instance_key in targets:
            self.outbox.dead_letter_source(study_key, instance_key, reason)
        if targets:
            self.spool.mark_done(study_key, targets)
        logger.error("study %s: %d instances dead-lettered: %s", study_key, len(targets), reason)
        return targets


def log_study(report: StudyReport) -> None:
    """The one INFO line per study, receive to delivered, with timings and no PHI."""
    now = time.time()
    delivery = report.delivery
    if report.waiting:
        state = f"waiting for {', '.join(sorted(delivery.waiting))} (will retry)"
    elif report.results:
        state = "delivered"
    else:
        state = "finished"
    total = f"{now - report.received:.2f} s" if report.received is not None else "n/a"
    queued = (
        f"{report.started - report.last_received:.2f} s"
        if report.last_received is not None
        else "n/a"
    )
    steps = ", ".join(
        f"{name.removesuffix('_s')} {seconds:.2f} s"
        for name, seconds in sorted(report.timings.items())
    )
    logger.info(
        "study %s %s: %d instances (%d analysed: %d predictions, %d unassessable; %d failed; "
        "%d busy in another task), %d results: %d sends delivered, %d refused, %d dead-lettered "
        "after retries; receive to %s %s (queued %s, this task %.2f s: %s)",
        report.study_key,
        state,
        len(report.targets),
        report.analysed,
        report.predictions,
        report.unassessable,
        report.failed,
        len(report.busy),
        len(report.results),
        len(delivery.delivered),
        len(delivery.refused),
        report.given_up,
        state,
        total,
        queued,
        now - report.started,
        steps or "nothing to do",
    )
