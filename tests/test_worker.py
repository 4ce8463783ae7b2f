"""The worker: the study processor, the Celery task's retries and dead letters, and real
``coronet worker`` processes (kill -9 mid-task, destination down and back) on loopback.

The processor and Celery-glue tests replace the model with :class:`StandInModel` (real SR and
SC objects for a fixed prediction) so they test queueing and delivery, not the network; the
worker-process tests run the real engine with the bundle's demo weights.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid

import monai_bundle
from dicom_node.cli import build_parser, main
from dicom_node.cli.worker_cmd import check_bundle, worker_options
from dicom_node.core.backoff import backoff_delay
from dicom_node.core.errors import ConfigError, InferenceError
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Settings, settings_from_data
from dicom_node.core.spool import Spool, StoredInstance
from dicom_node.scp.queueing import TASK_NAME, CeleryQueue
from tests.support.dicom_data import RG1_UNCR, make_instance
from tests.support.memory import peak_rss
from tests.support.polling import wait_until
from tests.support.ports import free_port
from tests.support.processes import ChildProcess
from tests.support.redis_server import RedisServer
from tests.support.results import StandInModel, phantom_source
from tests.support.scp import RecordingSCP
from worker.batching import Batcher
from worker.celery_app import make_app, runtime_of
from worker.locks import AttemptCounter, InstanceLocks
from worker.options import WorkerOptions
from worker.results.outcome import Unassessable
from worker.runtime import resolve_device

BUNDLE = Path(monai_bundle.__file__).resolve().parent


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("setting", "index", "gpus", "expected"),
    [
        ("cpu", 3, 4, "cpu"),
        ("cuda:1", 0, 4, "cuda:1"),
        ("auto", 0, 0, "cpu"),
        ("auto", 2, 0, "cpu"),
        ("auto", 0, 2, "cuda:0"),
        ("auto", 1, 2, "cuda:1"),
        ("auto", 2, 2, "cuda:0"),
        ("auto", 5, 4, "cuda:1"),
    ],
)
def test_device_per_pool_process(setting: str, index: int, gpus: int, expected: str) -> None:
    assert resolve_device(setting, index, gpus) == expected


@pytest.mark.parametrize(
    ("retries", "base", "maximum", "low", "high"),
    [(0, 2.0, 300.0, 1.0, 2.0), (3, 2.0, 300.0, 8.0, 16.0), (20, 2.0, 300.0, 150.0, 300.0)],
)
def test_backoff_is_exponential_with_jitter(
    retries: int, base: float, maximum: float, low: float, high: float
) -> None:
    rng = random.Random(retries)
    delays = [backoff_delay(retries, base, maximum, jitter=True, rng=rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert len(set(delays)) > 1  # jitter


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time_limit": 100.0, "visibility_timeout": 50.0}, "visibility timeout must exceed"),
        ({"soft_time_limit": 900.0, "time_limit": 900.0}, "soft time limit"),
        ({"retry_backoff_max": 4000.0}, "longest retry countdown"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_retries": -1}, "must not be negative"),
        ({"max_read_attempts": 0}, "max read attempts must be at least 1"),
    ],
)
def test_worker_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WorkerOptions(**options)


@pytest.mark.parametrize(
    ("argv", "device", "gpus", "concurrency", "visibility"),
    [
        ([], "cpu", 0, 1, 3600.0),
        (["--concurrency", "2", "--time-limit", "2000"], "cpu", 0, 2, 4000.0),
        (["--visibility-timeout", "30", "--time-limit", "20", "--retry-backoff-max", "5"], "cpu",
         0, 1, 30.0),
        ([], "auto", 0, 1, 3600.0),  # no GPU: one CPU process
        ([], "auto", 2, 2, 3600.0),  # one process per GPU
        ([], "cpu", 2, 1, 3600.0),  # GPUs are ignored when the CPU is asked for
    ],
)  # fmt: skip
def test_worker_command_options(
    argv: list[str], device: str, gpus: int, concurrency: int, visibility: float
) -> None:
    args = build_parser().parse_args(["worker", *argv])
    options = worker_options(args, device, gpus)
    assert options.concurrency == concurrency
    assert options.visibility_timeout == visibility
    assert options.soft_time_limit < options.time_limit < options.visibility_timeout


def test_batch_runs_its_tasks_in_the_threads_of_one_process() -> None:
    args = build_parser().parse_args(["worker", "--batch", "4", "--batch-wait", "0.2"])
    options = worker_options(args, "auto", 2)
    assert (options.pool, options.concurrency, options.batch) == ("threads", 4, 4)
    assert options.batch_wait == 0.2 and options.gpu_count == 1  # one process: one GPU
    for extra in (["--pool", "solo"], ["--concurrency", "2"]):
        args = build_parser().parse_args(["worker", "--batch", "2", *extra])
        with pytest.raises(ConfigError, match="one batching worker per GPU"):
            worker_options(args, "cpu", 0)
    for wait in ("-1", "nan"):
        with pytest.raises(SystemExit):  # argparse: a usage error
            build_parser().parse_args(["worker", "--batch", "2", "--batch-wait", wait])
    with pytest.raises(ConfigError, match="threads pool runs batches"):
        WorkerOptions(pool="threads")
    with pytest.raises(ConfigError, match="one task per image"):
        WorkerOptions(pool="threads", batch=4, concurrency=2)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([], "not a CoroNet bundle"),
        (["configs/inference.json", "configs/metadata.json"], "no weights"),
        (["configs/inference.json", "configs/metadata.json", "models/model.pt"], None),
    ],
)
def test_worker_refuses_to_start_without_a_bundle(
    tmp_path: Path, files: list[str], message: str | None
) -> None:
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    if message is None:
        check_bundle(tmp_path)
        return
    with pytest.raises(ConfigError, match=message):
        check_bundle(tmp_path)


# --------------------------------------------------------------------------- processor + task


def _settings(tmp_path: Path, broker_url: str, **sections: Any) -> Settings:
    data: dict[str, Any] = {
        "node": {"ae_title": "CORONET", "port": free_port()},
        "storage": {"spool_dir": str(tmp_path / "spool"), "outbox_dir": str(tmp_path / "out")},
        "broker": {"url": broker_url, "queue": f"q{random.randrange(10**6)}"},
        "model": {"bundle_dir": str(BUNDLE), "device": "cpu"},
        **sections,
    }
    return settings_from_data(data)


def _spool_study(settings: Settings, tmp_path: Path, count: int = 1) -> list[StoredInstance]:
    spool = Spool(settings.storage.spool_dir)
    study_uid = generate_uid()
    stored = []
    for index in range(count):
        path = tmp_path / "in" / f"{index}.dcm"
        ds = phantom_source(path, study_uid=study_uid, seed=index)
        stored.append(spool.store(path, str(ds.SOPInstanceUID), study_uid))
    return stored


@pytest.fixture(name="scp")
def scp_fixture() -> Iterator[RecordingSCP]:
    scp = RecordingSCP().start()
    yield scp
    scp.stop()


def _app(settings: Settings, model: StandInModel, **options: Any) -> Celery:
    return make_app(settings, WorkerOptions(**options), analyse=model)


def _run(app: Celery, *args: Any, task_id: str | None = None) -> None:
    """Run the task in this process; an eager retry runs again at once (no countdown)."""
    result = app.tasks[TASK_NAME].apply(
        args=list(args), task_id=task_id or generate_uid(), throw=False
    )
    result.get()  # re-raises what the task raised


pytestmark = pytest.mark.integration


def test_study_is_analysed_stored_delivered_and_done(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    stored = _spool_study(settings, tmp_path, count=2)
    study_key = stored[0].study_key
    model = StandInModel()
    app = _app(settings, model)
    with caplog.at_level(logging.INFO, logger="worker"):
        _run(app, study_key)
    assert model.calls == 2
    assert sorted(r.sop_class_uid for r in scp.stored()) == sorted(
        [Comprehensive3DSRStorage, SecondaryCaptureImageStorage] * 2
    )
    spool = Spool(settings.storage.spool_dir)
    assert spool.pending_instances(study_key) == []
    outbox = Outbox(settings.storage.outbox_dir)
    assert {outbox.state(r.key, "pacs") for r in outbox.results()} == {"delivered"}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study ")]
    assert len(lines) == 1 and study_key in lines[0] and "delivered" in lines[0]
    sources = [pydicom.dcmread(s.path) for s in stored]
    for ds in sources:  # no PHI and no UID in clear at INFO
        for value in (ds.StudyInstanceUID, ds.SOPInstanceUID, ds.PatientID, str(ds.PatientName)):
            assert str(value) not in caplog.text
    # A repeated task (recovery, duplicate) is a no-op: no analysis, nothing sent again.
    _run(app, study_key)
    assert model.calls == 2 and len(scp.stored()) == 4


def test_only_the_given_instances_are_processed(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP
) -> None:
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    first, second = _spool_study(settings, tmp_path, count=2)
    model = StandInModel()
    _run(_app(settings, model), first.study_key, [second.instance_key])
    assert model.calls == 1
    assert Spool(settings.storage.spool_dir).pending_instances(first.study_key) == [
        first.instance_key
    ]


@pytest.mark.parametrize(
    ("crash_after", "analysed", "sent"),
    [
        ("outbox written", 0, 2),  # analysed before, not delivered: deliver, do not analyse
        ("delivered", 0, 0),  # delivered before, spool not marked: nothing sent again
    ],
)
def test_a_rerun_after_a_crash_resumes_where_it_stopped(
    tmp_path: Path,
    redis: RedisServer,
    scp: RecordingSCP,
    crash_after: str,
    analysed: int,
    sent: int,
) -> None:
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    (stored,) = _spool_study(settings, tmp_path)
    outbox = Outbox(settings.storage.outbox_dir)
    source = pydicom.dcmread(stored.path)
    record = outbox.put(
        stored.study_key,
        stored.instance_key,
        StandInModel()(source).datasets,
        outcome="prediction",
    )
    if crash_after == "delivered":
        for key in record.results:
            outbox.mark_delivered(key, "pacs", 0)
    model = StandInModel()
    _run(_app(settings, model), stored.study_key)
    assert model.calls == analysed
    assert len(scp.stored()) == sent
    assert Spool(settings.storage.spool_dir).pending_instances(stored.study_key) == []


@pytest.mark.parametrize(
    ("on_unassessable", "kinds"), [("report", [Comprehensive3DSRStorage]), ("skip", [])]
)
def test_unassessable_images(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, on_unassessable: str, kinds: list[str]
) -> None:
    settings = _settings(
        tmp_path,
        redis.url,
        destinations=[scp.destination()],
        results={"on_unassessable": on_unassessable},
    )
    (stored,) = _spool_study(settings, tmp_path)
    outcome = Unassessable(("not a frontal chest radiograph",))
    _run(_app(settings, StandInModel(outcome=outcome, settings=settings.results)), stored.study_key)
    assert [r.sop_class_uid for r in scp.stored()] == kinds
    assert Spool(settings.storage.spool_dir).pending_instances(stored.study_key) == []


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (InferenceError("the network failed: out of memory"), "out of memory"),
        (SoftTimeLimitExceeded(), "longer than its time limit"),
    ],
)
def test_analysis_failure_is_dead_lettered_not_retried(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, error: Exception, reason: str
) -> None:
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    (stored,) = _spool_study(settings, tmp_path)
    model = StandInModel(fail_with=error)
    _run(_app(settings, model), stored.study_key)
    assert model.calls == 1 and scp.stored() == []
    assert Spool(settings.storage.spool_dir).pending_instances(stored.study_key) == []
    dead = Outbox(settings.storage.outbox_dir).dead_sources()
    assert [d.key for d in dead] == [f"{stored.study_key}/{stored.instance_key}"]
    assert reason in dead[0].reason


def _batching_app(settings: Settings, analyse: Any, soft_time_limit: float = 60.0) -> Celery:
    options = WorkerOptions(
        pool="threads", concurrency=2, batch=2, soft_time_limit=soft_time_limit,
        time_limit=120.0, visibility_timeout=400.0,
    )  # fmt: skip
    return make_app(settings, options, analyse=analyse)


def test_a_batching_task_analyses_through_the_batcher(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP
) -> None:
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    (stored,) = _spool_study(settings, tmp_path)
    model = StandInModel(settings=settings.results)
    app = _batching_app(settings, model)
    runtime = runtime_of(app)
    try:
        _run(app, stored.study_key)
        batcher = runtime.analyse(model)
        assert isinstance(batcher, Batcher) and (batcher.batches, batcher.images) == (1, 1)
    finally:
        runtime.stop()
    assert model.calls == 1 and len(scp.stored()) == 2
    assert Spool(settings.storage.spool_dir).pending_instances(stored.study_key) == []


def test_a_batching_task_that_waits_past_its_time_limit_is_dead_lettered(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP
) -> None:
    """Celery enforces no time limit in the threads pool: the task's wait for its batch is
    bounded by the soft limit, and the study is then dead-lettered as for a soft limit."""
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    (stored,) = _spool_study(settings, tmp_path)
    model = StandInModel(settings=settings.results)
    release = threading.Event()

    def stuck(dataset: Any, path: Path) -> Any:
        release.wait(30)
        return model(dataset, path)

    app = _batching_app(settings, stuck, soft_time_limit=0.5)
    try:
        _run(app, stored.study_key)
    finally:
        release.set()
        runtime_of(app).stop()
    assert scp.stored() == []
    dead = Outbox(settings.storage.outbox_dir).dead_sources()
    assert [d.key for d in dead] == [f"{stored.study_key}/{stored.instance_key}"]
    assert "longer than its time limit (0.5 s)" in dead[0].reason


def test_unavailable_destination_is_retried_then_dead_lettered(
    tmp_path: Path, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    down = RecordingSCP()  # never started: connection refused
    settings = _settings(tmp_path, redis.url, destinations=[down.destination()])
    (stored,) = _spool_study(settings, tmp_path)
    model = StandInModel()
    app = _app(settings, model, max_retries=3, retry_backoff=0.01, retry_backoff_max=0.02)
    with caplog.at_level(logging.WARNING, logger="worker.celery_app"):
        _run(app, stored.study_key)
    retries = [r.getMessage() for r in caplog.records if ": retry " in r.getMessage()]
    assert [m.split(": retry ")[1][:6] for m in retries] == ["1 of 3", "2 of 3", "3 of 3"]
    assert model.calls == 1  # analysed once; the retries only deliver
    outbox = Outbox(settings.storage.outbox_dir)
    letters = outbox.dead_letters("pacs")
    assert len(letters) == 2
    assert all("after the last retry" in d.reason for d in letters)
    assert Spool(settings.storage.spool_dir).pending_instances(stored.study_key) == []


def test_a_message_redelivered_too_often_is_dead_lettered(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP
) -> None:
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    (stored,) = _spool_study(settings, tmp_path)
    model = StandInModel()
    app = _app(settings, model, max_redeliveries=2)
    counter = AttemptCounter(redis.client())
    for _ in range(3):  # three starts that never finished (the worker was lost each time)
        counter.count("poison", 0)
    _run(app, stored.study_key, task_id="poison")
    assert model.calls == 0 and scp.stored() == []
    dead = Outbox(settings.storage.outbox_dir).dead_sources()
    assert len(dead) == 1 and "started 4 times" in dead[0].reason
    assert Spool(settings.storage.spool_dir).pending_instances(stored.study_key) == []


@pytest.mark.parametrize(("holder", "busy"), [("other-task", True), ("this-task", False)])
def test_instance_locks(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, holder: str, busy: bool
) -> None:
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    (stored,) = _spool_study(settings, tmp_path)
    locks = InstanceLocks(redis.client(), ttl_s=60)
    assert locks.acquire(stored.study_key, stored.instance_key, holder)
    model = StandInModel()
    _run(_app(settings, model), stored.study_key, task_id="this-task")
    assert model.calls == (0 if busy else 1)
    pending = Spool(settings.storage.spool_dir).pending_instances(stored.study_key)
    assert pending == ([stored.instance_key] if busy else [])


def test_runtime_is_attached_and_engine_not_loaded_at_build(
    tmp_path: Path, redis: RedisServer
) -> None:
    settings = _settings(tmp_path, redis.url)
    app = make_app(settings)
    runtime = runtime_of(app)
    assert runtime.engine is None
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options["visibility_timeout"] > app.conf.task_time_limit
    assert app.conf.task_default_queue == settings.broker.queue
    assert app.conf.accept_content == ["json"]


def test_the_model_is_loaded_once_per_process(tmp_path: Path, redis: RedisServer) -> None:
    """The solo pool's worker_process_init and a later call do not load it again."""
    _require_weights()
    runtime = runtime_of(make_app(_settings(tmp_path, redis.url)))
    try:
        runtime.start_process(0)
        engine, decoder = runtime.engine, runtime.decoder
        assert engine is not None and decoder is not None and decoder.pid is not None
        runtime.start_process(0)
        assert runtime.engine is engine and runtime.decoder is decoder
    finally:
        if runtime.decoder is not None:
            runtime.decoder.close()


# --------------------------------------------------------------------------- real workers


def _worker_process(config: Path, *options: str) -> ChildProcess:
    """``coronet worker`` in its own process group."""
    return ChildProcess.coronet(["worker", "--config", str(config), *options])


def _wait_ready(worker: ChildProcess) -> None:
    worker.wait_for(lambda out: "loaded on" in out, "the worker to load the model")


def _worker_config(tmp_path: Path, settings: Settings) -> Path:
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    return path


def _require_weights() -> None:
    if not (BUNDLE / "models" / "model.pt").is_file():
        pytest.fail("the bundle's demo weights (monai_bundle/models/model.pt) are missing")


#: No heatmap: these tests are about the queue and delivery; tests/test_e2e.py makes heatmaps.
WORKER = ("--concurrency", "1", "--threads", "1", "--heatmap", "off", "--max-retries", "50")
#: Short retries; a short visibility timeout, so a lost message comes back within seconds.
FAST_RETRIES = ("--retry-backoff", "0.5", "--retry-backoff-max", "2")
SHORT_VISIBILITY = ("--time-limit", "12", "--visibility-timeout", "13")


def _spool_rg1(settings: Settings, tmp_path: Path) -> StoredInstance:
    """The real chest CR (1955 x 1841): its analysis takes long enough to be interrupted."""
    path = tmp_path / "in" / "rg1.dcm"
    ds = make_instance(RG1_UNCR, path)
    spool = Spool(settings.storage.spool_dir)
    return spool.store(path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID))


def test_kill_9_mid_task_delivers_exactly_one_sr(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP
) -> None:
    """acks_late + a short visibility timeout: the study comes back after the worker died."""
    _require_weights()
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    config = _worker_config(tmp_path, settings)
    options = (*WORKER, *FAST_RETRIES, *SHORT_VISIBILITY)
    stored = _spool_rg1(settings, tmp_path)
    client = redis.client()
    lock = f"coronet:lock:{stored.study_key}:{stored.instance_key}"
    first = _worker_process(config, *options)
    try:
        _wait_ready(first)
        CeleryQueue.from_settings(settings.broker).enqueue_study(stored.study_key)
        wait_until(lambda: client.exists(lock), 60, "the task to start")
        first.kill_group()  # kill -9 the worker and its pool processes
    finally:
        first.stop()
    assert scp.stored() == []
    second = _worker_process(config, *options)
    try:
        wait_until(lambda: len(scp.stored()) >= 1, 120, "the redelivered task's SR")
        wait_until(
            lambda: not Spool(settings.storage.spool_dir).pending_instances(stored.study_key),
            30,
            "the spool instance to be done",
        )
    finally:
        second.stop()
    assert len(scp.stored(Comprehensive3DSRStorage)) == 1, second.text()
    assert len(scp.stored()) == 1  # no heatmap here: the SR only
    starts = [int(client.get(k) or 0) for k in client.scan_iter("coronet:attempts:*")]
    assert starts == [2]  # the same message, started twice
    assert "redelivered" in second.text()


def test_results_wait_in_the_outbox_while_the_destination_is_down(
    tmp_path: Path, redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    _require_weights()
    scp = RecordingSCP()  # not started yet: the destination is down
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    config = _worker_config(tmp_path, settings)
    options = (*WORKER, *FAST_RETRIES)
    (stored,) = _spool_study(settings, tmp_path)
    outbox = Outbox(settings.storage.outbox_dir)
    worker = _worker_process(config, *options)
    try:
        _wait_ready(worker)
        CeleryQueue.from_settings(settings.broker).enqueue_study(stored.study_key)
        wait_until(lambda: "will retry" in worker.text(), 120, "a failed delivery")
        assert [outbox.state(r.key, "pacs") for r in outbox.results()] == ["pending"]
        assert Spool(settings.storage.spool_dir).pending_instances(stored.study_key)
        assert main(["outbox", "list", "--config", str(config)]) == 0
        assert "pacs: 0 delivered, 1 pending, 0 dead-lettered" in capsys.readouterr().out
        scp.start()  # the destination comes back
        wait_until(lambda: scp.stored(), 60, "delivery after the destination returned")
        wait_until(
            lambda: not Spool(settings.storage.spool_dir).pending_instances(stored.study_key),
            30,
            "the spool instance to be done",
        )
    finally:
        worker.stop()
        scp.stop()
    assert {outbox.state(r.key, "pacs") for r in outbox.results()} == {"delivered"}
    assert [r.sop_class_uid for r in scp.stored()] == [Comprehensive3DSRStorage]
    assert "delivered" in worker.text().split("will retry")[-1]


#: The batching worker's peak resident memory: its one process holds the model (the prefork
#: worker's pool process peaks at about 735 MiB in tests/hostile/test_worker_survives.py) and
#: the images of a batch of three 256 px phantoms.
BATCHING_WORKER_PEAK = 1280 << 20  # measured: 993 MiB


def test_a_batching_worker_analyses_the_images_of_several_tasks_together(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP
) -> None:
    """``coronet worker --batch 3``: three tasks run at once in Celery's threads pool and their
    images share one forward pass and one heatmap optimisation; every image gets its SR and SC."""
    _require_weights()
    settings = _settings(tmp_path, redis.url, destinations=[scp.destination()])
    config = _worker_config(tmp_path, settings)
    sizes = [1, 1, 1, 2]
    studies = [_spool_study(settings, tmp_path / str(i), n) for i, n in enumerate(sizes)]
    queue = CeleryQueue.from_settings(settings.broker)
    for stored in studies:  # queued before the worker starts: it reserves three at once
        queue.enqueue_study(stored[0].study_key)
    options = ("--batch", "3", "--batch-wait", "5", "--threads", "1", *FAST_RETRIES)
    worker = _worker_process(config, *options)
    try:
        wait_until(lambda: len(scp.stored()) >= 10, 180, "an SR and an SC for each of 5 images")
        spool = Spool(settings.storage.spool_dir)
        wait_until(
            lambda: not any(spool.pending_instances(s[0].study_key) for s in studies),
            30,
            "every instance to be done",
        )
        peak = peak_rss(worker.pid)  # the model, three tasks, and the images of a batch
    finally:
        worker.stop()
    text = worker.text()
    assert peak < BATCHING_WORKER_PEAK, f"peak RSS {peak >> 20} MiB"
    assert "batches of up to 3 images from 3 tasks in threads" in text
    assert text.count("loaded on") == 1, text  # once, at start, before the first task
    assert "model not loaded at process start" not in text
    if os.geteuid() == 0:  # as in CI: one line of ours instead of Celery's six-line warning
        assert text.count("the worker runs as root") == 1 and "superuser privileges" not in text
    assert len(scp.stored(Comprehensive3DSRStorage)) == 5, text
    assert len(scp.stored(SecondaryCaptureImageStorage)) == 5, text
    shared = [int(n) for n in re.findall(r"batch of \d+ images from (\d+) tasks", text)]
    assert shared and max(shared) >= 2, text  # tasks shared a batch
    assert "Traceback" not in text
