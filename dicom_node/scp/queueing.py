"""Publishing spooled studies as Celery tasks on the broker (Redis).

The node publishes the one task of :mod:`dicom_node.core.task`; ``instance_keys=None`` means
"every selected instance of the study without a finished task" (see
:mod:`dicom_node.core.spool`).

:class:`StudyQueue` decides *when* to publish:

* ``grouping.mode == "study"``: a study is published as ``[study_key]`` once no new instance
  has arrived for ``grouping.quiet_seconds``;
* ``grouping.mode == "instance"``: each selected instance is published at once as
  ``[study_key, [instance_key]]``;
* recovery: on start, every study with pending instances is published as ``[study_key]``.

Publishing happens on a background thread, so a broker outage never delays a C-STORE answer.
When the broker is down the data stays in the spool and publishing is retried with exponential
backoff until it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from celery import Celery

from dicom_node.core.backoff import Backoff
from dicom_node.core.errors import IngestError
from dicom_node.core.settings import BrokerSettings, GroupingSettings
from dicom_node.core.spool import Spool
from dicom_node.core.task import TASK_NAME, StudyTask

logger = logging.getLogger(__name__)

Publish = Callable[[str, "list[str] | None"], None]
"""Publishes one task; raises when the broker cannot take it."""

Locate = Callable[[str], Mapping[str, str]]
"""The keyword arguments that let a worker reach a study's instances (``fetch``, ``spool``;
:class:`dicom_node.core.fetch.Locator`)."""

_CONNECT_TIMEOUT_S = 2.0


def make_celery_app(broker: BrokerSettings) -> Celery:
    """A producer-only Celery app for ``broker``; publishing does not retry by itself."""
    app = Celery("coronet-node", broker=broker.url, set_as_current=False)
    app.conf.update(
        task_default_queue=broker.queue,
        task_serializer="json",
        accept_content=["json"],
        task_publish_retry=False,
        broker_connection_timeout=_CONNECT_TIMEOUT_S,
        broker_transport_options={
            "socket_connect_timeout": _CONNECT_TIMEOUT_S,
            "socket_timeout": 10.0,
        },
    )
    return app


class CeleryQueue:
    """Sends ``coronet.process_study`` tasks to one queue of one broker."""

    def __init__(self, app: Celery, queue: str, locate: Locate | None = None) -> None:
        self.app = app
        self.queue = queue
        self.locate = locate

    @classmethod
    def from_settings(cls, broker: BrokerSettings, locate: Locate | None = None) -> CeleryQueue:
        return cls(make_celery_app(broker), broker.queue, locate)

    def enqueue_study(self, study_key: str, instance_keys: list[str] | None = None) -> None:
        """Publish one task; raises (e.g. ``kombu.exceptions.OperationalError``) on failure."""
        where = dict(self.locate(study_key)) if self.locate is not None else {}
        keys = None if instance_keys is None else tuple(instance_keys)
        task = StudyTask(study_key, keys, where.get("fetch"), where.get("spool"))
        self.app.send_task(TASK_NAME, args=task.args(), kwargs=task.kwargs(), queue=self.queue)

    __call__ = enqueue_study

    def close(self) -> None:
        self.app.close()


class StudyQueue:
    """Schedules spooled work and publishes it from a background thread (see module doc)."""

    def __init__(
        self,
        spool: Spool,
        publish: Publish,
        grouping: GroupingSettings,
        *,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.spool = spool
        self._publish = publish
        self._grouping = grouping
        self._cond = threading.Condition()
        self._studies: dict[str, float] = {}  # study_key -> when it is due
        self._instances: deque[tuple[str, list[str]]] = deque()
        self._busy = False
        self._stopping = False
        self._backoff = Backoff(retry_initial, retry_max)
        self._thread: threading.Thread | None = None
        self.published = 0

    # ------------------------------------------------------------------ control

    def start(self, *, recover: bool = True) -> None:
        """Start publishing; with ``recover`` first schedule every pending spooled study."""
        if recover:
            self.recover()
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="coronet-queue", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread; unpublished work stays in the spool for the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def reload(self, grouping: GroupingSettings, publish: Publish | None = None) -> None:
        """Apply new grouping settings (and publisher) to work scheduled from now on."""
        with self._cond:
            self._grouping = grouping
            if publish is not None:
                self._publish = publish
            self._cond.notify_all()

    def recover(self) -> int:
        """Schedule every spooled study that has instances without a finished task."""
        studies = self.spool.pending_studies()
        now = time.monotonic()
        with self._cond:
            for study_key in studies:
                self._studies[study_key] = now
            self._cond.notify_all()
        if studies:
            logger.info("recovery: %d spooled studies to queue again", len(studies))
        return len(studies)

    def requeue_stale(self, older_than: float) -> int:
        """Schedule every pending study whose last task was published more than
        ``older_than`` seconds ago (its fetch URL has expired); return how many."""
        now = time.time()
        stale = []
        for study_key in self.spool.pending_studies():
            try:
                queued = self.spool.queued_at(study_key)
            except IngestError:
                continue
            if queued is not None and now - queued > older_than:
                stale.append(study_key)
        for study_key in stale:
            self.schedule(study_key)
        if stale:
            logger.info("%d pending studies queued again with a new fetch URL", len(stale))
        return len(stale)

    # ------------------------------------------------------------------ producers

    def schedule(self, study_key: str) -> None:
        """Publish the study's pending instances now (a retry from the admin console)."""
        with self._cond:
            self._studies[study_key] = time.monotonic()
            self._cond.notify_all()

    def notify(self, study_key: str, instance_key: str) -> None:
        """A selected instance was stored; never blocks on the broker."""
        with self._cond:
            if self._grouping.mode == "instance":
                self._instances.append((study_key, [instance_key]))
            else:
                self._studies[study_key] = time.monotonic() + self._grouping.quiet_seconds
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing scheduled and nothing being published."""
        with self._cond:
            return not self._studies and not self._instances and not self._busy

    def wait_idle(self, timeout: float) -> bool:
        """Wait until :meth:`idle` (e.g. in tests and benchmarks); return whether it is."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._studies or self._instances or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    @property
    def broker_available(self) -> bool:
        """False while publishing is backing off after a broker error."""
        with self._cond:
            return not self._backoff.backing_off

    # ------------------------------------------------------------------ worker thread

    def _next_job(self) -> tuple[str, list[str] | None] | None:
        """Pop the next due job, or wait for one; None when stopping.  Holds the lock."""
        while not self._stopping:
            now = time.monotonic()
            wake = None
            if now < self._backoff.retry_at:
                wake = self._backoff.retry_at
            elif self._instances:
                return self._instances.popleft()
            else:
                due = [k for k, at in self._studies.items() if at <= now]
                if due:
                    study_key = min(due, key=self._studies.__getitem__)
                    del self._studies[study_key]
                    return study_key, None
                if self._studies:
                    wake = min(self._studies.values())
            self._cond.notify_all()  # wake wait_idle() callers
            self._cond.wait(None if wake is None else max(wake - now, 0.001))
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                job = self._next_job()
                if job is None:
                    return
                self._busy = True
            try:
                self._attempt(*job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _attempt(self, study_key: str, instance_keys: list[str] | None) -> None:
        try:
            covered = instance_keys or self.spool.pending_instances(study_key)
            if instance_keys is None and not self.spool.pending_instances(study_key):
                logger.debug("study %s has nothing pending; not queued", study_key)
                return
        except IngestError as err:
            logger.warning("study %s cannot be read from the spool: %s", study_key, err)
            return
        try:
            self._publish(study_key, instance_keys)
        except Exception as err:  # any broker failure: keep the work, retry later
            self._requeue(study_key, instance_keys)
            with self._cond:
                delay = self._backoff.failed(time.monotonic())
            logger.warning(
                "broker unavailable (%s: %s); study %s stays spooled, retry in %.1f s",
                type(err).__name__,
                err,
                study_key,
                delay,
            )
            return
        with self._cond:
            recovered = self._backoff.succeeded()
            self.published += 1
        if recovered:
            logger.info("broker available again; publishing resumed")
        logger.info(
            "queued study %s (%s)",
            study_key,
            f"{len(instance_keys)} instance" if instance_keys else "all pending instances",
        )
        try:
            self.spool.mark_queued(study_key, covered)
        except IngestError as err:
            logger.warning("study %s: %s (it will be queued again on restart)", study_key, err)

    def _requeue(self, study_key: str, instance_keys: list[str] | None) -> None:
        with self._cond:
            if instance_keys is not None:
                self._instances.appendleft((study_key, instance_keys))
            else:
                self._studies.setdefault(study_key, time.monotonic())
