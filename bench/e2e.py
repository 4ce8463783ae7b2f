"""End-to-end latency and throughput: C-STORE to the node until the results reach the PACS.

For each worker pool size (default 1 and 2 processes) a fresh system is started on loopback: a
real ``redis-server``, the node (in this process), ``coronet worker --concurrency C`` (a child
process, fast heatmap) and a recording Storage SCP standing in for the PACS.  N single-image
studies (phantom chest radiographs, or copies of RG1 with ``--rg1``) are sent as one burst in
one association; each study's latency runs from the node's C-STORE acknowledgement to the arrival
of its SR at the PACS (the SR is sent after the SC).  Warm-up studies (one per process) go first
and are not counted.

    python -m bench.e2e --n 50

Prints p50/p95 latency and throughput per pool size and the scaling ratio.  The torch threads
of each process are the cores divided by the pool size, so both runs use the same CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import yaml
from dicom_node.server import DicomNode
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer
from tqdm import tqdm

import monai_bundle
from dicom_node.core.settings import Settings, settings_from_data
from monai_bundle.scripts.phantoms import CLASS_NAMES, make_phantom, write_dicom
from tests.support.redis_server import RedisServer, free_port

BUNDLE = Path(monai_bundle.__file__).resolve().parent
NODE_AET = "CORONET"
PACS_AET = "PACS"
SCU_AET = "BENCH"
READY_TIMEOUT_S = 300.0
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


# --------------------------------------------------------------------------- the PACS


@dataclass
class Pacs:
    """A Storage SCP that records when each study's SR arrives."""

    port: int = field(default_factory=free_port)
    arrivals: dict[str, float] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def _on_store(self, event: Event) -> int:
        ds = event.dataset
        if ds.SOPClassUID == Comprehensive3DSRStorage:
            with self.changed:
                self.arrivals.setdefault(str(ds.StudyInstanceUID), time.perf_counter())
                self.changed.notify_all()
        return 0x0000

    _server: ThreadedAssociationServer | None = None

    def start(self) -> Pacs:
        ae = AE(ae_title=PACS_AET)
        for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def wait_for(self, studies: Sequence[str], timeout: float, progress: tqdm | None) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                done = sum(1 for s in studies if s in self.arrivals)
                if progress is not None:
                    progress.n = done
                    progress.refresh()
                if done == len(studies):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"only {done} of {len(studies)} results after {timeout} s")
                self.changed.wait(min(left, 1.0))


# --------------------------------------------------------------------------- the system


def make_inputs(n: int, folder: Path, rg1: bool) -> list[Path]:
    """``n`` single-image studies: phantoms of the three classes, or RG1 copies."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    template = None
    if rg1:
        from pydicom.data import get_testdata_file

        template = pydicom.dcmread(str(get_testdata_file("RG1_UNCR.dcm")))
    for index in tqdm(range(n), desc="generating studies", unit="study"):
        path = folder / f"study{index:03d}.dcm"
        if template is not None:
            template.StudyInstanceUID = generate_uid()
            template.SeriesInstanceUID = generate_uid()
            template.SOPInstanceUID = generate_uid()
            template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
            template.save_as(path, enforce_file_format=True)
        else:
            label = CLASS_NAMES[index % len(CLASS_NAMES)]
            write_dicom(make_phantom(label, size=256, seed=index), path, study_uid=generate_uid())
        paths.append(path)
    return paths


def settings_for(folder: Path, broker_url: str, pacs_port: int, queue: str) -> Settings:
    return settings_from_data(
        {
            "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": free_port()},
            "callers": [{"ae_title": SCU_AET, "host": "127.0.0.1"}],
            "destinations": [
                {"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs_port}
            ],
            "storage": {"spool_dir": str(folder / "spool"), "outbox_dir": str(folder / "out")},
            "broker": {"url": broker_url, "queue": queue},
            "model": {"bundle_dir": str(BUNDLE), "device": "cpu"},
            "grouping": {"mode": "instance"},
        }
    )


def start_worker(
    config: Path, concurrency: int, heatmap: str, threads: int | None, log: Path
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORONET_")}
    env["PYTHONUNBUFFERED"] = "1"
    handle = log.open("w")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(config)),
            *("--concurrency", str(concurrency), "--heatmap", heatmap),
            *(("--threads", str(threads)) if threads else ()),
        ],
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while log.read_text(errors="replace").count("loaded on") < concurrency:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    return process


def stop_worker(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def send(port: int, datasets: Sequence[Dataset]) -> dict[str, float]:
    """C-STORE every data set in one association; return study UID -> acknowledgement time."""
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(CR_STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    if not assoc.is_established:
        raise SystemExit("the node refused the association")
    acknowledged = {}
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0:
                raise SystemExit(f"C-STORE failed: {status}")
            acknowledged[str(ds.StudyInstanceUID)] = time.perf_counter()
    finally:
        assoc.release()
    return acknowledged


@dataclass(frozen=True)
class Run:
    concurrency: int
    studies: int
    latencies: list[float]
    seconds: float

    @property
    def throughput(self) -> float:
        return self.studies / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_once(
    concurrency: int,
    inputs: list[Path],
    heatmap: str,
    threads: int | None,
    folder: Path,
    timeout: float,
) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    pacs = Pacs().start()
    with RedisServer(folder / "redis") as redis:
        settings = settings_for(folder, redis.url, pacs.port, f"bench{concurrency}")
        config = folder / "node.yaml"
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
        node = DicomNode.from_settings(settings, retry_initial=0.05, retry_max=0.5)
        node.start()
        worker = start_worker(config, concurrency, heatmap, threads, folder / "worker.log")
        try:
            datasets = [pydicom.dcmread(p) for p in inputs]
            warmup, measured = datasets[:concurrency], datasets[concurrency:]
            print(f"{concurrency} process(es): warming up with {len(warmup)} studies", flush=True)
            pacs.wait_for(list(send(node.address[1], warmup)), timeout, None)
            with tqdm(total=len(measured), desc=f"{concurrency} process(es)", unit="study") as bar:
                started = time.perf_counter()
                acknowledged = send(node.address[1], measured)
                pacs.wait_for(list(acknowledged), timeout, bar)
            finished = max(pacs.arrivals[s] for s in acknowledged)
        finally:
            stop_worker(worker)
            node.stop()
            pacs.stop()
    latencies = [pacs.arrivals[s] - t for s, t in acknowledged.items()]
    return Run(concurrency, len(measured), latencies, finished - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="studies per run (default 50)")
    parser.add_argument(
        "--processes", default="1,2", help="worker pool sizes to compare (default 1,2)"
    )
    parser.add_argument("--heatmap", choices=["fast", "full", "off"], default="fast")
    parser.add_argument("--rg1", action="store_true", help="send RG1 copies, not phantoms")
    parser.add_argument(
        "--threads", type=int, help="torch threads per process (default: cores / processes)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args = parser.parse_args(argv)
    sizes = [int(p) for p in args.processes.split(",")]
    if not (BUNDLE / "models" / "model.pt").is_file():
        raise SystemExit("the bundle's demo weights (monai_bundle/models/model.pt) are missing")
    runs = []
    with tempfile.TemporaryDirectory(prefix="coronet-bench-") as tmp:
        folder = Path(tmp)
        inputs = make_inputs(args.n + max(sizes), folder / "inputs", args.rg1)
        for size in sizes:
            run = run_once(
                size,
                inputs[: args.n + size],
                args.heatmap,
                args.threads,
                folder / f"run{size}",
                args.timeout,
            )
            runs.append(run)
    print()
    source = "RG1 copies" if args.rg1 else "phantoms 256 px"
    print(
        f"end to end, {args.n} studies in one burst, heatmap {args.heatmap}, "
        f"{os.cpu_count()} CPU cores, torch threads {args.threads or 'cores / processes'}, "
        f"{source}"
    )
    print(f"{'processes':>9}  {'p50 s':>8}  {'p95 s':>8}  {'mean s':>8}  {'studies/min':>11}")
    for run in runs:
        print(
            f"{run.concurrency:>9}  {run.percentile(0.5):>8.2f}  {run.percentile(0.95):>8.2f}  "
            f"{statistics.fmean(run.latencies):>8.2f}  {60 * run.throughput:>11.2f}"
        )
    if len(runs) >= 2:
        ratio = runs[-1].throughput / runs[0].throughput
        print(f"scaling: {runs[-1].concurrency} vs {runs[0].concurrency} processes: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
