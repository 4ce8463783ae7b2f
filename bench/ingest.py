"""Ingest throughput of the node against dcmtk ``storescp``, both fed by one ``storescu``.

N copies of pydicom's RG1_UNCR chest CR (7.2 MB each, fresh UIDs) are generated into a
temporary folder, then sent over loopback in one association by dcmtk ``storescu``: first to
``coronet node serve`` (a child process, with a real ``redis-server`` as broker), then to
dcmtk ``storescp`` writing to a temporary folder.  The node fsyncs every instance before it
answers; storescp does not.  The node's RSS is sampled (psutil) while it receives, and its
peak is reported once 50 and once N images were acknowledged.

    python -m bench.ingest --n 200
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pydicom
import yaml
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from tqdm import tqdm

from tests.support.redis_server import RedisServer

logger = logging.getLogger(__name__)

TARGET_RATIO = 0.8
NODE_AET = "CORONET"
SCU_AET = "STORESCU"
RSS_MARKS = (50,)
SAMPLE_INTERVAL_S = 0.01
READY_TIMEOUT_S = 60.0
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def generate(n: int, folder: Path) -> list[Path]:
    """``n`` copies of RG1_UNCR with fresh study, series and instance UIDs."""
    source = get_testdata_file("RG1_UNCR.dcm")
    if not isinstance(source, str):
        raise SystemExit("pydicom test data (pydicom-data) is not installed")
    template = pydicom.dcmread(source)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in tqdm(range(n), desc="generating images", unit="img"):
        template.StudyInstanceUID = generate_uid()
        template.SeriesInstanceUID = generate_uid()
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        path = folder / f"img{index:04d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_for_echo(port: int, called: str, process: subprocess.Popen[bytes]) -> None:
    """Poll with dcmtk ``echoscu`` until the SCP answers (never a fixed sleep)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the SCP on port {port} exited with {process.returncode}")
        probe = subprocess.run(
            ["echoscu", "-aet", SCU_AET, "-aec", called, "127.0.0.1", str(port)],
            capture_output=True,
        )
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"no C-ECHO answer on port {port} after {READY_TIMEOUT_S} s")
        time.sleep(0.05)


@dataclass
class RssSampler:
    """Samples the RSS of one process on a thread; records the peak at given ack counts."""

    pid: int
    peak: int = 0
    at_marks: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            rss = int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return
        self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def mark(self, count: int) -> None:
        self._sample()
        self.at_marks[count] = self.peak

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


@dataclass(frozen=True)
class Run:
    name: str
    images: int
    seconds: float
    megabytes: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds


def send(
    name: str, paths: Sequence[Path], port: int, called: str, on_ack: Callable[[int], None]
) -> Run:
    """One ``storescu`` association with every file; time it and count the acknowledgements."""
    command = ["storescu", "-v", "-aet", SCU_AET, "-aec", called, "127.0.0.1", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, *(str(p) for p in paths)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    acknowledged = 0
    assert process.stdout is not None
    for line in process.stdout:
        if "Received Store Response (Success)" in line:
            acknowledged += 1
            on_ack(acknowledged)
    process.wait()
    seconds = time.perf_counter() - started
    if process.returncode != 0 or acknowledged != len(paths):
        raise SystemExit(f"{name}: storescu exit {process.returncode}, {acknowledged} acked")
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    return Run(name, len(paths), seconds, megabytes)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_node(paths: Sequence[Path], workdir: Path, broker_url: str) -> tuple[Run, RssSampler]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port},
                "callers": [{"ae_title": SCU_AET, "host": "127.0.0.1"}],
                "storage": {"spool_dir": str(workdir / "spool"), "outbox_dir": str(workdir / "o")},
                "broker": {"url": broker_url, "queue": "coronet"},
                "grouping": {"mode": "study", "quiet_seconds": 1},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORONET_")}
    # Keep pynetdicom's temporary files on the spool's file system (a rename, not a copy).
    env["TMPDIR"] = str(workdir)
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "node", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for_echo(port, NODE_AET, node)
        sampler = RssSampler(node.pid)
        sampler.start()
        marks = {m for m in RSS_MARKS if m < len(paths)} | {len(paths)}
        run = send(
            "coronet node",
            paths,
            port,
            NODE_AET,
            lambda count: sampler.mark(count) if count in marks else None,
        )
        sampler.stop()
        wait_for_tasks(broker_url, len(paths))
    finally:
        _stop(node)
    return run, sampler


def wait_for_tasks(broker_url: str, count: int) -> None:
    """Poll the broker until the node has published one task per study."""
    port = int(broker_url.rsplit(":", 1)[1].split("/")[0])
    client = RedisServer(Path(), port=port).client()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.llen("coronet") < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {client.llen('coronet')} of {count} studies were queued")
        time.sleep(0.05)
    client.delete("coronet")


def run_storescp(paths: Sequence[Path], workdir: Path, options: Sequence[str] = ()) -> Run:
    port = free_port()
    output = workdir / "storescp"
    output.mkdir()
    scp = subprocess.Popen(
        ["storescp", *options, "-aet", "STORESCP", "--output-directory", str(output), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_echo(port, "STORESCP", scp)
        return send("dcmtk storescp", paths, port, "STORESCP", lambda _count: None)
    finally:
        _stop(scp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="Ingest throughput of `coronet node serve` against dcmtk storescp: one "
        "storescu association of N full-size chest CRs over loopback to each, one after the "
        f"other.  Target: at least {TARGET_RATIO}x storescp's throughput.  Also reports the "
        "node's peak RSS after 50 and after N images.",
    )
    parser.add_argument("--n", type=int, default=200, help="images to send (default 200)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="send to each SCP this many times (default 1)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="folder for the images and spools (default: a temp folder)"
    )
    parser.add_argument(
        "--storescp-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra storescp option, repeatable, e.g. --storescp-option=--max-pdu "
        "--storescp-option=131072 (default: storescp's defaults)",
    )
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu", "redis-server"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (run `make system-deps`)")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="coronet-ingest-") as tmp:
        root = Path(tmp)
        paths = generate(args.n, root / "images")
        node_runs: list[Run] = []
        scp_runs: list[Run] = []
        samplers: list[RssSampler] = []
        with RedisServer(root / "redis") as broker:
            for index in range(args.rounds):
                work = root / f"round{index}"
                work.mkdir()
                node_run, sampler = run_node(paths, work / "node", broker.url)
                node_runs.append(node_run)
                samplers.append(sampler)
                shutil.rmtree(work / "node" / "spool")
                scp_runs.append(run_storescp(paths, work, args.storescp_option))
                shutil.rmtree(work)
    report(node_runs, scp_runs, samplers, args.n)
    return 0


def report(
    node_runs: Sequence[Run], scp_runs: Sequence[Run], samplers: Sequence[RssSampler], n: int
) -> None:
    def med(runs: Sequence[Run], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs)

    size = node_runs[0].megabytes / n
    print(f"\n{n} images of {size:.1f} MB, one storescu association per receiver")
    print(f"{'receiver':<16} {'images/s':>9} {'MB/s':>8} {'seconds':>8}")
    for runs in (node_runs, scp_runs):
        name = runs[0].name
        images, mbs, secs = med(runs, "images_per_s"), med(runs, "mb_per_s"), med(runs, "seconds")
        print(f"{name:<16} {images:9.1f} {mbs:8.1f} {secs:8.2f}")
    ratio = med(node_runs, "mb_per_s") / med(scp_runs, "mb_per_s")
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(f"ratio node/storescp: {ratio:.2f} ({verdict} the {TARGET_RATIO}x target)")
    for index, sampler in enumerate(samplers):
        peaks = sorted(sampler.at_marks.items())
        marks = ", ".join(f"{count} images: {rss / MIB:.0f} MiB" for count, rss in peaks)
        print(f"node peak RSS (round {index + 1}) after {marks}")
    print(f"every run: all {n} studies spooled and queued (one task each) before the node stopped")


if __name__ == "__main__":
    sys.exit(main())
