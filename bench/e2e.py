"""End-to-end latency and throughput: C-STORE to the node until the results reach the PACS.

For each worker pool size (default 1 and 2 processes) a fresh system is started: a real
``redis-server``, the node (``coronet node serve``), ``coronet worker --concurrency C`` (fast
heatmap) and a recording Storage SCP standing in for the PACS.  N single-image studies (phantom
chest radiographs, or copies of RG1 with ``--rg1``) are sent as one burst in one association;
each study's latency runs from the node's C-STORE acknowledgement to the arrival of its SR at
the PACS (the SR is sent after the SC).  Warm-up studies (one per process) go first and are not
counted.

    python -m bench.e2e --n 50                   # pool sizes 1 and 2 on loopback
    python -m bench.e2e --n 30 --hosts 1,2,3     # 1, 2, 3 worker hosts (needs root)
    python -m bench.e2e --n 30 --fetch-overhead  # fetching against reading the spool
    python -m bench.e2e --n 64 --batch-sizes 1,2,4,8,16   # per-image cost of the engine
    python -m bench.e2e --n 40 --worker-batches 1,4      # coronet worker --batch, end to end

``--hosts``: each worker runs on a host of its own made of Linux namespaces
(``tests.support.netns``: a network namespace, and a mount namespace in which the node's spool
is empty), one process with one torch thread per host; the node, Redis and the PACS run on the
hub host, which this process joins.  The run with one host is the reference of the ratios.

``--fetch-overhead``: one worker process on the node's host, first fetching its instances from
the node (the default), then reading the spool directly (``fetch.direct_spool``); the worker's
own per-task timings give the cost of a study in each mode.

``--batch-sizes``: the worker's engine alone (no node): the per-image cost of pre-processing
and classifying ``--n`` phantoms in batches of each size (``Engine.prepare_many`` and
``assess_many``, one forward pass per batch), and of their fast maps (``explain_many``, one
optimisation per batch), against batches of one, on the CPU (or ``--device cuda:0``).

``--worker-batches``: one worker process, ``coronet worker --batch B`` for each B (B tasks at
once in threads, their images analysed together), against ``--batch 1`` (the reference when it
comes first); prints how many images the batches held.

Prints p50/p95 latency and throughput per run and the scaling ratio against the first run.
Without ``--threads`` the torch threads of each process are the cores divided by the pool size.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer
from tqdm import tqdm

import monai_bundle
from monai_bundle.scripts.phantoms import CLASS_NAMES, make_phantom, write_dicom
from tests.support.netns import Host, HostNetwork, entered
from tests.support.processes import ChildProcess
from tests.support.redis_server import free_port
from worker.results.outcome import Prediction, Unassessable

if TYPE_CHECKING:
    from worker.engine import Engine

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

    address: str = "127.0.0.1"
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
            (self.address, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
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


def config_data(
    folder: Path, address: str, redis_port: int, pacs_port: int, *, direct: bool = False
) -> dict[str, Any]:
    """The node's configuration (a worker's adds its own outbox and cache)."""
    local = address == "127.0.0.1"
    return {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1" if local else "0.0.0.0", "port": 0},
        "callers": [{"ae_title": SCU_AET, "host": address}],
        "destinations": [
            {"name": "pacs", "ae_title": PACS_AET, "host": address, "port": pacs_port}
        ],
        "storage": {"spool_dir": str(folder / "spool"), "outbox_dir": str(folder / "out")},
        "broker": {"url": f"redis://{address}:{redis_port}/0", "queue": "coronet"},
        "model": {"bundle_dir": str(BUNDLE), "device": "cpu"},
        "grouping": {"mode": "instance"},
        "admin": {
            "host": address if local else "0.0.0.0",
            "port": 0,
            "allow_plain_http": not local,  # the benchmark's own namespaces
            "users_file": str(folder / "admin" / "users"),
            "secret_file": str(folder / "admin" / "secret"),
            "worker_timeout": 0,
        },
        "fetch": {"direct_spool": direct, "cache_dir": str(folder / "cache")},
        "audit": {"sink": "off"},
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def coronet(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicom_node.cli", *args]


@dataclass
class System:
    """Redis, the node and the PACS on one host (this process's network), and the workers."""

    folder: Path
    address: str
    processes: list[ChildProcess] = field(default_factory=list)
    workers: list[ChildProcess] = field(default_factory=list)

    def start(self, argv: list[str], ready: str) -> ChildProcess:
        process = ChildProcess(argv, cwd=self.folder)
        self.processes.append(process)
        process.wait_for_line(ready, READY_TIMEOUT_S)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout=60)


def run_once(
    label: str,
    inputs: list[Path],
    folder: Path,
    args: argparse.Namespace,
    *,
    address: str = "127.0.0.1",
    hosts: Sequence[Host | None] = (None,),
    concurrency: int = 1,
    direct: bool = False,
    batch: int = 1,
) -> tuple[Run, list[str]]:
    """One fresh system; each of ``hosts`` (None: this host) runs one worker process pool."""
    folder.mkdir(parents=True, exist_ok=True)
    system = System(folder, address)
    pacs = Pacs(address=address).start()
    redis_port, node_port, admin_port = free_port(), free_port(), free_port()
    data = config_data(folder, address, redis_port, pacs.port, direct=direct)
    data["node"]["port"], data["admin"]["port"] = node_port, admin_port
    data["fetch"]["url"] = f"http://{address}:{admin_port}"
    try:
        system.start(
            [
                *("redis-server", "--save", "", "--appendonly", "no", "--port", str(redis_port)),
                *("--bind", address, "--protected-mode", "no", "--dir", str(folder)),
            ],
            "Ready to accept connections",
        )
        config = write_config(folder / "node.yaml", data)
        system.start(coronet("node", "serve", "--config", str(config)), "listening on")
        for index, host in enumerate(hosts):
            own = folder / f"worker{index}"
            worker_data = {
                **data,
                "storage": {**data["storage"], "outbox_dir": str(own / "out")},
                "fetch": {**data["fetch"], "cache_dir": str(own / "cache")},
            }
            worker_config = write_config(own / "worker.yaml", worker_data)
            command = coronet(
                *("worker", "--config", str(worker_config), "--heatmap", args.heatmap),
                *(("--batch", str(batch)) if batch > 1 else ("--concurrency", str(concurrency))),
                *(("--threads", str(args.threads)) if args.threads else ()),
            )
            argv = command if host is None else host.argv(command, empty=[folder / "spool"])
            worker = ChildProcess(argv, cwd=own)
            system.processes.append(worker)
            system.workers.append(worker)
        loads = 1 if batch > 1 else concurrency  # a batching worker is one process
        for worker in system.workers:
            worker.wait_for(
                lambda out: out.count("loaded on") >= loads, "a worker", READY_TIMEOUT_S
            )
        datasets = [pydicom.dcmread(p) for p in inputs]
        pool = concurrency * len(hosts)
        warmup, measured = datasets[:pool], datasets[pool:]
        print(f"{label}: warming up with {len(warmup)} studies", flush=True)
        pacs.wait_for(list(send(address, node_port, warmup)), args.timeout, None)
        with tqdm(total=len(measured), desc=label, unit="study") as bar:
            started = time.perf_counter()
            acknowledged = send(address, node_port, measured)
            pacs.wait_for(list(acknowledged), args.timeout, bar)
        finished = max(pacs.arrivals[s] for s in acknowledged)
        logs = [worker.text() for worker in system.workers]
    finally:
        system.stop()
        pacs.stop()
    latencies = [pacs.arrivals[s] - t for s, t in acknowledged.items()]
    return Run(label, len(measured), latencies, finished - started), logs


def send(address: str, port: int, datasets: Sequence[Dataset]) -> dict[str, float]:
    """C-STORE every data set in one association; return study UID -> acknowledgement time."""
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(CR_STORAGE)
    assoc = ae.associate(address, port, ae_title=NODE_AET)
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
    label: str
    studies: int
    latencies: list[float]
    seconds: float

    @property
    def throughput(self) -> float:
        return self.studies / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


_BATCH = re.compile(r"batch of (\d+) images from \d+ tasks")
_TASK = re.compile(r"this task (\d+\.\d+) s: ([^)]*)\)")


def task_timings(logs: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per study: the whole task, and its "read" step (fetch or spool, and the header)."""
    totals, reads = [], []
    for log in logs:
        for match in _TASK.finditer(log):
            steps = dict(re.findall(r"(\w+) (\d+\.\d+) s", match.group(2)))
            if "read" in steps:
                totals.append(float(match.group(1)))
                reads.append(float(steps["read"]))
    return totals, reads


def print_runs(runs: Sequence[Run], title: str) -> None:
    print()
    print(title)
    print(f"{'run':>24}  {'p50 s':>8}  {'p95 s':>8}  {'mean s':>8}  {'studies/min':>11}  ratio")
    for run in runs:
        print(
            f"{run.label:>24}  {run.percentile(0.5):>8.2f}  {run.percentile(0.95):>8.2f}  "
            f"{statistics.fmean(run.latencies):>8.2f}  {60 * run.throughput:>11.2f}  "
            f"{run.throughput / runs[0].throughput:.2f}x"
        )


def batch_costs(sizes: Sequence[int], n: int, threads: int | None, device: str = "cpu") -> None:
    """Per-image cost of the engine's batched pre-processing and forward pass (see above)."""
    import torch  # heavy: only this mode needs the model in this process

    from worker.engine import load_engine

    if threads:
        torch.set_num_threads(threads)
    engine = load_engine(BUNDLE, device)

    def synchronise() -> None:  # CUDA runs asynchronously: time what it did, not what it queued
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)

    pixels = [
        make_phantom(CLASS_NAMES[i % len(CLASS_NAMES)], size=256, seed=i).image for i in range(n)
    ]
    engine.assess_many(engine.prepare_many(pixels[:2]))  # warm-up
    print()
    print(
        f"engine per image, {n} phantoms 256 px -> {engine.image_size} px, {engine.device}, "
        f"{torch.get_num_threads()} torch threads; median of 3 passes"
    )
    print(f"{'batch':>6}  {'prepare ms':>10}  {'forward ms':>10}  {'total ms':>9}  vs batch 1"
          f"  {'fast map ms':>11}  vs batch 1")  # fmt: skip
    reference = map_reference = None
    for size in sizes:
        passes = []
        for _ in range(3):
            prepare = forward = explain = 0.0
            for start in range(0, n, size):
                chunk = pixels[start : start + size]
                synchronise()
                t0 = time.perf_counter()
                images = engine.prepare_many(chunk)
                synchronise()
                t1 = time.perf_counter()
                analyses = engine.assess_many(images)
                synchronise()
                t2 = time.perf_counter()
                targets = [_target(engine, analysis.outcome) for analysis in analyses]
                engine.explain_many(images, targets, "fast")
                synchronise()
                explain += time.perf_counter() - t2
                forward += t2 - t1
                prepare += t1 - t0
            passes.append((prepare / n, forward / n, explain / n))
        prepare, forward, explain = sorted(passes, key=lambda p: p[0] + p[1])[1]
        total = prepare + forward
        reference = reference or total
        map_reference = map_reference or explain
        print(
            f"{size:>6}  {1000 * prepare:>10.2f}  {1000 * forward:>10.2f}  {1000 * total:>9.2f}"
            f"  {reference / total:>9.2f}x  {1000 * explain:>11.1f}  {map_reference / explain:.2f}x"
        )


def _target(engine: Engine, outcome: Prediction | Unassessable) -> int:
    """The class a map explains: the predicted one (the first for a refused image)."""
    if isinstance(outcome, Prediction):
        return engine.class_names.index(outcome.predicted)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="studies per run (default 50)")
    parser.add_argument(
        "--processes", default="1,2", help="worker pool sizes to compare (default 1,2)"
    )
    parser.add_argument("--hosts", help="worker hosts to compare, e.g. 1,2,3 (needs root)")
    parser.add_argument(
        "--fetch-overhead", action="store_true", help="fetching against reading the spool"
    )
    parser.add_argument("--batch-sizes", help="engine batch sizes to compare, e.g. 1,2,4,8")
    parser.add_argument(
        "--device", default="cpu", help="with --batch-sizes: cpu (default) or cuda:N"
    )
    parser.add_argument(
        "--worker-batches", help="coronet worker --batch values to compare end to end, e.g. 1,4"
    )
    parser.add_argument("--heatmap", choices=["fast", "full", "off"], default="fast")
    parser.add_argument("--rg1", action="store_true", help="send RG1 copies, not phantoms")
    parser.add_argument(
        "--threads", type=int, help="torch threads per process (default: cores / processes)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args = parser.parse_args(argv)
    if not (BUNDLE / "models" / "model.pt").is_file():
        raise SystemExit("the bundle's demo weights (monai_bundle/models/model.pt) are missing")
    if args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        batch_costs(sizes, args.n, args.threads, args.device)
        return 0
    source = "RG1 copies" if args.rg1 else "phantoms 256 px"
    setting = (
        f"{args.n} studies in one burst, heatmap {args.heatmap}, {os.cpu_count()} CPU cores, "
        f"torch threads {args.threads or 'cores / processes'}, {source}"
    )
    with tempfile.TemporaryDirectory(prefix="coronet-bench-") as tmp:
        folder = Path(tmp)
        if args.hosts:
            counts = [int(h) for h in args.hosts.split(",")]
            inputs = make_inputs(args.n + max(counts), folder / "inputs", args.rg1)
            names = ["hub", *(f"w{i}" for i in range(1, max(counts) + 1))]
            runs = []
            with HostNetwork(names) as net, entered(net.hub):
                for count in counts:
                    run, _ = run_once(
                        f"{count} worker hosts",
                        inputs[: args.n + count],
                        folder / f"hosts{count}",
                        args,
                        address=net.hub.address,
                        hosts=net.hosts[1 : count + 1],
                    )
                    runs.append(run)
            print_runs(runs, f"end to end, worker hosts in namespaces, {setting}")
        elif args.worker_batches:
            batches = [int(b) for b in args.worker_batches.split(",")]
            inputs = make_inputs(args.n + 1, folder / "inputs", args.rg1)
            runs = []
            for index, batch in enumerate(batches):  # repeat values to alternate, e.g. 1,4,1,4
                run, logs = run_once(
                    f"--batch {batch}",
                    inputs[: args.n + 1],
                    folder / f"run{index}-batch{batch}",
                    args,
                    batch=batch,
                )
                runs.append(run)
                sizes = [int(n) for log in logs for n in _BATCH.findall(log)]
                if sizes:
                    mean = statistics.fmean(sizes)
                    print(f"--batch {batch}: {len(sizes)} batches, {mean:.2f} images on average")
            print_runs(runs, f"end to end, one worker process, {setting}")
        elif args.fetch_overhead:
            inputs = make_inputs(args.n + 1, folder / "inputs", args.rg1)
            timings = {}
            for mode, direct in (("fetch", False), ("spool", True)):
                run, logs = run_once(
                    f"{mode}", inputs, folder / mode, args, direct=direct, concurrency=1
                )
                timings[mode] = (run, *task_timings(logs))
            print_runs([timings["spool"][0], timings["fetch"][0]], f"end to end, {setting}")
            print(f"{'per study':>24}  {'task p50 s':>10}  {'read p50 s':>10}")
            for mode in ("spool", "fetch"):
                _, totals, reads = timings[mode]
                print(
                    f"{mode:>24}  {statistics.median(totals):>10.3f}  "
                    f"{statistics.median(reads):>10.3f}"
                )
            overhead = statistics.median(timings["fetch"][2]) - statistics.median(
                timings["spool"][2]
            )
            print(f"fetch overhead per study (read step, medians): {1000 * overhead:.1f} ms")
        else:
            sizes = [int(p) for p in args.processes.split(",")]
            inputs = make_inputs(args.n + max(sizes), folder / "inputs", args.rg1)
            runs = [
                run_once(
                    f"{size} processes",
                    inputs[: args.n + size],
                    folder / f"run{size}",
                    args,
                    concurrency=size,
                )[0]
                for size in sizes
            ]
            print_runs(runs, f"end to end, {setting}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
