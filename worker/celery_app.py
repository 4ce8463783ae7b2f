"""The thin Celery glue of the worker: the app, the task, and the process signals.

The work itself is :class:`worker.processor.StudyProcessor` (no Celery there); the process
set-up is :class:`worker.runtime.WorkerRuntime`.

:func:`make_app` builds the app; nothing is built at import.  ``celery -A worker.celery_app ...``
(e.g. ``inspect ping`` in a container health check) gets a lazily built ``app`` from the
configuration file named by ``CORONET_CONFIG`` (default ``configs/node.yaml``).

Delivery guarantees (Redis broker):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after the
  task returned, so a worker killed mid-task leaves it on the broker; a lost pool process gets
  its message re-queued at once, a lost whole worker after the ``visibility_timeout``;
* ``worker_prefetch_multiplier=1``: a process reserves one message at a time; a batching
  worker (``--batch N``, Celery's ``threads`` pool) reserves one per thread, N in all, and
  analyses their images together (:mod:`worker.batching`);
* the ``threads`` pool enforces no Celery time limit: a task there waits at most the soft time
  limit for its batch, and a batch stuck past the hard limit ends the worker process;
* the visibility timeout is longer than the task time limit and than the longest retry
  countdown, so a running or waiting task is never handed to a second worker;
* a message started more than ``max_redeliveries + 1`` times is dead-lettered (no poison loop);
  before that, an instance whose analysis started ``max_redeliveries`` times without finishing
  is dead-lettered alone and the rest of its study goes on (:mod:`worker.processor`);
* a task is retried, with the same backoff, while one of its instances cannot be read from the
  spool, at most ``max_read_attempts`` times per instance, and while the node cannot be
  reached to fetch its instances or to hear that they are done (:mod:`worker.sources`);
* JSON only; one queue (``broker.queue``, or ``--queue``), so GPU and CPU pools can be routed
  to different queues.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from billiard.process import current_process
from celery import Celery, Task, bootsteps
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from dicom_node.core.backoff import backoff_delay
from dicom_node.core.errors import CoronetError, IngestError
from dicom_node.core.logs import make_safe
from dicom_node.core.settings import DEFAULT_CONFIG, Settings, load_settings
from dicom_node.core.task import TASK_NAME, StudyTask
from worker.batching import BatchTimeout
from worker.destinations import DestinationSource
from worker.heartbeat import Heartbeat
from worker.locks import AttemptCounter
from worker.options import WorkerOptions
from worker.processor import Analyse
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

CONFIG_ENV = "CORONET_CONFIG"
"""Names the configuration file of the lazily built :data:`app` (``celery -A``)."""


def make_app(
    settings: Settings,
    options: WorkerOptions | None = None,
    *,
    analyse: Analyse | None = None,
    destinations: DestinationSource | None = None,
) -> Celery:
    """The worker's Celery app with ``coronet.process_study`` registered.

    ``analyse`` replaces the model for tests; the engine is then never loaded.
    ``destinations`` re-reads the destination list before each task (default: the list of
    ``settings``, fixed).
    """
    options = options or WorkerOptions()
    queue = options.queue or settings.broker.queue
    app = Celery("coronet-worker", broker=settings.broker.url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_routes={TASK_NAME: {"queue": queue}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=options.soft_time_limit,
        task_time_limit=options.time_limit,
        broker_transport_options={
            "visibility_timeout": options.visibility_timeout,
            "unacked_restore_interval": options.restore_interval,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    runtime = WorkerRuntime(settings, options, destinations)
    register_tasks(app, runtime, analyse)
    app.coronet_runtime = runtime
    if analyse is None:
        _connect_signals(app, runtime)
    return app


def runtime_of(app: Celery) -> WorkerRuntime:
    """The :class:`WorkerRuntime` that :func:`make_app` attached to ``app``."""
    runtime: WorkerRuntime = app.coronet_runtime
    return runtime


def _connect_signals(app: Celery, runtime: WorkerRuntime) -> None:
    def on_process_init(**_: Any) -> None:
        runtime.start_process(int(getattr(current_process(), "index", 0) or 0))

    class LoadModelInWorker(bootsteps.StartStopStep):
        """The threads pool runs its tasks in the worker's own process and sends no
        ``worker_process_init``: load the model there, after the logging is set up and before
        the consumer (the last step) takes tasks."""

        requires = ("celery.worker.components:Pool",)

        def start(self, parent: Any) -> None:
            runtime.start_process(0)

        def stop(self, parent: Any) -> None:
            runtime.stop()

    if runtime.options.pool == "threads":
        app.steps["worker"].add(LoadModelInWorker)

    def on_logging_set_up(logger: logging.Logger | None = None, **_: Any) -> None:
        if logger is not None:
            make_safe(logger)  # one line per record, no values echoed by pydicom

    heartbeat = Heartbeat(runtime.redis)

    def on_worker_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            heartbeat.start()

    def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
        heartbeat.stop()
        runtime.stop()

    uid = f"coronet-worker-{id(runtime)}"
    worker_ready.connect(on_worker_ready, weak=False, dispatch_uid=uid)
    worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid=uid)
    worker_process_init.connect(on_process_init, weak=False, dispatch_uid=uid)
    after_setup_logger.connect(on_logging_set_up, weak=False, dispatch_uid=uid)
    after_setup_task_logger.connect(on_logging_set_up, weak=False, dispatch_uid=uid)


def app_from_environment() -> Celery:
    """The app for ``celery -A worker.celery_app``: settings from ``$CORONET_CONFIG``."""
    path = Path(os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG)))
    return make_app(load_settings(path))


_lazy_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """Build ``app`` on first access only (PEP 562), for the ``celery`` command."""
    global _lazy_app
    if name in ("app", "celery"):
        if _lazy_app is None:
            _lazy_app = app_from_environment()
        return _lazy_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        self: Task[Any, Any],
        study_key: str,
        instance_keys: list[str] | None = None,
        fetch: str | None = None,
        spool: str | None = None,
    ) -> None:
        """Analyse a study and deliver its SR and SC (:mod:`worker.processor`)."""
        try:
            task = StudyTask.from_message(study_key, instance_keys, fetch, spool)
        except IngestError as err:
            logger.error("malformed task arguments, dropped: %s", err)
            return
        study_key = task.study_key
        task_id = str(self.request.id)
        retries = int(self.request.retries or 0)
        processor = runtime.processor(analyse, fatal=(SoftTimeLimitExceeded,), task=task)
        attempt = AttemptCounter(runtime.redis()).count(task_id, retries)
        if attempt > options.max_redeliveries + 1:
            processor.dead_letter_study(
                study_key,
                task.instance_keys,
                f"task started {attempt} times without finishing (worker lost each time)",
            )
            return
        if attempt > 1:
            logger.warning("study %s: task redelivered (start %d)", study_key, attempt)
        final = retries >= options.max_retries
        try:
            with runtime.running_task():
                report = processor.run(study_key, task.instance_keys, task_id, final_attempt=final)
        except (SoftTimeLimitExceeded, BatchTimeout):
            processor.dead_letter_study(
                study_key,
                task.instance_keys,
                f"the task ran longer than its time limit ({options.soft_time_limit:g} s)",
            )
            return
        if report.waiting and final and report.unreachable is not None:
            logger.error(
                "study %s: the node stayed unreachable through %d retries (%s); it stays "
                "pending on the node, which queues it again",
                study_key,
                retries,
                report.unreachable,
            )
            return
        if report.waiting:
            delay = backoff_delay(
                retries, options.retry_backoff, options.retry_backoff_max, jitter=True
            )
            reasons = report.retry_reasons()
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
    "app_from_environment",
    "make_app",
    "register_tasks",
    "runtime_of",
]
