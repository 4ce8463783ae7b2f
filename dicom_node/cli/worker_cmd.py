"""``coronet worker``: run the Celery worker that analyses studies and delivers the results."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings
from pathlib import Path

from dicom_node.cli.common import (
    EXIT_OK,
    add_config_options,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    settings_from_args,
)
from dicom_node.core.errors import ConfigError
from dicom_node.core.logs import quiet_libraries
from worker.options import Pool, WorkerOptions

_WORKER_EPILOG = """\
Devices: model.device cpu or cuda:N is used by every pool process.  With auto, a host with G
GPUs gets G processes by default, process i pinned to cuda:(i mod G); without a GPU, the CPU
is used and the cores are shared between the processes (torch threads = cores / concurrency).
coronet sets OMP_WAIT_POLICY=PASSIVE unless it is exported: waiting OpenMP threads sleep
instead of spinning, so a worker does not collapse when other processes load its cores.
Measured on 2 cores (bench/contention.py, docs/benchmarks.md), one fast heatmap takes 0.22 s
alone and 0.75 s beside one busy process with the default policy, 0.34 s and 0.40 s with
PASSIVE.  On a host that runs nothing else, OMP_WAIT_POLICY=ACTIVE is faster (0.22 s), but
it collapses beside busy processes (19 s beside two).

Batches: --batch N runs up to N tasks at once, in the threads of one process (Celery's
threads pool, N messages reserved), and analyses the images they hold together: one forward
pass and one heatmap optimisation per batch.  A batch starts when it is full or every running
task has handed in its images (or --batch-wait passed).  It is meant for GPUs, where one image
leaves the device idle.  On a CPU, one process per core (--concurrency) is faster: measured on
2 cores, --batch 4 gave 1.2-1.36x one process, two processes 1.92x (docs/benchmarks.md).
Memory grows with N: each image of a batch is held decoded until its heatmap is done.  With
several GPUs, run one batching worker per GPU (--set model.device=cuda:I).  Celery enforces no
time limit in the threads pool: a task waits at most the soft limit for its batch, and a batch
that runs past --time-limit ends the worker process (its tasks go to another worker).

Delivery: messages are acknowledged only after the task finished (acks_late), so a worker
killed mid-task gets its study again, from the broker after --visibility-timeout.  A message
started more than --max-redeliveries + 1 times is dead-lettered.  Unavailable destinations are
retried --max-retries times with exponential backoff and jitter; then the results are
dead-lettered in the outbox (see `coronet outbox list` and `coronet outbox retry`).

Bad instances: an image that cannot be used (header and pixel data disagree, beyond
model.max_pixels, not decodable within model.decode_memory_mb and model.decode_timeout in the
decoder process) gets an SR saying why it was not assessed.  An instance from whose header no
SR can be built, whose analysis failed, whose analysis started --max-redeliveries times without
finishing, or whose spooled file stayed missing or unreadable for --max-read-attempts tries is
dead-lettered with the reason.  The study's other instances are analysed and delivered.

Instances: the worker fetches each study's instances from the node, at the signed URL its task
carries (the node's admin service, fetch.url), into fetch.cache_dir; no shared folder is
needed.  With fetch.direct_spool, a worker whose storage.spool_dir is the node's own spool
reads it directly.  While the node cannot be reached the task is retried; an instance the node
no longer holds is dead-lettered.
"""


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``coronet worker``."""
    defaults = WorkerOptions()
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help="pool processes (default: one per GPU with model.device auto, else 1)",
    )
    parser.add_argument(
        "--queue", metavar="Q", help="queue to consume (default: broker.queue from the config)"
    )
    parser.add_argument(
        "--pool",
        choices=["prefork", "solo"],
        help="prefork: processes that are replaced when they die (default); solo: in-process "
        "(a --batch above 1 runs in Celery's threads pool instead)",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=defaults.batch,
        metavar="N",
        help="run up to N tasks at once in one process and analyse their images together: one "
        "forward pass and one heatmap optimisation per batch (default 1; for GPUs, see below)",
    )
    parser.add_argument(
        "--batch-wait",
        type=non_negative_float,
        default=defaults.batch_wait,
        metavar="S",
        help="seconds a batch that is not full waits for the images of running tasks "
        f"(default {defaults.batch_wait:g})",
    )
    parser.add_argument(
        "--heatmap",
        choices=["fast", "full", "off"],
        default=defaults.heatmap,
        help="attribution map: fast (gradient start and 2-10 steps, default), full (the "
        "paper's 300 steps, slow on CPU) or off (no SC)",
    )
    parser.add_argument(
        "--time-limit",
        type=positive_float,
        default=defaults.time_limit,
        metavar="S",
        help=f"hard time limit per task in seconds (default {defaults.time_limit:g}; the soft "
        "limit is 60 s less, or 90%% for short limits)",
    )
    parser.add_argument(
        "--visibility-timeout",
        type=positive_float,
        metavar="S",
        help="seconds before the broker hands an unacknowledged message to another worker "
        f"(default {defaults.visibility_timeout:g}; must exceed the time limit and the "
        "longest retry countdown)",
    )
    parser.add_argument(
        "--max-retries",
        type=non_negative_int,
        default=defaults.max_retries,
        metavar="N",
        help=f"delivery retries before dead-lettering (default {defaults.max_retries})",
    )
    parser.add_argument(
        "--retry-backoff",
        type=positive_float,
        default=defaults.retry_backoff,
        metavar="S",
        help=f"first retry countdown, doubled each time (default {defaults.retry_backoff:g})",
    )
    parser.add_argument(
        "--retry-backoff-max",
        type=positive_float,
        default=defaults.retry_backoff_max,
        metavar="S",
        help=f"longest retry countdown (default {defaults.retry_backoff_max:g})",
    )
    parser.add_argument(
        "--max-redeliveries",
        type=non_negative_int,
        default=defaults.max_redeliveries,
        metavar="N",
        help="times a message may be redelivered after its worker was lost "
        f"(default {defaults.max_redeliveries})",
    )
    parser.add_argument(
        "--max-read-attempts",
        type=positive_int,
        default=defaults.max_read_attempts,
        metavar="N",
        help="tries to read a spooled instance that is missing or unreadable before it is "
        f"dead-lettered (default {defaults.max_read_attempts})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch CPU threads per process (default: the cores divided by --concurrency)",
    )
    parser.add_argument(
        "--hostname", metavar="NAME", help="Celery node name (default coronet-<pid>@<host>)"
    )
    parser.add_argument(
        "--loglevel",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the worker (default INFO: one line per study)",
    )


BUNDLE_FILES = (Path("configs/inference.json"), Path("configs/metadata.json"))


def check_bundle(bundle_dir: Path) -> None:
    """Fail at start, not at the first task, when the MONAI bundle or its weights are missing."""
    missing = [str(bundle_dir / f) for f in BUNDLE_FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise ConfigError(
            f"model.bundle_dir {bundle_dir} is not a CoroNet bundle: missing {', '.join(missing)}",
            [("model.bundle_dir", "not a bundle")],
        )
    if not any((bundle_dir / "models").glob("*.pt")):
        raise ConfigError(
            f"no weights in {bundle_dir / 'models'} (the demo weights are models/model.pt)",
            [("model.bundle_dir", "no weights")],
        )


def worker_options(args: argparse.Namespace, device: str, gpu_count: int) -> WorkerOptions:
    """:class:`~worker.options.WorkerOptions` from parsed arguments (``gpu_count``: GPUs seen)."""
    gpu_count = gpu_count if device == "auto" else 0
    concurrency = args.concurrency or (gpu_count if device == "auto" and gpu_count else 1)
    pool: Pool = args.pool or "prefork"
    if args.batch > 1:
        if args.pool is not None or args.concurrency is not None:
            raise ConfigError(
                "--batch runs its tasks in the threads of one process: it takes neither --pool "
                "nor --concurrency (run one batching worker per GPU, with --set model.device)",
                [("--batch", "with --pool or --concurrency")],
            )
        pool, concurrency, gpu_count = "threads", args.batch, min(gpu_count, 1)
    time_limit = float(args.time_limit)
    soft = time_limit - 60.0 if time_limit > 120 else time_limit * 0.9
    visibility = args.visibility_timeout or max(
        WorkerOptions().visibility_timeout, 2 * time_limit, 2 * args.retry_backoff_max
    )
    return WorkerOptions(
        concurrency=concurrency,
        pool=pool,
        queue=args.queue,
        heatmap=args.heatmap,
        soft_time_limit=soft,
        time_limit=time_limit,
        visibility_timeout=visibility,
        max_retries=args.max_retries,
        retry_backoff=args.retry_backoff,
        retry_backoff_max=args.retry_backoff_max,
        max_redeliveries=args.max_redeliveries,
        max_read_attempts=args.max_read_attempts,
        gpu_count=gpu_count,
        threads=args.threads,
        batch=args.batch,
        batch_wait=args.batch_wait,
    )


def root_notice() -> str | None:
    """One line about running as root, instead of Celery's warning (see :func:`_worker`)."""
    if os.geteuid() != 0:
        return None
    return (
        "warning: the worker runs as root (uid 0); it accepts JSON messages only, but a "
        "service should run as an unprivileged user (the Docker image uses 'coronet')"
    )


def _worker(args: argparse.Namespace) -> int:
    # heavy: the Celery app loads torch and MONAI; imported here so `coronet --help` stays fast
    from celery.exceptions import SecurityWarning

    from worker.celery_app import make_app
    from worker.destinations import DestinationSource
    from worker.runtime import detect_gpus

    settings = settings_from_args(args)
    check_bundle(settings.model.bundle_dir)
    gpus = detect_gpus() if settings.model.device == "auto" else 0
    options = worker_options(args, settings.model.device, gpus)
    quiet_libraries()
    notice = root_notice()
    if notice is not None:
        # Celery warns in 6 lines whenever it runs as root (celery.platforms.check_privileges;
        # C_FORCE_ROOT only matters with pickle, which we never accept).  The cause is real, so
        # it is said once, in one line, and Celery's other security warnings still show.
        print(notice, file=sys.stderr, flush=True)
        warnings.filterwarnings(
            "ignore", message="You're running the worker with superuser privileges",
            category=SecurityWarning,
        )  # fmt: skip
    destinations = DestinationSource(settings.destinations, args.config, args.overrides)
    app = make_app(settings, options, destinations=destinations)
    queue = options.queue or settings.broker.queue
    hostname = args.hostname or f"coronet-{os.getpid()}@{socket.gethostname()}"
    runs = (
        f"batches of up to {options.batch} images from {options.concurrency} tasks in threads"
        if options.batch > 1
        else f"{options.concurrency} x {options.pool}"
    )
    print(
        f"worker {hostname}: queue {queue}, {runs}, "
        f"device {settings.model.device}"
        + (f" ({options.gpu_count} GPUs)" if options.gpu_count else "")
        + f", heatmap {options.heatmap}, destinations "
        + (", ".join(d.name for d in settings.destinations) or "none"),
        flush=True,
    )
    argv = [
        "--quiet",  # no banner: the line above says what runs
        "worker",
        f"--loglevel={args.loglevel}",
        f"--queues={queue}",
        f"--concurrency={options.concurrency}",
        f"--pool={options.pool}",
        f"--hostname={hostname}",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet worker``."""
    parser = sub.add_parser(
        "worker",
        help="run the Celery worker: model, heatmap, SR and SC, delivery to the PACS",
        description="Consume coronet.process_study tasks from the broker (broker.url), analyse "
        "the spooled chest radiographs with the CoroNet bundle (model.bundle_dir on "
        "model.device), write the DICOM SR and the heatmap Secondary Capture to the outbox "
        "(storage.outbox_dir) and C-STORE them to every destination.  Stops on SIGINT/SIGTERM "
        "after the running tasks (a second signal stops at once).",
        epilog=_WORKER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(parser)
    add_worker_options(parser)
    parser.set_defaults(handler=_worker)
