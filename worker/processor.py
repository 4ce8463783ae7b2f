"""One study from the spool to the PACS, without Celery: what ``coronet.process_study`` does.

One run of :meth:`StudyProcessor.run`:

1. picks the study's pending instances from its source (:mod:`worker.sources`: the node's
   spool folder, or the node over the network): those the node selected as frontal chest
   images and no worker finished, restricted to ``instance_keys`` when given; a named
   instance, or a whole study, that the node does not hold is an error, never a silent no-op;
2. analyses those not analysed before, ``IsolationPolicy.batch_size`` at a time together
   (:func:`worker.pipeline.process_many`: the image checks, the guarded decode, inference and
   the heatmap; a bad image becomes an "unassessable" result);
3. writes the SR and the SC durably to the outbox (:mod:`dicom_node.core.outbox`);
4. C-STOREs them to every configured destination (:mod:`worker.delivery`), skipping those
   already delivered there;
5. tells the node that the instances are done once every result is delivered or
   dead-lettered (a done marker in the shared spool, or a report to the node).

One bad instance never blocks its study.  Every failure of one instance is classified, and the
study's other instances are analysed and delivered:

* the pipeline turns bad images into "unassessable" results (an SR "Not Evaluated" with the
  reason);
* an instance whose file is missing or unreadable (also when the decoder process cannot read
  it, or the outbox cannot be written) stays pending and the task is retried, up to
  ``max_read_attempts`` times per instance (counted in Redis, so across tasks); then it is
  dead-lettered;
* an instance (or study) the node answers is gone is dead-lettered at once; while the node
  cannot be reached the task is retried and nothing is dead-lettered (the node still holds the
  study as pending); a ticket the node refuses ends the task (the node queues it again);
* any other error while analysing it or storing its results (e.g. a header from which no SR
  can be built, a failing model) dead-letters that instance with the reason;
* an instance whose analysis started ``max_analysis_starts`` times without finishing (each
  start killed its worker process) is dead-lettered at the next start instead of analysed;
  from its second start on it is analysed alone, never in a batch, so an image that kills
  its worker costs its batch-mates one start at most;
* the exceptions of ``IsolationPolicy.fatal`` (the task's time limit) are not caught here.

A dead-lettered instance is marked done, so recovery never queues it again; ``coronet outbox
list`` shows it with its reason.

Logs name studies and instances by their spool keys only (hashes, never UIDs or names).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from pydicom.dataset import Dataset

from dicom_node.core.errors import IngestError, TransientDeliveryError, describe_error
from dicom_node.core.outbox import WHOLE_STUDY, Outbox, SourceRecord
from dicom_node.core.settings import Destination, Settings
from dicom_node.core.spool import read_dataset
from worker.delivery import SendFn
from worker.locks import InstanceCounters, InstanceLocks
from worker.observer import WorkerObserver
from worker.results.outcome import Prediction
from worker.rounds import DeliveryRound, deliver, give_up, settle
from worker.sources import (
    InstanceSource,
    SourceGone,
    SourceInstance,
    SourceRefused,
    SourceUnavailable,
)

logger = logging.getLogger(__name__)

#: The header is read with values longer than this left in the file: the pixel data is read
#: only by the decoder process, after its checks.
HEADER_DEFER_SIZE: Final = 64 * 1024


class AnalysisResult(Protocol):
    """What :func:`worker.pipeline.process_dataset` returns (``InstanceResult``)."""

    @property
    def outcome(self) -> object: ...

    @property
    def datasets(self) -> Sequence[Dataset]: ...

    @property
    def timings(self) -> Mapping[str, float]: ...


Analyse = Callable[[Dataset, Path], AnalysisResult]
"""Analyses one spooled instance: its header (pixel data deferred) and the path of its file."""


class AnalyseMany(Protocol):
    """Analyses spooled instances together (:func:`worker.pipeline.process_many`, or the
    worker's :class:`worker.batching.Batcher`): one result, or the exception that analysing
    that instance raised, per instance, in order.  With ``alone`` the instances are never
    batched with other tasks' images."""

    def __call__(
        self, sources: Sequence[tuple[Dataset, Path]], *, alone: bool = False
    ) -> Sequence[AnalysisResult | Exception]: ...


def one_by_one(analyse: Analyse) -> AnalyseMany:
    """An :data:`AnalyseMany` that calls ``analyse`` for each instance in turn."""

    def analyse_many(
        sources: Sequence[tuple[Dataset, Path]], *, alone: bool = False
    ) -> list[AnalysisResult | Exception]:
        results: list[AnalysisResult | Exception] = []
        for dataset, path in sources:
            try:
                results.append(analyse(dataset, path))
            except Exception as err:  # classified by the processor, per instance
                results.append(err)
        return results

    return analyse_many


@dataclass(frozen=True)
class IsolationPolicy:
    """How a study copes with its bad instances (see the module docstring)."""

    max_read_attempts: int = 3
    max_analysis_starts: int = 3
    fatal: tuple[type[BaseException], ...] = ()
    batch_size: int = 1
    """Instances of the study analysed together (the worker's ``--batch``)."""


class StudyNotInSpool(Exception):
    """A task names a study the spool does not hold."""


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
    unreadable: dict[str, str] = field(default_factory=dict)
    results: list[str] = field(default_factory=list)
    delivery: DeliveryRound = field(default_factory=DeliveryRound)
    given_up: int = 0
    done: list[str] = field(default_factory=list)
    unreachable: str | None = None
    """Why the node could not be reached (listing, fetch or report): retried, never dead."""
    refused: str | None = None
    """Why the node refused the task's ticket: the task ends, the node queues it again."""
    timings: dict[str, float] = field(default_factory=dict)
    received: float | None = None
    last_received: float | None = None
    started: float = field(default_factory=time.time)

    @property
    def waiting(self) -> bool:
        """Results wait for a destination that may come back, or instances for their file to
        become readable (a retry is worth it)."""
        if self.refused is not None:
            return False
        return (
            (self.delivery.transient and not self.given_up)
            or bool(self.unreadable)
            or self.unreachable is not None
        )

    def retry_reasons(self) -> str:
        """Why a retry is worth it, one clause per destination or unreadable instance."""
        reasons = [f"{k}: {v}" for k, v in sorted(self.delivery.waiting.items())]
        if self.unreachable is not None:
            reasons.append(f"the node: {self.unreachable}")
        reasons += [
            f"{'the study' if k == WHOLE_STUDY else 'instance ' + k}: {v}"
            for k, v in sorted(self.unreadable.items())
        ]
        return "; ".join(reasons)

    def add_timing(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds


@dataclass(frozen=True)
class _Read:
    """An instance read for analysis: its header, file, and how often its analysis was lost."""

    instance_key: str
    dataset: Dataset
    path: Path
    received: float
    lost: int  # starts counted without an end: each lost its worker process
    began: float  # perf_counter() when its read began


class StudyProcessor:
    """Steps 1-5 of the module docstring for one study, with its dependencies explicit."""

    def __init__(
        self,
        settings: Settings,
        source: InstanceSource,
        outbox: Outbox,
        analyse: AnalyseMany,
        locks: InstanceLocks,
        send: SendFn,
        counters: InstanceCounters,
        policy: IsolationPolicy | None = None,
        *,
        destinations: Callable[[], Sequence[Destination]] | None = None,
        observer: WorkerObserver | None = None,
    ) -> None:
        """``destinations`` gives the current destination list for each run (default: the
        settings' list); ``observer`` gets the metrics and audit events."""
        self.settings = settings
        self.destinations = destinations or (lambda: settings.destinations)
        self.observer = observer or WorkerObserver()
        self.source = source
        self._records: list[SourceInstance] = []
        self.outbox = outbox
        self.analyse = analyse
        self.locks = locks
        self.send = send
        self.counters = counters
        self.policy = policy or IsolationPolicy()

    def targets(self, study_key: str, instance_keys: Sequence[str] | None) -> list[str]:
        """Pending instances of the study, restricted to ``instance_keys`` when given, then the
        instances whose file is missing: named ones the spool does not hold, or (for the whole
        study) those queued whose file is gone; dead-lettered ones excepted.

        Raises :class:`StudyNotInSpool` when the whole study is missing and no instance is
        named.
        """
        try:
            records = self._records = list(self.source.instances(study_key))
            lost = self.source.lost_instances(study_key)
        except IngestError as err:
            if instance_keys is None:
                raise StudyNotInSpool(str(err)) from err
            records, lost = [], []
        pending = [r.instance_key for r in records if r.selected and not r.done]
        if instance_keys is None:
            return pending + lost
        wanted = list(dict.fromkeys(instance_keys))
        known = {r.instance_key for r in records}
        missing = [
            key
            for key in wanted
            if key not in known and not self.outbox.is_dead_source(study_key, key)
        ]
        return [key for key in pending if key in set(wanted)] + missing

    def run(
        self,
        study_key: str,
        instance_keys: Sequence[str] | None,
        owner: str,
        *,
        final_attempt: bool = False,
    ) -> StudyReport:
        """Process the study; with ``final_attempt`` dead-letter what still cannot be sent or
        read."""
        report = StudyReport(study_key)
        try:
            report.targets = self.targets(study_key, instance_keys)
        except StudyNotInSpool as err:
            self._study_not_in_spool(report, str(err), final_attempt)
            log_study(report)
            return report
        except SourceGone as err:
            self._study_gone(report, describe_error(err))
            log_study(report)
            return report
        except (SourceUnavailable, SourceRefused) as err:
            self._node_failed(report, err)
            log_study(report)
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
        except (SourceUnavailable, SourceRefused) as err:
            self._node_failed(report, err)
        finally:
            for instance_key in mine:
                self.locks.release(study_key, instance_key, owner)
            if not report.waiting:
                self.source.release(study_key)
        log_study(report)
        return report

    def _node_failed(self, report: StudyReport, err: SourceUnavailable | SourceRefused) -> None:
        if isinstance(err, SourceRefused):
            report.refused = describe_error(err)
            logger.error(
                "study %s: the node refused the task (%s); it stays pending there and is "
                "queued again",
                report.study_key,
                report.refused,
            )
        else:
            report.unreachable = describe_error(err)

    def _process(self, report: StudyReport, instance_keys: list[str], final_attempt: bool) -> None:
        records: list[SourceRecord] = []
        known = {key: self.outbox.source(report.study_key, key) for key in instance_keys}
        fresh = [key for key, record in known.items() if record is None]
        size = self.policy.batch_size
        for first in range(0, len(fresh), size):
            known.update(self._analyse_batch(report, fresh[first : first + size], final_attempt))
        for instance_key in instance_keys:
            record = known[instance_key]
            self._note_received(report, instance_key, record)
            if record is not None:
                records.append(record)
                report.results.extend(record.results)
        destinations = list(self.destinations())
        if report.results and not destinations:
            logger.warning("no destinations configured: results stay in the outbox")
        started = time.perf_counter()
        report.delivery = deliver(self.outbox, destinations, report.results, self.send)
        report.add_timing("delivery", time.perf_counter() - started)
        self.observer.delivered(self.outbox, report.delivery, destinations)
        if final_attempt and report.delivery.transient:
            report.given_up = give_up(
                self.outbox, report.delivery, "destination unavailable after the last retry"
            )
            self.observer.dead_lettered("delivery", report.given_up)
        report.done = settle(self.outbox, self.source, destinations, records)

    def _listed(self, instance_key: str) -> SourceInstance | None:
        return next((r for r in self._records if r.instance_key == instance_key), None)

    def _note_received(
        self, report: StudyReport, instance_key: str, record: SourceRecord | None
    ) -> None:
        received = record.received if record is not None else None
        if received is None:
            listed = self._listed(instance_key)
            received = listed.received if listed is not None else None
        if received is None:
            return
        report.received = min(received, report.received or received)
        report.last_received = max(received, report.last_received or received)

    def _read(self, study_key: str, instance_key: str) -> tuple[Dataset, Path, float]:
        path = self.source.instance_file(study_key, instance_key)
        dataset = read_dataset(path, f"{study_key}/{instance_key}", defer_size=HEADER_DEFER_SIZE)
        listed = self._listed(instance_key)
        received = listed.received if listed is not None else None
        return dataset, path, received if received is not None else path.stat().st_mtime

    def _analyse_batch(
        self, report: StudyReport, instance_keys: list[str], final_attempt: bool
    ) -> dict[str, SourceRecord | None]:
        """Read, analyse and store these instances; their records (None: not analysed).

        An instance whose last analysis was lost (its start was counted, its end never came)
        is analysed alone, so that an image that kills its worker cannot take its batch-mates
        down again.
        """
        records: dict[str, SourceRecord | None] = dict.fromkeys(instance_keys)
        read = [
            r for key in instance_keys if (r := self._read_instance(report, key, final_attempt))
        ]
        fresh = [r for r in read if r.lost == 0]
        groups = ([fresh] if fresh else []) + [[r] for r in read if r.lost > 0]
        for group in groups:
            records.update(self._analyse_group(report, group, final_attempt))
        return records

    def _read_instance(
        self, report: StudyReport, instance_key: str, final_attempt: bool
    ) -> _Read | None:
        """The instance's header and file; None (with the instance retried or dead-lettered)
        when it cannot be read."""
        study_key = report.study_key
        began = time.perf_counter()
        try:
            dataset, path, received = self._read(study_key, instance_key)
        except self.policy.fatal:
            raise
        except (SourceUnavailable, SourceRefused):
            raise  # the node, not the instance: the whole task waits or ends
        except SourceGone as err:
            self._dead_letter(report, instance_key, f"gone from the node: {describe_error(err)}")
            return None
        except Exception as err:  # missing, unreadable, not DICOM: retried a bounded number
            self._unreadable(report, instance_key, describe_error(err), final_attempt)
            return None
        report.add_timing("read", time.perf_counter() - began)
        self.counters.read_failures.reset(study_key, instance_key)
        lost = self.counters.starts.get(study_key, instance_key)
        return _Read(instance_key, dataset, path, received, lost, began)

    def _analyse_group(
        self, report: StudyReport, group: list[_Read], final_attempt: bool
    ) -> dict[str, SourceRecord | None]:
        """Count the start of each instance's analysis, analyse them together, store them."""
        started = [r for r in group if self._count_start(report, r)]
        records: dict[str, SourceRecord | None] = {}
        if not started:
            return records
        try:
            try:
                sources = [(r.dataset, r.path) for r in started]
                results = self.analyse(sources, alone=any(r.lost for r in started))
            except self.policy.fatal:
                raise
            except Exception as err:  # the whole call failed: each instance is classified
                results = [err] * len(started)
            for read, result in zip(started, results, strict=True):
                records[read.instance_key] = self._finish(report, read, result, final_attempt)
        finally:
            for read in started:
                self.counters.starts.reset(report.study_key, read.instance_key)
        return records

    def _count_start(self, report: StudyReport, read: _Read) -> bool:
        """Count a start; dead-letter the instance instead when it started too often."""
        starts = self.counters.starts.increment(report.study_key, read.instance_key)
        if starts <= self.policy.max_analysis_starts:
            return True
        self.counters.starts.reset(report.study_key, read.instance_key)
        self._dead_letter(
            report,
            read.instance_key,
            f"its analysis started {starts - 1} times without finishing "
            "(the worker process was lost each time)",
        )
        return False

    def _finish(
        self,
        report: StudyReport,
        read: _Read,
        result: AnalysisResult | Exception,
        final_attempt: bool,
    ) -> SourceRecord | None:
        """Store an analysed instance's results, or classify why it has none."""
        instance_key = read.instance_key
        try:
            if isinstance(result, Exception):
                raise result
            record = self._store(report, instance_key, result, read.received)
            self.observer.analysed(
                record.outcome, time.perf_counter() - read.began, dict(result.timings)
            )
            return record
        except self.policy.fatal:
            raise
        except (TransientDeliveryError, OSError) as err:  # the file or the outbox, not the data
            self._unreadable(report, instance_key, describe_error(err), final_attempt)
            return None
        except Exception as err:  # classified per instance: the study goes on
            self._dead_letter(report, instance_key, f"cannot analyse: {describe_error(err)}")
            return None

    def _store(
        self, report: StudyReport, instance_key: str, result: AnalysisResult, received: float
    ) -> SourceRecord:
        started = time.perf_counter()
        outcome = "prediction" if isinstance(result.outcome, Prediction) else "unassessable"
        record = self.outbox.put(
            report.study_key,
            instance_key,
            list(result.datasets),
            outcome=outcome,
            received=received,
            timings=dict(result.timings),
        )
        report.add_timing("outbox", time.perf_counter() - started)
        for name, seconds in result.timings.items():
            report.add_timing(name, seconds)
        report.analysed += 1
        if outcome == "prediction":
            report.predictions += 1
        else:
            report.unassessable += 1
        return record

    def _unreadable(
        self, report: StudyReport, instance_key: str, reason: str, final_attempt: bool
    ) -> None:
        """A read (or outbox write) failed: retry the task, or give up after the last try."""
        study_key = report.study_key
        failures = self.counters.read_failures.increment(study_key, instance_key)
        limit = self.policy.max_read_attempts
        if failures < limit and not final_attempt:
            logger.error(
                "study %s instance %s: %s (attempt %d of %d; will retry)",
                study_key, instance_key, reason, failures, limit,
            )  # fmt: skip
            report.unreadable[instance_key] = reason
            return
        self.counters.read_failures.reset(study_key, instance_key)
        self._dead_letter(
            report, instance_key, f"cannot read the spooled instance after {failures} "
            f"attempts: {reason}"
        )  # fmt: skip

    def _study_not_in_spool(self, report: StudyReport, reason: str, final_attempt: bool) -> None:
        study_key = report.study_key
        failures = self.counters.read_failures.increment(study_key, WHOLE_STUDY)
        limit = self.policy.max_read_attempts
        if failures < limit and not final_attempt:
            logger.error(
                "study %s: %s (attempt %d of %d; will retry)", study_key, reason, failures, limit
            )
            report.unreadable[WHOLE_STUDY] = reason
            return
        self.counters.read_failures.reset(study_key, WHOLE_STUDY)
        why = f"the study is not in the spool after {failures} attempts: {reason}"
        self.outbox.dead_letter_study(study_key, why)
        self.observer.dead_lettered("analysis")
        report.failed += 1
        logger.error("study %s dead-lettered: %s", study_key, why)

    def _study_gone(self, report: StudyReport, reason: str) -> None:
        why = f"the study is gone from the node: {reason}"
        self.outbox.dead_letter_study(report.study_key, why)
        self.observer.dead_lettered("analysis")
        report.failed += 1
        logger.error("study %s dead-lettered: %s", report.study_key, why)

    def _dead_letter(self, report: StudyReport, instance_key: str, reason: str) -> None:
        study_key = report.study_key
        logger.error("study %s instance %s dead-lettered: %s", study_key, instance_key, reason)
        self.outbox.dead_letter_source(study_key, instance_key, reason)
        self.observer.dead_lettered("analysis")
        try:
            self.source.mark_dead(study_key, instance_key, reason)
        except (IngestError, SourceGone) as err:  # the study itself is gone
            logger.warning("study %s: %s", study_key, err)
        report.failed += 1

    def dead_letter_study(
        self, study_key: str, instance_keys: Sequence[str] | None, reason: str
    ) -> list[str]:
        """Give up on the study's pending instances (e.g. a poison message); return them."""
        try:
            targets = self.targets(study_key, instance_keys)
        except (SourceUnavailable, SourceRefused) as err:
            logger.error(
                "study %s: not dead-lettered, the node did not answer (%s); it stays pending there",
                study_key,
                describe_error(err),
            )
            return []
        except (StudyNotInSpool, SourceGone):
            self.outbox.dead_letter_study(study_key, reason)
            self.observer.dead_lettered("analysis")
            logger.error("study %s dead-lettered: %s", study_key, reason)
            return []
        for instance_key in targets:
            self.outbox.dead_letter_source(study_key, instance_key, reason)
            try:
                self.source.mark_dead(study_key, instance_key, reason)
            except (IngestError, SourceGone, SourceUnavailable, SourceRefused) as err:
                logger.warning("study %s: %s", study_key, err)
        self.observer.dead_lettered("analysis", len(targets))
        logger.error("study %s: %d instances dead-lettered: %s", study_key, len(targets), reason)
        return targets


def log_study(report: StudyReport) -> None:
    """The one INFO line per study, receive to delivered, with timings and no PHI."""
    now = time.time()
    delivery = report.delivery
    if report.refused is not None:
        state = "refused by the node (queued again there)"
    elif report.waiting:
        waiting = sorted(delivery.waiting) if not report.given_up else []
        if report.unreachable is not None:
            waiting.append("the node")
        if WHOLE_STUDY in report.unreadable:
            waiting.append("the study to appear in the spool")
        elif report.unreadable:
            waiting.append(f"{len(report.unreadable)} unreadable instances")
        state = f"waiting for {', '.join(waiting)} (will retry)"
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
        "study %s %s: %d instances (%d analysed: %d predictions, %d unassessable; "
        "%d dead-lettered; %d busy in another task), %d results: %d sends delivered, "
        "%d refused, %d dead-lettered after retries; receive to %s %s "
        "(queued %s, this task %.2f s: %s)",
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
