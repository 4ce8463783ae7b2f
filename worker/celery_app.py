"""The worker's Celery application, built from :class:`~dicom_node.config.Settings`.

:func:`make_app` builds it; nothing is built at import.  ``celery -A worker.celery_app ...``
(e.g. ``inspect ping`` in a container health check) gets a lazily built ``app`` from the
configuration file named by ``CORONET_CONFIG`` (default ``configs/node.yaml``).

Delivery guarantees (Redis broker):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after the
  task returned, so a worker killed mid-task leaves it on the broker; a lost pool process gets
  its message re-queued at once, a lost whole worker after the ``visibility_timeout``;
* ``worker_prefetch_multiplier=1``: a process reserves one message at a time;
* the visibility timeout is longer than the task time limit and than the longest retry
  countdown, so a running or waiting task is never handed to a second worker;
* a message started more than ``max_redeliveries + 1`` times is dead-lettered (no poison loop);
* JSON only; one queue (``broker.queue``, or ``--queue``), so GPU and CPU pools can be routed
  to different queues.

Devices: the model is loaded in every pool process by the ``worker_process_init`` signal.
``model.device`` ``cpu`` or ``cuda:N`` is used as is; ``auto`` gives process *i* the GPU
``cuda:{i mod G}`` on a host with G GPUs (billiard keeps the index when it replaces a process),
and the CPU when there is none.  ``coronet worker`` then starts G processes by default, one per
GPU.  The GPU count comes from NVML (``torch.cuda.device_count``), which does not initialise
CUDA in the parent, so the forked children may.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from celery import Celery
from celery.signals import worker_init, worker_process_init

from dicom_node.config import DEFAULT_CONFIG, Settings, load_settings
from dicom_node.errors import ConfigError
from dicom_node.queueing import TASK_NAME
from worker.tasks import Analyse, WorkerRuntime, register_tasks

logger = logging.getLogger(__name__)

CONFIG_ENV = "CORONET_CONFIG"
"""Names the configuration file of the lazily built :data:`app` (``celery -A``)."""

Pool = Literal["prefork", "solo"]
HeatmapMode = Literal["fast", "full", "off"]


@dataclass(frozen=True)
class WorkerOptions:
    """Worker settings that are not part of the node's configuration file (CLI options).

    Times are in seconds.  ``lock_ttl`` is how long an instance lock outlives a dead worker.
    """

    concurrency: int = 1
    pool: Pool = "prefork"
    queue: str | None = None
    heatmap: HeatmapMode = "fast"
    soft_time_limit: float = 840.0
    time_limit: float = 900.0
    visibility_timeout: float = 3600.0
    max_retries: int = 8
    retry_backoff: float = 2.0
    retry_backoff_max: float = 300.0
    max_redeliveries: int = 3
    gpu_count: int | None = None
    threads: int | None = None
    """torch CPU threads per pool process; None: the cores shared between the processes."""

    def __post_init__(self) -> None:
        problems = []
        if self.concurrency < 1:
            problems.append("concurrency must be at least 1")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be at least 1")
        if not 0 < self.soft_time_limit < self.time_limit:
            problems.append("need 0 < soft time limit < time limit")
        if self.visibility_timeout <= self.time_limit:
            problems.append("the visibility timeout must exceed the task time limit")
        if self.visibility_timeout <= self.retry_backoff_max:
            problems.append("the visibility timeout must exceed the longest retry countdown")
        if self.max_retries < 0 or self.max_redeliveries < 0:
            problems.append("max retries and max redeliveries must not be negative")
        if self.retry_backoff <= 0 or self.retry_backoff_max < self.retry_backoff:
            problems.append("need 0 < retry backoff <= retry backoff max")
        if problems:
            raise ConfigError("worker options: " + "; ".join(problems))

    @property
    def lock_ttl(self) -> float:
        return self.time_limit + 60.0

    @property
    def restore_interval(self) -> float:
        """Seconds between sweeps for messages of lost workers (at most 10)."""
        return max(1.0, min(10.0, self.visibility_timeout / 4))


def resolve_device(setting: str, index: int, gpu_count: int | None) -> str:
    """The torch device of pool process ``index`` for ``model.device`` (see module doc)."""
    if setting != "auto":
        return setting
    count = gpu_count if gpu_count is not None else detect_gpus()
    return f"cuda:{index % count}" if count > 0 else "cpu"


def detect_gpus() -> int:
    """Number of CUDA GPUs, counted through NVML when possible.

    ``torch.cuda.device_count`` does not initialise CUDA when NVML answers, so the pool
    processes forked afterwards can still use CUDA; ``torch.cuda.is_available`` would.
    """
    import torch

    return int(torch.cuda.device_count())


def configure_torch_threads(options: WorkerOptions) -> None:
    """Share the CPU cores between the pool processes (or use ``options.threads``)."""
    import torch

    cores = os.cpu_count() or 1
    threads = options.threads or (
        max(1, cores // options.concurrency) if options.pool == "prefork" else cores
    )
    torch.set_num_threads(threads)


def make_app(
    settings: Settings, options: WorkerOptions | None = None, *, analyse: Analyse | None = None
) -> Celery:
    """The worker's Celery app with ``coronet.process_study`` registered.

    ``analyse`` replaces the model for tests; the engine is then never loaded.
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
    runtime = WorkerRuntime(settings, options)
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
        from billiard.process import current_process

        runtime.start_process(int(getattr(current_process(), "index", 0) or 0))

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app and runtime.options.pool == "solo":
            runtime.start_process(0)

    uid = f"coronet-worker-{id(runtime)}"
    worker_process_init.connect(on_process_init, weak=False, dispatch_uid=uid)
    worker_init.connect(on_worker_init, weak=False, dispatch_uid=uid)


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


__all__ = [
    "WorkerOptions",
    "app_from_environment",
    "configure_torch_threads",
    "detect_gpus",
    "make_app",
    "resolve_device",
    "runtime_of",
]
