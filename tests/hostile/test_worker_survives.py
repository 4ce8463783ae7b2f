"""Hostile images against a real node, Redis and worker, with dcmtk ``storescp`` as the PACS.

The node accepts what it can store; the worker must then report every bad instance (an SR
"Not Evaluated" with the reason, or a dead letter with the reason), deliver the good ones, keep
the memory of all its processes bounded and stay alive.  Memory is read from
``/proc/PID/status`` of the worker, its pool process and their children (the decoder process),
sampled while the worker runs: each process's VmHWM (its peak resident set) stays under a
per-process bound, and their private memory (RssAnon) together with the mapped files counted
once stays under a bound for all of them.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import monai_bundle
from dicom_node.cli import main
from dicom_node.core.outbox import Outbox
from dicom_node.core.spool import Spool, key_for
from dicom_node.core.statuses import SUCCESS
from tests.support.dicom_data import phantom_cr
from tests.support.dicom_tools import dciodvfy
from tests.support.hostile import (
    encoded,
    excess_pixel_data,
    j2k_corrupt,
    j2k_siz_bomb,
    send_as_is,
    truncated_pixel_data,
    with_raw_value,
    without,
)
from tests.support.node import node_process
from tests.support.polling import wait_until
from tests.support.processes import ChildProcess
from tests.support.redis_server import RedisServer
from tests.support.settings import node_data, write_config
from tests.support.storescp import StoreSCP, running_storescp
from worker.results.sr import read_sr

pytestmark = [
    pytest.mark.integration,
    # Some instances here carry invalid values on purpose; reading them back warns.
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
]

BUNDLE = Path(monai_bundle.__file__).resolve().parent
#: The bound on the peak memory of all worker processes together (MemoryWatch.total_mib).
WORKER_MEMORY_LIMIT_MIB = 1536
#: The bound on each worker process's peak resident set (VmHWM).
PROCESS_MEMORY_LIMIT_MIB = 1024
SETTLE_TIMEOUT_S = 300.0
WORKER = ("--concurrency", "1", "--threads", "1", "--heatmap", "fast")


class MemoryWatch:
    """Samples VmHWM of a process and all its descendants until stopped (kB -> MiB)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peaks_mib: dict[int, float] = {}  # VmHWM, the kernel's peak resident set
        self.anon_mib: dict[int, float] = {}  # sampled peak of RssAnon
        self.file_mib: dict[int, float] = {}  # sampled peak of RssFile
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            with contextlib.suppress(OSError, psutil.Error):
                status = Path(f"/proc/{process.pid}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if "VmHWM" not in fields:  # a zombie: its memory is gone
                    continue
                pid = process.pid
                for peaks, name in ((self.peaks_mib, "VmHWM"), (self.anon_mib, "RssAnon"),
                                    (self.file_mib, "RssFile")):  # fmt: skip
                    mib = int(fields[name].split()[0]) / 1024
                    peaks[pid] = max(peaks.get(pid, 0.0), mib)
                self.names.setdefault(
                    pid, f"parent {process.ppid()}: " + " ".join(process.cmdline()[1:4])
                )

    @property
    def total_mib(self) -> float:
        """A bound on the peak of all processes together: each process's peak private memory
        (sampled RssAnon), and the mapped files (torch's libraries, shared by the forked pool
        process) once, at the largest any process mapped."""
        return sum(self.anon_mib.values()) + max(self.file_mib.values(), default=0.0)

    def report(self) -> str:
        lines = [f"{pid}: peak {mib:.0f} MiB, private {self.anon_mib.get(pid, 0):.0f} MiB, "
                 f"files {self.file_mib.get(pid, 0):.0f} MiB ({self.names.get(pid, '?')})"
                 for pid, mib in sorted(self.peaks_mib.items())]  # fmt: skip
        return "\n".join([f"total {self.total_mib:.0f} MiB", *lines])


@dataclass
class Stack:
    tmp: Path
    config: Path
    port: int
    pacs: StoreSCP
    worker: ChildProcess
    memory: MemoryWatch
    pool_pids: set[int] = field(default_factory=set)

    @property
    def spool(self) -> Spool:
        return Spool(self.tmp / "spool")

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.tmp / "out")


@pytest.fixture(scope="module", name="stack")
def stack_fixture(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[Stack]:
    """Redis, storescp as the PACS, ``coronet node serve`` and ``coronet worker``."""
    if not (BUNDLE / "models" / "model.pt").is_file():
        pytest.fail("the bundle's demo weights (monai_bundle/models/model.pt) are missing")
    tmp = tmp_path_factory.mktemp("hostile")
    with running_storescp(tmp / "pacs") as pacs:
        data = node_data(
            tmp,
            redis_server.url,
            destinations=[pacs.destination()],
            model={"bundle_dir": str(BUNDLE), "device": "cpu", "decode_memory_mb": 1024},
            grouping={"mode": "study", "quiet_seconds": 0.5},
        )
        config = write_config(tmp / "node.yaml", data)
        with node_process(config, Path.cwd()):
            worker = ChildProcess.coronet(["worker", "--config", str(config), *WORKER])
            try:
                with MemoryWatch(worker.pid) as memory:
                    worker.wait_for(lambda out: "loaded on" in out, "the model", 240)
                    pool = {p.pid for p in psutil.Process(worker.pid).children()}
                    yield Stack(tmp, config, data["node"]["port"], pacs, worker, memory, pool)
            finally:
                worker.stop(timeout=60)


def _instance_key(path: Path) -> str:
    return key_for(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))


def _settled(stack: Stack, study_uid: str, count: int) -> bool:
    spool, study_key = stack.spool, key_for(study_uid)
    if study_key not in spool.study_keys():
        return False
    records = spool.instances(study_key)
    return len(records) == count and all(r.done for r in records)


@dataclass(frozen=True)
class Report:
    """What became of one source instance."""

    status: int | None  # the node's C-STORE answer
    sr: Dataset | None = None
    sc: Dataset | None = None
    dead_letter: str | None = None


def _reports(stack: Stack, sent: dict[Path, int | None], study_uid: str) -> dict[Path, Report]:
    """Each sent file's fate: the node's answer, its SR and SC at the PACS, its dead letter."""
    received = [ds for _, ds in stack.pacs.received() if ds.StudyInstanceUID == study_uid]
    letters = {d.key: d.reason for d in stack.outbox.dead_sources()}
    reports = {}
    for path, status in sent.items():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        srs = [
            ds
            for ds in received
            if ds.Modality == "SR" and read_sr(ds).source_sop_instance_uid == uid
        ]
        scs = [
            ds
            for ds in received
            if ds.SOPClassUID == SecondaryCaptureImageStorage
            and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
        ]
        assert len(srs) <= 1 and len(scs) <= 1, "a result was delivered twice"
        letter = letters.get(f"{key_for(study_uid)}/{key_for(uid)}")
        sr = srs[0] if srs else None
        sc = scs[0] if scs else None
        reports[path] = Report(status, sr, sc, letter)
    return reports


def _check_worker_survived(stack: Stack) -> None:
    assert stack.worker.alive(), stack.worker.text()
    assert {p.pid for p in psutil.Process(stack.worker.pid).children()} == stack.pool_pids
    output = stack.worker.text()
    for sign in ("WorkerLostError", "exited with 'signal", "Traceback"):
        assert sign not in output, output
    stack.memory.sample()
    print(stack.memory.report())  # shown by `pytest -s`; docs/benchmarks.md quotes it
    assert stack.memory.total_mib < WORKER_MEMORY_LIMIT_MIB, stack.memory.report()
    assert max(stack.memory.peaks_mib.values()) < PROCESS_MEMORY_LIMIT_MIB, stack.memory.report()


def _check_written_objects(stack: Stack) -> None:
    """Every object the PACS received reads back and passes dciodvfy with 0 errors."""
    for path, _ in stack.pacs.received():
        report = dciodvfy(path)
        assert not report.errors, report


def test_a_study_with_a_bomb_excess_pixel_data_and_no_series_uid_delivers_its_valid_image(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = generate_uid()
    valid = tmp_path / "valid.dcm"
    phantom_cr(valid, study_uid=study)  # what the demo weights assess (RG1 they refuse)
    bomb = j2k_siz_bomb(tmp_path / "bomb.dcm", study_uid=study)
    excess = excess_pixel_data(tmp_path / "excess.dcm", study_uid=study)
    no_series = without(tmp_path / "no-series.dcm", "SeriesInstanceUID", study_uid=study)
    sent = send_as_is([valid, bomb, excess, no_series], stack.port)
    assert sent[valid] == SUCCESS
    accepted = sum(1 for status in sent.values() if status == SUCCESS)
    wait_until(lambda: _settled(stack, study, accepted), SETTLE_TIMEOUT_S, "the study settled", 0.5)
    reports = _reports(stack, sent, study)

    good = reports[valid]
    assert good.sr is not None and good.sc is not None, stack.worker.text()
    summary = read_sr(good.sr)
    assert summary.predicted is not None
    assert summary.heatmap_sop_instance_uid == good.sc.SOPInstanceUID
    expected = {
        bomb: "codestream is 25000x25000 but Rows and Columns say 1024x1024",
        excess: "excess pixel data",
        no_series: "SeriesInstanceUID",
    }
    for path, reason in expected.items():
        report = reports[path]
        if report.status != SUCCESS:  # refused at the node: reported to the sender
            continue
        assert report.sc is None
        if report.sr is not None:
            not_evaluated = read_sr(report.sr)
            assert not_evaluated.predicted is None
            assert any(reason in r for r in not_evaluated.unassessable_reasons), not_evaluated
        else:
            assert report.dead_letter is not None and reason in report.dead_letter, reports
    _check_written_objects(stack)
    _check_worker_survived(stack)

    assert main(["outbox", "list", "--config", str(stack.config)]) == 0
    listing = capsys.readouterr().out
    for path, report in reports.items():
        if report.dead_letter is not None:
            assert f"{key_for(study)}/{_instance_key(path)}" in listing
            assert report.dead_letter in listing
    for path in (valid, no_series):
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) not in listing


def _corpus(folder: Path) -> dict[str, Path]:
    """Every hostile instance of this suite, each in a study of its own."""
    frames, rows, bits = "NumberOfFrames", "Rows", "BitsAllocated"
    eight_bits: dict[str, Any] = {"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}
    return {
        "J2K SIZ bomb 25000": j2k_siz_bomb(folder / "bomb-25k.dcm"),
        "J2K SIZ bomb 40000": j2k_siz_bomb(folder / "bomb-40k.dcm", side=40_000),
        "J2K noise after a true header": j2k_corrupt(folder / "j2k-noise.dcm"),
        "J2K 15-bit codestream, 8-bit header": encoded(
            folder / "j2k-bits.dcm", JPEG2000Lossless, **eight_bits
        ),
        "JPEG-LS SOF55 mismatch": encoded(folder / "jls-rows.dcm", JPEGLSLossless, Rows=1024),
        "RLE segment count mismatch": encoded(folder / "rle.dcm", RLELossless, **eight_bits),
        "excess pixel data": excess_pixel_data(folder / "excess.dcm", total=80 << 20),
        "truncated pixel data": truncated_pixel_data(folder / "truncated.dcm"),
        "no pixel data": without(folder / "no-pixels.dcm", "PixelData"),
        "two frames declared": with_raw_value(folder / "frames-2.dcm", frames, b"2"),
        "Number of Frames not a number": with_raw_value(folder / "nan.dcm", frames, b"abc"),
        "9000 rows": with_raw_value(folder / "rows.dcm", rows, struct.pack("<H", 9000)),
        "Bits Allocated 12": with_raw_value(folder / "bits.dcm", bits, struct.pack("<H", 12)),
        "multi-valued Patient's Name": with_raw_value(
            folder / "name.dcm", "PatientName", b"A^B\\C^D"
        ),
        "invalid SOP Instance UID": with_raw_value(
            folder / "uid.dcm", "SOPInstanceUID", b"1.2.abc.4"
        ),
        "no Series Instance UID": without(folder / "no-series.dcm", "SeriesInstanceUID"),
    }


def test_every_hostile_instance_the_node_accepts_is_settled_without_a_worker_crash(
    stack: Stack, tmp_path: Path
) -> None:
    corpus = _corpus(tmp_path)
    sent = send_as_is(list(corpus.values()), stack.port)
    accepted = {name: path for name, path in corpus.items() if sent[path] == SUCCESS}
    assert accepted, sent
    studies = {
        name: str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        for name, path in accepted.items()
    }

    def all_settled() -> bool:
        return all(_settled(stack, uid, 1) for uid in studies.values())

    wait_until(all_settled, SETTLE_TIMEOUT_S, "every accepted instance settled", 0.5)
    for name, path in accepted.items():
        report = _reports(stack, {path: sent[path]}, studies[name])[path]
        if report.sr is not None:
            summary = read_sr(report.sr)
            assert summary.predicted is None and summary.unassessable_reasons, name
            assert report.sc is None, name
        else:
            assert report.dead_letter, f"{name}: neither an SR nor a dead letter"
    assert stack.spool.pending_studies() == []
    _check_written_objects(stack)
    _check_worker_survived(stack)
