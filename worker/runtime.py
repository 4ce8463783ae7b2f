"""What a worker process needs for its tasks: devices, threads, the loaded model, clients.

Devices: the model is loaded once in every pool process (Celery's ``worker_process_init``).
``model.device`` ``cpu`` or ``cuda:N`` is used as is; ``auto`` gives process *i* the GPU
``cuda:{i mod G}`` on a host with G GPUs (billiard keeps the index when it replaces a process),
and the CPU when there is none.  The GPU count comes from NVML (``torch.cuda.device_count``),
which does not initialise CUDA in the parent, so the forked children may.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import redis
import torch
from pydicom.dataset import Dataset

from dicom_node.core.audit_trail import AuditTrail, default_source_id
from dicom_node.core.fetch import spool_identity
from dicom_node.core.logs import quiet_libraries
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Settings
from dicom_node.core.spool import Spool
from dicom_node.core.task import StudyTask
from dicom_node.core.telemetry import TelemetryWriter
from worker.batching import Batcher, BatchTimeout
from worker.decoder import DecodeLimits, Decoder
from worker.delivery import Sender
from worker.destinations import DestinationSource
from worker.engine import Engine, load_engine
from worker.fetching import FetchCache, NodeClient, RemoteSource
from worker.locks import InstanceCounters, InstanceLocks
from worker.observer import WorkerObserver
from worker.options import WorkerOptions
from worker.pipeline import InstanceResult, process_many
from worker.processor import (
    Analyse,
    AnalyseMany,
    IsolationPolicy,
    StudyProcessor,
    one_by_one,
)
from worker.sources import InstanceSource, SpoolSource

logger = logging.getLogger(__name__)


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
    return int(torch.cuda.device_count())


def configure_torch_threads(options: WorkerOptions) -> None:
    """Share the CPU cores between the pool processes (or use ``options.threads``)."""
    cores = os.cpu_count() or 1
    threads = options.threads or (
        max(1, cores // options.concurrency) if options.pool == "prefork" else cores
    )  # the solo and threads pools run the model in one thread of one process
    torch.set_num_threads(threads)


def decode_limits(settings: Settings, engine: Engine) -> DecodeLimits:
    """The decoder's limits: ``model.*`` of the configuration, the bundle's fallback window."""
    model = settings.model
    return DecodeLimits(
        max_pixels=model.max_pixels,
        timeout_s=model.decode_timeout,
        memory_mb=model.decode_memory_mb,
        fallback_window=engine.fallback_window,
    )


class WorkerRuntime:
    """Everything a worker process needs for its tasks: settings, spool, outbox, engine and
    decoder.

    The engine is loaded, and the decoder process (:mod:`worker.decoder`) started, once per
    process by :meth:`start_process` (Celery's ``worker_process_init``, or ``worker_init`` for
    the solo pool); Redis clients are made per process, since sockets must not be shared
    across ``fork``.
    """

    def __init__(
        self,
        settings: Settings,
        options: WorkerOptions,
        destinations: DestinationSource | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.destinations = destinations or DestinationSource(settings.destinations)
        self.audit_trail = AuditTrail.from_settings(
            settings.audit, default_source_id(settings.node.ae_title)
        )
        self.spool = Spool(settings.storage.spool_dir)
        self.outbox = Outbox(settings.storage.outbox_dir)
        self.cache = FetchCache(settings.fetch.cache_dir)
        self.node_client = NodeClient.from_settings(settings)
        self.engine: Engine | None = None
        self.decoder: Decoder | None = None
        self.device: str | None = None
        self._loaded_pid = 0
        self._client: redis.Redis | None = None
        self._client_pid = 0
        self._analyse: AnalyseMany | None = None
        self._replacement: Analyse | None = None
        self._batcher: Batcher | None = None
        self._batcher_lock = threading.Lock()

    def redis(self) -> redis.Redis:
        if self._client is None or self._client_pid != os.getpid():
            self._client = redis.Redis.from_url(
                self.settings.broker.url, socket_connect_timeout=5, socket_timeout=30
            )
            self._client_pid = os.getpid()
        return self._client

    def start_process(self, index: int) -> None:
        """Load the model once for this process (device pinned by process index)."""
        if self.engine is not None and self._loaded_pid == os.getpid():
            return
        quiet_libraries()
        device = resolve_device(self.settings.model.device, index, self.options.gpu_count)
        if device == "cpu":
            configure_torch_threads(self.options)
        started = time.perf_counter()
        engine = self.engine = load_engine(self.settings.model.bundle_dir, device)
        self._loaded_pid = os.getpid()
        self.device = device
        self.decoder = Decoder(decode_limits(self.settings, engine))
        self.decoder.start()
        removed = self.outbox.remove_temporary()
        self.cache.sweep(self.settings.fetch.url_ttl)
        logger.info(
            "process %d (pid %d): model %s loaded on %s in %.1f s, decoder process %s%s",
            index,
            os.getpid(),
            engine.model_version,
            device,
            time.perf_counter() - started,
            self.decoder.pid,
            f"; removed {removed} partial outbox writes" if removed else "",
        )

    def analyse(self, replacement: Analyse | None = None) -> AnalyseMany:
        """How this process analyses a task's images: the model in batches of ``--batch``
        (shared between the tasks with a :class:`~worker.batching.Batcher` when above 1).

        ``replacement`` analyses one image instead of the model (tests); the batching around
        it is the same.
        """
        with self._batcher_lock:
            if self._analyse is None or replacement is not self._replacement:
                self._analyse = self._make_analyse(replacement)
                self._replacement = replacement
            return self._analyse

    def _make_analyse(self, replacement: Analyse | None) -> AnalyseMany:
        options = self.options
        batch = self._model_batch() if replacement is None else one_by_one(replacement)
        if options.batch == 1:
            return batch
        if self._batcher is not None:
            self._batcher.stop()
        self._batcher = Batcher(
            batch,
            options.batch,
            linger_s=options.batch_wait,
            wait_s=options.soft_time_limit,
            overrun_s=options.time_limit,
        )
        self._batcher.start()
        return self._batcher

    def _model_batch(self) -> AnalyseMany:
        engine, decoder = self.engine, self.decoder
        if engine is None or decoder is None:
            logger.warning("model not loaded at process start; loading it now")
            self.start_process(0)
            engine, decoder = self.engine, self.decoder
            assert engine is not None and decoder is not None
        settings, preset, size = self.settings, self.options.attribution_preset, self.options.batch

        def analyse(
            sources: Sequence[tuple[Dataset, Path]], *, alone: bool = False
        ) -> list[InstanceResult | Exception]:
            return process_many(
                sources,
                engine,
                settings.results,
                settings.selection,
                decoder=decoder,
                preset=preset,
                batch_size=size,
            )

        return analyse

    @contextmanager
    def running_task(self) -> Iterator[None]:
        """Around one task: a batch may wait for the images of running tasks."""
        with self._batcher.task() if self._batcher is not None else nullcontext():
            yield

    def stop(self) -> None:
        """Stop the batcher, after the batches handed in (worker shutdown)."""
        with self._batcher_lock:
            if self._batcher is not None:
                self._batcher.stop()
                self._batcher = None
                self._analyse = None

    def source(self, task: StudyTask | None) -> InstanceSource:
        """Where ``task``'s instances come from: fetched from the node, unless the task has no
        fetch URL (the node has no admin service) or ``fetch.direct_spool`` is set and this
        worker's ``storage.spool_dir`` is the node's spool (the task names its identity)."""
        if task is None or task.fetch is None:
            return SpoolSource(self.spool)
        direct = self.settings.fetch.direct_spool and task.spool is not None
        if direct and spool_identity(self.spool.root) == task.spool:
            return SpoolSource(self.spool)
        return RemoteSource(self.node_client, self.cache, task.fetch, task.study_key)

    def processor(
        self,
        analyse: Analyse | None = None,
        fatal: tuple[type[BaseException], ...] = (),
        task: StudyTask | None = None,
    ) -> StudyProcessor:
        """A study processor for one task (``analyse`` replaces the model in tests); the
        exceptions ``fatal`` are never caught for one instance (the task's time limit)."""
        client = self.redis()
        options = self.options
        policy = IsolationPolicy(
            max_read_attempts=options.max_read_attempts,
            max_analysis_starts=max(1, options.max_redeliveries),
            fatal=(*fatal, BatchTimeout),
            batch_size=options.batch,
        )
        return StudyProcessor(
            self.settings,
            self.source(task),
            self.outbox,
            self.analyse(analyse),
            InstanceLocks(client, options.lock_ttl),
            Sender.from_settings(self.settings),
            InstanceCounters(client),
            policy,
            destinations=self.destinations,
            observer=WorkerObserver(
                TelemetryWriter(client), self.audit_trail, self.settings.node.ae_title
            ),
        )
