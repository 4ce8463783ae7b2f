"""The ``coronet.process_study`` task: spooled study in, SR and SC delivered to the PACS.

One run of :meth:`StudyProcessor.run`:

1. picks the study's pending instances from the spool (those the node selected as frontal
   chest images and no worker finished), restricted to ``instance_keys`` when given;
2. analyses each one not analysed before (:func:`worker.pipeline.process_dataset`: the image
   checks, inference and the heatmap; a bad image becomes an "unassessable" result);
3. writes the SR and the SC durably to the outbox (:mod:`worker.outbox`);
4. C-STOREs them to every configured destination (:mod:`worker.delivery`), skipping those
   already delivered there;
5. marks the spool instances done once every result is delivered or dead-lettered.

The Celery wrapper (:func:`register_tasks`) adds what only a queue needs: a bounded number of
redeliveries of one message (a task that kills its worker again and again is dead-lettered,
not retried for ever), Celery retries with exponential backoff and jitter while a destination
is unavailable, and dead letters once the retries are spent.  A task for instances that are
already done is a no-op, so repeated and recovered tasks are harmless; a per-instance lock in
Redis keeps two workers from analysing the same instance at once.

Logs name studies and instances by their spool keys only (hashes, never UIDs or names).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import redis
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from pydicom.dataset import Dataset

from dicom_node.config import Destination, Settings
from dicom_node.errors import CoronetError, InferenceError, IngestError
from dicom_node.queueing import TASK_NAME
from dicom_node.spool import Spool, check_key
from worker.delivery import SendOutcome, send_files
from worker.outbox import DeliveryRound, Outbox, SourceRecord, deliver, give_up, settle
from worker.results import Prediction

if TYPE_CHECKING:
    from worker.celery_app import WorkerOptions

logger = logging.getLogger(__name__)

KEY_PREFIX: Final = "coronet:"
ATTEMPTS_TTL_S: Final = 7 * 24 * 3600
"""How long Redis remembers how often a task message was started."""


class AnalysisResult(Protocol):
    """What :func:`worker.pipeline.process_dataset` returns (``InstanceResult``)."""

    @property
    def outcome(self) -> object: ...

    @property
    def datasets(self) -> Sequence[Dataset]: ...

    @property
    def timings(self) -> Mapping[str, float]: ...


Analyse = Callable[[Dataset], AnalysisResult]


# --------------------------------------------------------------------------- Redis helpers

_RELEASE_SCRIPT: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class InstanceLocks:
    """Per-instance locks in Redis, so that two workers never analyse one instance at once.

    A lock is owned by a task id and expires after ``ttl_s`` (longer than the task time limit),
    so a lock of a killed worker goes away.  A redelivered message has the same task id and
    takes its own lock over at once.
    """

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._client = client
        self._ttl_ms = int(ttl_s * 1000)
        self._release = client.register_script(_RELEASE_SCRIPT)

    @staticmethod
    def _name(study_key: str, instance_key: str) -> str:
        return f"{KEY_PREFIX}lock:{study_key}:{instance_key}"

    def acquire(self, study_key: str, instance_key: str, owner: str) -> bool:
        name = self._name(study_key, instance_key)
        if self._client.set(name, owner, nx=True, px=self._ttl_ms):
            return True
        holder = self._client.get(name)
        if holder is not None and _text(holder) == owner:
            return bool(self._client.set(name, owner, xx=True, px=self._ttl_ms))
        return False

    def release(self, study_key: str, instance_key: str, owner: str) -> None:
        self._release(keys=[self._name(study_key, instance_key)], args=[owner])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class AttemptCounter:
    """Counts how often one task message was started (first run plus redeliveries)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def count(self, task_id: str, retries: int) -> int:
        name = f"{KEY_PREFIX}attempts:{task_id}:{retries}"
        with self._client.pipeline() as pipe:
            pipe.incr(name)
            pipe.expire(name, ATTEMPTS_TTL_S)
            attempts, _ = pipe.execute()
        return int(attempts)


# --------------------------------------------------------------------------- the processor


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
        send: Callable[..., list[SendOutcome]] = send_files,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.outbox = outbox
        self.analyse = analyse
        self.locks = locks
        self._send = send

    def send(self, destination: Destination, paths: Sequence[Path]) -> list[SendOutcome]:
        """C-STORE with our AE title and timeouts (``worker.delivery.send_files``)."""
        return self._send(
            destination,
            paths,
            calling_ae=self.settings.node.ae_title,
            timeouts=self.settings.node.timeouts,
        )

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


# --------------------------------------------------------------------------- Celery glue


def backoff_delay(
    retries: int, base_s: float, maximum_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped at ``maximum_s``.

    Retry ``n`` waits between ``d/2`` and ``d`` seconds, ``d = min(maximum_s, base_s * 2**n)``.
    """
    ceiling = min(maximum_s, base_s * (2 ** max(retries, 0)))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class WorkerRuntime:
    """Everything a worker process needs for its tasks: settings, spool, outbox, engine.

    The engine is loaded once per process by :meth:`start_process` (Celery's
    ``worker_process_init``, or ``worker_init`` for the solo pool); Redis clients are made per
    process, since sockets must not be shared across ``fork``.
    """

    def __init__(self, settings: Settings, options: WorkerOptions) -> None:
        self.settings = settings
        self.options = options
        self.spool = Spool(settings.storage.spool_dir)
        self.outbox = Outbox(settings.storage.outbox_dir)
        self.engine: Any = None
        self.device: str | None = None
        self._client: redis.Redis | None = None
        self._client_pid = 0
        self._analyse: Analyse | None = None

    def redis(self) -> redis.Redis:
        if self._client is None or self._client_pid != os.getpid():
            self._client = redis.Redis.from_url(
                self.settings.broker.url, socket_connect_timeout=5, socket_timeout=30
            )
            self._client_pid = os.getpid()
        return self._client

    def start_process(self, index: int) -> None:
        """Load the model once for this process (device pinned by process index)."""
        from worker.celery_app import configure_torch_threads, resolve_device
        from worker.cli import quiet_libraries
        from worker.engine import load_engine

        quiet_libraries()
        device = resolve_device(self.settings.model.device, index, self.options.gpu_count)
        if device == "cpu":
            configure_torch_threads(self.options)
        started = time.perf_counter()
        self.engine = load_engine(self.settings.model.bundle_dir, device)
        self.device = device
        removed = self.outbox.remove_temporary()
        logger.info(
            "process %d (pid %d): model %s loaded on %s in %.1f s%s",
            index,
            os.getpid(),
            self.engine.model_version,
            device,
            time.perf_counter() - started,
            f"; removed {removed} partial outbox writes" if removed else "",
        )

    def analyse(self) -> Analyse:
        if self.engine is None:
            logger.warning("model not loaded at process start; loading it now")
            self.start_process(0)
        if self._analyse is None:
            from worker.pipeline import process_dataset

            engine, results = self.engine, self.settings.results
            heatmap, fast = self.options.heatmap != "off", self.options.heatmap == "fast"

            def analyse(dataset: Dataset) -> AnalysisResult:
                return process_dataset(dataset, engine, results, heatmap=heatmap, fast=fast)

            self._analyse = analyse
        return self._analyse

    def processor(self, analyse: Analyse | None = None) -> StudyProcessor:
        locks = InstanceLocks(self.redis(), self.options.lock_ttl)
        return StudyProcessor(
            self.settings,
            self.spool,
            self.outbox,
            analyse if analyse is not None else self.analyse(),
            locks,
        )


def register_tasks(
    app: Celery, runtime: WorkerRuntime, analyse: Analyse | None = None
) -> Task[Any, Any]:
    """Register ``coronet.process_study`` on ``app``; ``analyse`` replaces the model (tests)."""
    options = runtime.options

    @app.task(
        name=TASK_NAME,
        shared=False,  # bound to this app's runtime: never handed to other Celery apps
        # Registered now, not when the app is finalised: a "shared" task of the same name that
        # another Celery app in this process declared would otherwise be installed first and
        # win (Celery runs the shared-task finalisers before the app's own pending tasks).
        lazy=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=options.max_retries,
    )
    def process_study(
        self: Task[Any, Any], study_key: str, instance_keys: list[str] | None = None
    ) -> None:
        """Analyse a spooled study and deliver its SR and SC (see the module docstring)."""
        try:
            check_key(study_key)
            for key in instance_keys or []:
                check_key(key)
        except IngestError as err:
            logger.error("malformed task arguments, dropped: %s", err)
            return
        task_id = str(self.request.id)
        retries = int(self.request.retries or 0)
        processor = runtime.processor(analyse)
        attempt = AttemptCounter(runtime.redis()).count(task_id, retries)
        if attempt > options.max_redeliveries + 1:
            processor.dead_letter_study(
                study_key,
                instance_keys,
                f"task started {attempt} times without finishing (worker lost each time)",
            )
            return
        if attempt > 1:
            logger.warning("study %s: task redelivered (start %d)", study_key, attempt)
        final = retries >= options.max_retries
        try:
            report = processor.run(study_key, instance_keys, task_id, final_attempt=final)
        except SoftTimeLimitExceeded:
            processor.dead_letter_study(
                study_key,
                instance_keys,
                f"the task ran longer than its time limit ({options.soft_time_limit:g} s)",
            )
            return
        if report.waiting:
            delay = backoff_delay(retries, options.retry_backoff, options.retry_backoff_max)
            reasons = "; ".join(f"{k}: {v}" for k, v in sorted(report.delivery.waiting.items()))
            logger.warning(
                "study %s: retry %d of %d in %.1f s (%s)",
                study_key,
                retries + 1,
                options.max_retries,
                delay,
                reasons,
            )
            raise self.retry(countdown=delay, exc=CoronetError(reasons))
        if report.busy:
            logger.info(
                "study %s: %d instances are being processed by another task",
                study_key,
                len(report.busy),
            )

    return process_study


__all__ = [
    "Analyse",
    "AnalysisResult",
    "AttemptCounter",
    "InstanceLocks",
    "StudyProcessor",
    "StudyReport",
    "WorkerRuntime",
    "backoff_delay",
    "log_study",
    "register_tasks",
]
