"""One bad instance never blocks its study: every failure is classified per instance.

Each study below holds a valid phantom chest CR and one bad instance.  The valid one is always
analysed and delivered; the bad one gets an SR "Not Evaluated" with the reason, or a dead
letter with the reason, and nothing stays pending.  The first tests run the real model and the
real decoder process; the tests of the Celery task (missing and unreadable spool files, a
poison instance) replace the model with :class:`StandInModel`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from celery import Celery
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid

import monai_bundle
from dicom_node.cli import main
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Settings
from dicom_node.core.spool import Spool, StoredInstance, key_for
from dicom_node.core.task import TASK_NAME
from tests.support.dicom_tools import dciodvfy
from tests.support.hostile import (
    excess_pixel_data,
    j2k_siz_bomb,
    truncated_pixel_data,
    with_raw_value,
    without,
)
from tests.support.redis_server import RedisServer
from tests.support.results import StandInModel, phantom_source
from tests.support.scp import RecordingSCP
from tests.support.settings import node_settings
from worker.celery_app import make_app
from worker.decoder import DecodeLimits, Decoder, UnreadableFile
from worker.delivery import Sender
from worker.engine import Engine, load_engine
from worker.locks import InstanceCounters, InstanceLocks
from worker.options import WorkerOptions
from worker.pipeline import InstanceResult, process_many
from worker.processor import (
    Analyse,
    AnalyseMany,
    AnalysisResult,
    IsolationPolicy,
    StudyProcessor,
    StudyReport,
    one_by_one,
)
from worker.results.sr import SRSummary, read_sr
from worker.sources import SpoolSource

pytestmark = [
    pytest.mark.integration,
    # Some instances here carry invalid values on purpose; reading them back warns.
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
]

BUNDLE = Path(monai_bundle.__file__).resolve().parent


@pytest.fixture(scope="module", name="engine")
def engine_fixture() -> Engine:
    torch.set_num_threads(1)
    return load_engine(BUNDLE, "cpu")


@pytest.fixture(scope="module", name="decoder")
def decoder_fixture(engine: Engine) -> Iterator[Decoder]:
    with Decoder(DecodeLimits(fallback_window=engine.fallback_window)) as decoder:
        yield decoder


@pytest.fixture(name="scp")
def scp_fixture() -> Iterator[RecordingSCP]:
    scp = RecordingSCP().start()
    yield scp
    scp.stop()


@pytest.fixture(name="settings")
def settings_fixture(tmp_path: Path, redis: RedisServer, scp: RecordingSCP) -> Settings:
    return node_settings(
        tmp_path,
        redis.url,
        destinations=[scp.destination()],
        model={"bundle_dir": str(BUNDLE), "device": "cpu"},
    )


def _processor(
    settings: Settings, redis: RedisServer, analyse: Analyse | _Batched
) -> StudyProcessor:
    """A study processor; a one-image ``analyse`` is called image by image, a batched one
    gets the study's images in batches of :data:`BATCH`."""
    many: AnalyseMany = analyse if isinstance(analyse, _Batched) else one_by_one(analyse)
    return _batching_processor(settings, redis, many, BATCH)


def _batching_processor(
    settings: Settings, redis: RedisServer, analyse: AnalyseMany, batch_size: int
) -> StudyProcessor:
    client = redis.client()
    return StudyProcessor(
        settings,
        SpoolSource(Spool(settings.storage.spool_dir)),
        Outbox(settings.storage.outbox_dir),
        analyse,
        InstanceLocks(client, 60),
        Sender.from_settings(settings),
        InstanceCounters(client),
        IsolationPolicy(batch_size=batch_size),
    )


#: The real model analyses a study's valid and bad images in one batch.
BATCH = 2


@dataclass(frozen=True)
class _Batched:
    """The real pipeline in batches, without heatmaps (these tests are about the bad
    instance)."""

    settings: Settings
    engine: Engine
    decoder: Decoder

    def __call__(
        self, sources: Sequence[tuple[Dataset, Path]], *, alone: bool = False
    ) -> list[InstanceResult | Exception]:
        return process_many(
            sources,
            self.engine,
            self.settings.results,
            self.settings.selection,
            decoder=self.decoder,
            preset=None,
            batch_size=BATCH,
        )


def _model(settings: Settings, engine: Engine, decoder: Decoder) -> _Batched:
    return _Batched(settings, engine, decoder)


def _spool(settings: Settings, path: Path) -> StoredInstance:
    """Store ``path`` and mark it queued, as the node does."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    spool = Spool(settings.storage.spool_dir)
    stored = spool.store(path, str(header.SOPInstanceUID), str(header.StudyInstanceUID), move=True)
    spool.mark_queued(stored.study_key, [stored.instance_key])
    return stored


def _study(
    settings: Settings, tmp_path: Path, make_bad: Callable[..., Path]
) -> tuple[StoredInstance, StoredInstance]:
    """A valid phantom chest CR and the bad instance ``make_bad(target, study_uid=...)``."""
    study_uid = generate_uid()
    valid = tmp_path / "in" / "valid.dcm"
    phantom_source(valid, study_uid=study_uid)
    bad = make_bad(tmp_path / "in" / "bad.dcm", study_uid=study_uid)
    return _spool(settings, valid), _spool(settings, bad)


def _second_phantom(target: Path, *, study_uid: str) -> Path:
    """Another valid instance of the study, for the tests where the file itself goes bad."""
    phantom_source(target, study_uid=study_uid, seed=1)
    return target


def _outcome(settings: Settings, stored: StoredInstance) -> tuple[SRSummary | None, str | None]:
    """The instance's SR as the outbox holds it (read back, dciodvfy-clean), its dead letter."""
    outbox = Outbox(settings.storage.outbox_dir)
    summaries = []
    for result in outbox.results():
        if result.instance_key != stored.instance_key:
            continue
        report = dciodvfy(result.path)
        assert not report.errors, report
        if result.kind == "sr":
            summaries.append(read_sr(pydicom.dcmread(result.path)))
    letters = [
        d.reason
        for d in outbox.dead_sources()
        if d.key == f"{stored.study_key}/{stored.instance_key}"
    ]
    assert len(summaries) <= 1 and len(letters) <= 1
    return (summaries[0] if summaries else None), (letters[0] if letters else None)


def _check_study_went_on(
    settings: Settings, valid: StoredInstance, scp: RecordingSCP, report: StudyReport | None
) -> None:
    summary, letter = _outcome(settings, valid)
    assert summary is not None and summary.predicted is not None and letter is None
    assert summary.sop_instance_uid in {r.sop_instance_uid for r in scp.stored()}
    spool = Spool(settings.storage.spool_dir)
    assert spool.pending_instances(valid.study_key) == []
    assert valid.study_key not in spool.pending_studies()  # recovery will not queue it again
    assert report is None or not report.waiting


# --------------------------------------------------------------------------- not evaluated


NOT_EVALUATED: list[tuple[str, Callable[..., Path], str]] = [
    (
        "J2K SIZ bomb 25000",
        j2k_siz_bomb,
        "the JPEG 2000 codestream is 25000x25000 but Rows and Columns say 1024x1024",
    ),
    (
        "J2K SIZ bomb 40000",
        lambda target, **kw: j2k_siz_bomb(target, side=40_000, **kw),
        "the JPEG 2000 codestream is 40000x40000",
    ),
    (
        "800 MB of excess pixel data",
        excess_pixel_data,
        "excess pixel data: 838860800 bytes where the header describes one frame of 7198310",
    ),
    (
        "pixel data truncated at 7.0 of 7.2 MB",
        truncated_pixel_data,
        "truncated pixel data: 7000000 of the 7198310 bytes the header describes",
    ),
    (
        "Number of Frames that is no number",
        lambda target, **kw: with_raw_value(target, "NumberOfFrames", b"x1", **kw),
        "invalid literal for int() with base 10: 'x1'",
    ),
]


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [case[1:] for case in NOT_EVALUATED],
    ids=[case[0] for case in NOT_EVALUATED],
)
def test_a_bad_image_is_reported_not_evaluated_with_the_reason_and_its_study_delivered(
    tmp_path: Path,
    redis: RedisServer,
    scp: RecordingSCP,
    settings: Settings,
    engine: Engine,
    decoder: Decoder,
    make_bad: Callable[..., Path],
    reason: str,
) -> None:
    valid, bad = _study(settings, tmp_path, make_bad)
    restarts = decoder.restarts
    report = _processor(settings, redis, _model(settings, engine, decoder)).run(
        valid.study_key, None, "task"
    )
    summary, letter = _outcome(settings, bad)
    assert letter is None
    assert summary is not None and summary.predicted is None
    assert any(reason in r for r in summary.unassessable_reasons), summary.unassessable_reasons
    assert summary.sop_instance_uid in {r.sop_instance_uid for r in scp.stored()}
    assert (report.predictions, report.unassessable, report.failed) == (1, 1, 0)
    assert decoder.restarts == restarts  # refused by the checks: nothing was decoded
    _check_study_went_on(settings, valid, scp, report)


# --------------------------------------------------------------------------- dead letters


DEAD_LETTERS: list[tuple[str, Callable[..., Path], str]] = [
    (
        "multi-valued Patient's Name (TypeError in highdicom)",
        lambda target, **kw: with_raw_value(target, "PatientName", b"A^B\\C^D", **kw),
        "cannot build the SR: Invalid type for a person name",
    ),
    (
        "no Series Instance UID",
        lambda target, **kw: without(target, "SeriesInstanceUID", **kw),
        "source image lacks required attributes: SeriesInstanceUID",
    ),
    (
        "an invalid SOP Instance UID",
        lambda target, **kw: with_raw_value(target, "SOPInstanceUID", b"1.2.abc.4", **kw),
        "source UID is not a valid DICOM UID",
    ),
]


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [case[1:] for case in DEAD_LETTERS],
    ids=[case[0] for case in DEAD_LETTERS],
)
def test_an_instance_no_result_can_be_built_for_is_dead_lettered_alone(
    tmp_path: Path,
    redis: RedisServer,
    scp: RecordingSCP,
    settings: Settings,
    engine: Engine,
    decoder: Decoder,
    make_bad: Callable[..., Path],
    reason: str,
) -> None:
    valid, bad = _study(settings, tmp_path, make_bad)
    report = _processor(settings, redis, _model(settings, engine, decoder)).run(
        valid.study_key, None, "task"
    )
    summary, letter = _outcome(settings, bad)
    assert summary is None
    assert letter is not None and reason in letter
    assert (report.predictions, report.failed) == (1, 1)
    assert len(scp.stored()) == 1  # the valid instance's SR only
    _check_study_went_on(settings, valid, scp, report)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("invalid literal for int() with base 10: 'x'"),
        TypeError("Invalid type for a person name."),
        RuntimeError("a bug"),
    ],
)
def test_an_error_escaping_the_analysis_of_one_instance_dead_letters_only_that_one(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, settings: Settings, error: Exception
) -> None:
    valid, bad = _study(settings, tmp_path, _second_phantom)
    model = StandInModel(settings=settings.results)

    def analyse(dataset: Dataset, path: Path) -> AnalysisResult:
        if key_for(str(dataset.SOPInstanceUID)) == bad.instance_key:
            raise error
        return model(dataset, path)

    report = _processor(settings, redis, analyse).run(valid.study_key, None, "task")
    _, letter = _outcome(settings, bad)
    assert letter == f"cannot analyse: {type(error).__name__}: {error}"
    assert (report.analysed, report.failed) == (1, 1)
    assert {r.sop_class_uid for r in scp.stored()} == {
        Comprehensive3DSRStorage,
        SecondaryCaptureImageStorage,
    }
    assert Spool(settings.storage.spool_dir).pending_instances(valid.study_key) == []


# --------------------------------------------------------------------------- the Celery task


def _run(app: Celery, *args: Any, task_id: str | None = None) -> None:
    """Run the task in this process; an eager retry runs again at once (no countdown)."""
    result = app.tasks[TASK_NAME].apply(
        args=list(args), task_id=task_id or generate_uid(), throw=False
    )
    result.get()


def _app(settings: Settings, model: StandInModel) -> Celery:
    options = WorkerOptions(retry_backoff=0.01, retry_backoff_max=0.02, max_read_attempts=3)
    return make_app(settings, options, analyse=model)


def test_a_task_for_an_instance_missing_from_the_spool_is_retried_then_dead_lettered(
    tmp_path: Path,
    redis: RedisServer,
    scp: RecordingSCP,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    valid, gone = _study(settings, tmp_path, _second_phantom)
    gone.path.unlink()  # e.g. deleted by hand, or a spool on storage that lost it
    model = StandInModel(settings=settings.results)
    with caplog.at_level(logging.WARNING):
        _run(_app(settings, model), valid.study_key, [valid.instance_key, gone.instance_key])
    retries = [r.getMessage() for r in caplog.records if ": retry " in r.getMessage()]
    assert len(retries) == 2 and all(gone.instance_key in m for m in retries)
    assert model.calls == 1  # the valid instance, once; retries do not analyse it again
    _, letter = _outcome(settings, gone)
    assert letter is not None
    assert letter.startswith("cannot read the spooled instance after 3 attempts: ")
    assert f"no instance {gone.study_key}/{gone.instance_key} in the spool" in letter
    assert Spool(settings.storage.spool_dir).pending_studies() == []
    config = tmp_path / "config.yaml"
    config.write_text(settings.model_dump_json(), encoding="utf-8")
    assert main(["outbox", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert f"{gone.study_key}/{gone.instance_key}" in listing and letter in listing


def test_a_task_for_a_study_missing_from_the_spool_never_counts_as_success(
    redis: RedisServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    study_key = key_for(generate_uid())  # the node's spool has it; this worker's does not
    model = StandInModel(settings=settings.results)
    with caplog.at_level(logging.INFO):
        _run(_app(settings, model), study_key)
    assert model.calls == 0
    (letter,) = Outbox(settings.storage.outbox_dir).dead_sources()
    assert letter.key == f"{study_key}/*"
    assert letter.reason.startswith("the study is not in the spool after 3 attempts")
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (attempt ")[1] for m in messages if " (attempt " in m] == [
        "1 of 3; will retry)",
        "2 of 3; will retry)",
    ]
    assert not any("no-op" in m for m in messages)


def test_an_unreadable_spooled_file_is_retried_then_dead_lettered(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, settings: Settings
) -> None:
    valid, broken = _study(settings, tmp_path, _second_phantom)
    broken.path.write_bytes(b"not a DICOM file any more")
    model = StandInModel(settings=settings.results)
    _run(_app(settings, model), valid.study_key)
    _, letter = _outcome(settings, broken)
    assert letter is not None and "cannot read the spooled instance after 3 attempts" in letter
    assert model.calls == 1 and len(scp.stored()) == 2  # the valid SC and SR
    assert Spool(settings.storage.spool_dir).pending_studies() == []


def test_a_spooled_file_that_comes_back_before_the_last_attempt_is_analysed(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, settings: Settings
) -> None:
    valid, late = _study(settings, tmp_path, _second_phantom)
    kept = late.path.read_bytes()
    late.path.unlink()
    model = StandInModel(settings=settings.results)
    processor = _processor(settings, redis, model)
    first = processor.run(valid.study_key, None, "task")
    assert first.waiting and list(first.unreadable) == [late.instance_key]
    assert Spool(settings.storage.spool_dir).lost_instances(late.study_key) == [
        late.instance_key
    ]  # not done: it stays to be tried again
    late.path.write_bytes(kept)  # shared storage caught up
    second = processor.run(valid.study_key, None, "task")
    assert not second.waiting and second.analysed == 1
    summary, letter = _outcome(settings, late)
    assert summary is not None and letter is None
    assert Spool(settings.storage.spool_dir).pending_studies() == []


def test_a_file_that_cannot_be_read_while_analysed_is_tried_again_not_reported(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, settings: Settings
) -> None:
    valid, flaky = _study(settings, tmp_path, _second_phantom)
    model = StandInModel(settings=settings.results)
    failures = [UnreadableFile(errno.EIO, "the decoder cannot read the file: I/O error")]

    def analyse(dataset: Dataset, path: Path) -> AnalysisResult:
        if key_for(str(dataset.SOPInstanceUID)) == flaky.instance_key and failures:
            raise failures.pop()
        return model(dataset, path)

    processor = _processor(settings, redis, analyse)
    first = processor.run(valid.study_key, None, "task")
    assert first.waiting and first.failed == 0
    assert "OSError" not in first.unreadable[flaky.instance_key]
    assert "I/O error" in first.unreadable[flaky.instance_key]
    second = processor.run(valid.study_key, None, "task")
    assert not second.waiting and second.analysed == 1
    summary, letter = _outcome(settings, flaky)
    assert summary is not None and letter is None


def test_an_instance_whose_analysis_keeps_killing_the_worker_is_dead_lettered_alone(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, settings: Settings
) -> None:
    valid, poison = _study(settings, tmp_path, _second_phantom)
    counters = InstanceCounters(redis.client())
    for _ in range(3):  # three starts whose worker process was killed mid-analysis
        counters.starts.increment(poison.study_key, poison.instance_key)
    model = StandInModel(settings=settings.results)
    _run(_app(settings, model), valid.study_key)
    assert model.calls == 1  # the valid one; the poison instance is not started again
    _, letter = _outcome(settings, poison)
    assert letter == (
        "its analysis started 3 times without finishing (the worker process was lost each time)"
    )
    _check_study_went_on(settings, valid, scp, None)


def test_after_a_lost_start_an_instance_is_analysed_alone_never_in_a_batch(
    tmp_path: Path, redis: RedisServer, scp: RecordingSCP, settings: Settings
) -> None:
    """Every image of a batch starts together, so a worker lost in the batch costs each of them
    a start; from its second start, an image goes alone, and cannot take others down again."""
    study_uid = generate_uid()
    stored = []
    for seed in range(3):
        path = tmp_path / "in" / f"{seed}.dcm"
        phantom_source(path, study_uid=study_uid, seed=seed)
        stored.append(_spool(settings, path))
    suspect = stored[1]
    InstanceCounters(redis.client()).starts.increment(suspect.study_key, suspect.instance_key)
    model = StandInModel(settings=settings.results)
    calls: list[tuple[list[str], bool, int]] = []
    analyse_one = one_by_one(model)
    client = redis.client()
    counters = InstanceCounters(client)

    def analyse(
        sources: Sequence[tuple[Dataset, Path]], *, alone: bool = False
    ) -> Sequence[AnalysisResult | Exception]:
        keys = [key_for(str(ds.SOPInstanceUID)) for ds, _ in sources]
        suspect_starts = counters.starts.get(suspect.study_key, suspect.instance_key)
        calls.append((keys, alone, suspect_starts))
        return analyse_one(sources)

    report = _batching_processor(settings, redis, analyse, 3).run(suspect.study_key, None, "task")
    others = sorted(s.instance_key for s in stored if s is not suspect)
    # the batch-mates first, the suspect's start not yet counted again; then the suspect alone
    assert (sorted(calls[0][0]), calls[0][1], calls[0][2]) == (others, False, 1)
    assert calls[1:] == [([suspect.instance_key], True, 2)]
    assert (report.analysed, report.failed) == (3, 0)
    assert len(scp.stored(Comprehensive3DSRStorage)) == 3
    # every start finished and was reset
    assert [counters.starts.get(s.study_key, s.instance_key) for s in stored] == [0, 0, 0]
