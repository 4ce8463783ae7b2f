"""``coronet worker``, ``coronet outbox list|retry``, ``coronet demo send`` and ``coronet run``.

Each ``register_*`` function adds one command to the ``coronet`` parser
(``dicom_node.cli.REGISTRARS``).  Imports of the heavy parts (Celery worker, model) happen in
the handlers, so ``coronet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_WORKER_EPILOG = """\
Devices: model.device cpu or cuda:N is used by every pool process.  With auto, a host with G
GPUs gets G processes by default, process i pinned to cuda:(i mod G); without a GPU, the CPU
is used and the cores are shared between the processes (torch threads = cores / concurrency).
On a host whose cores are also busy with other work, set OMP_WAIT_POLICY=PASSIVE: waiting
OpenMP threads then sleep instead of spinning.  Measured on 2 cores (docs/benchmarks.md): one
heatmap of 60 steps alone takes 7.2 s with the default and 12.7 s with PASSIVE; two at once
take 29.5 s each with the default and 11.5 s each with PASSIVE.

Delivery: messages are acknowledged only after the task finished (acks_late), so a worker
killed mid-task gets its study again, from the broker after --visibility-timeout.  A message
started more than --max-redeliveries + 1 times is dead-lettered.  Unavailable destinations are
retried --max-retries times with exponential backoff and jitter; then the results are
dead-lettered in the outbox (see `coronet outbox list` and `coronet outbox retry`).

The worker and the node must see the same spool folder (storage.spool_dir); on separate hosts
put it on shared storage.
"""


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


# --------------------------------------------------------------------------- worker


def quiet_libraries() -> None:
    """pynetdicom and highdicom log every step (and UIDs) at INFO: keep only warnings."""
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``coronet worker`` (also passed through by ``coronet run``)."""
    from worker.celery_app import WorkerOptions

    defaults = WorkerOptions()
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help="pool processes (default: one per GPU with model.device auto, else 1)",
    )
    parser.add_argument(
        "--queue", metavar="Q", help="queue to consume (default: broker.queue from the config)"
    )
    parser.add_argument(
        "--pool",
        choices=["prefork", "solo"],
        default=defaults.pool,
        help="prefork: processes that are replaced when they die (default); solo: in-process",
    )
    parser.add_argument(
        "--heatmap",
        choices=["fast", "full", "off"],
        default=defaults.heatmap,
        help="attribution map: fast (40 steps, default), full (the paper's 300 steps, "
        "slow on CPU) or off (no SC)",
    )
    parser.add_argument(
        "--time-limit",
        type=_positive_float,
        default=defaults.time_limit,
        metavar="S",
        help=f"hard time limit per task in seconds (default {defaults.time_limit:g}; the soft "
        "limit is 60 s less, or 90%% for short limits)",
    )
    parser.add_argument(
        "--visibility-timeout",
        type=_positive_float,
        metavar="S",
        help="seconds before the broker hands an unacknowledged message to another worker "
        f"(default {defaults.visibility_timeout:g}; must exceed the time limit and the "
        "longest retry countdown)",
    )
    parser.add_argument(
        "--max-retries",
        type=_non_negative_int,
        default=defaults.max_retries,
        metavar="N",
        help=f"delivery retries before dead-lettering (default {defaults.max_retries})",
    )
    parser.add_argument(
        "--retry-backoff",
        type=_positive_float,
        default=defaults.retry_backoff,
        metavar="S",
        help=f"first retry countdown, doubled each time (default {defaults.retry_backoff:g})",
    )
    parser.add_argument(
        "--retry-backoff-max",
        type=_positive_float,
        default=defaults.retry_backoff_max,
        metavar="S",
        help=f"longest retry countdown (default {defaults.retry_backoff_max:g})",
    )
    parser.add_argument(
        "--max-redeliveries",
        type=_non_negative_int,
        default=defaults.max_redeliveries,
        metavar="N",
        help="times a message may be redelivered after its worker was lost "
        f"(default {defaults.max_redeliveries})",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
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
    from dicom_node.errors import ConfigError

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


def worker_options(args: argparse.Namespace, device: str) -> Any:
    """:class:`~worker.celery_app.WorkerOptions` from parsed arguments."""
    from worker.celery_app import WorkerOptions, detect_gpus

    gpu_count = detect_gpus() if device == "auto" else 0
    concurrency = args.concurrency or (gpu_count if device == "auto" and gpu_count else 1)
    time_limit = float(args.time_limit)
    soft = time_limit - 60.0 if time_limit > 120 else time_limit * 0.9
    visibility = args.visibility_timeout or max(
        WorkerOptions().visibility_timeout, 2 * time_limit, 2 * args.retry_backoff_max
    )
    return WorkerOptions(
        concurrency=concurrency,
        pool=args.pool,
        queue=args.queue,
        heatmap=args.heatmap,
        soft_time_limit=soft,
        time_limit=time_limit,
        visibility_timeout=visibility,
        max_retries=args.max_retries,
        retry_backoff=args.retry_backoff,
        retry_backoff_max=args.retry_backoff_max,
        max_redeliveries=args.max_redeliveries,
        gpu_count=gpu_count,
        threads=args.threads,
    )


def _worker(args: argparse.Namespace) -> int:
    import socket

    from dicom_node.cli import EXIT_OK, settings_from_args
    from worker.celery_app import make_app

    settings = settings_from_args(args)
    check_bundle(settings.model.bundle_dir)
    options = worker_options(args, settings.model.device)
    quiet_libraries()
    app = make_app(settings, options)
    queue = options.queue or settings.broker.queue
    hostname = args.hostname or f"coronet-{os.getpid()}@{socket.gethostname()}"
    print(
        f"worker {hostname}: queue {queue}, {options.concurrency} x {options.pool}, "
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


def register_worker(sub: argparse._SubParsersAction) -> None:
    """Add ``coronet worker``."""
    from dicom_node.cli import add_config_options

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


# --------------------------------------------------------------------------- outbox


def _outbox_list(args: argparse.Namespace) -> int:
    from dicom_node.cli import EXIT_OK, settings_from_args
    from worker.outbox import Outbox, format_listing

    settings = settings_from_args(args)
    outbox = Outbox(settings.storage.outbox_dir)
    print(format_listing(outbox, _destinations(settings, args.destination), state=args.state))
    return EXIT_OK


def _outbox_retry(args: argparse.Namespace) -> int:
    from dicom_node.cli import EXIT_FAILED, EXIT_OK, settings_from_args
    from dicom_node.spool import Spool
    from worker.outbox import Outbox, format_round, retry_outbox

    quiet_libraries()
    settings = settings_from_args(args)
    outbox = Outbox(settings.storage.outbox_dir)
    destinations = _destinations(settings, args.destination)
    round_, done = retry_outbox(
        outbox,
        Spool(settings.storage.spool_dir),
        settings,
        destinations,
        dead_only=args.dead_only,
    )
    print(format_round(round_, destinations))
    if done:
        print(f"{len(done)} spool instances settled and marked done")
    return EXIT_FAILED if round_.transient or round_.refused else EXIT_OK


def _destinations(settings: Any, name: str | None) -> list[Any]:
    return [settings.destination(name)] if name else list(settings.destinations)


def register_outbox(sub: argparse._SubParsersAction) -> None:
    """Add ``coronet outbox list|retry``."""
    from dicom_node.cli import add_config_options

    parser = sub.add_parser(
        "outbox",
        help="show results waiting for delivery, delivered or dead-lettered; send them again",
        description="The outbox (storage.outbox_dir) holds every SR and SC the worker made, "
        "with its delivery state per destination: pending, delivered or dead-lettered "
        "(refused for good, or given up after the last retry).",
    )
    outbox_sub = parser.add_subparsers(dest="outbox_command", required=True, metavar="COMMAND")

    listing = outbox_sub.add_parser(
        "list",
        help="list the results and their state per destination",
        description="List every result (opaque key, kind, study key) with its state per "
        "destination, the dead letters with their reasons, and the instances that could not be "
        "analysed.",
    )
    add_config_options(listing)
    listing.add_argument("--destination", metavar="NAME", help="only this destination")
    listing.add_argument(
        "--state",
        choices=["pending", "delivered", "dead"],
        help="only results in this state for some destination",
    )
    listing.set_defaults(handler=_outbox_list)

    retry = outbox_sub.add_parser(
        "retry",
        help="send dead-lettered and pending results again, now, and report",
        description="Send every dead-lettered and pending result to its destinations in this "
        "process (not through the queue), record the outcome and print a report.  Exit 0 when "
        "everything was delivered, 1 otherwise.",
    )
    add_config_options(retry)
    retry.add_argument("--destination", metavar="NAME", help="only this destination")
    retry.add_argument(
        "--dead-only", action="store_true", help="only dead-lettered results, not pending ones"
    )
    retry.set_defaults(handler=_outbox_retry)


# --------------------------------------------------------------------------- demo


def _demo_send(args: argparse.Namespace) -> int:
    from dicom_node.cli import EXIT_FAILED, EXIT_OK
    from worker.supervisor import send_demo

    ok, message = send_demo(
        files=args.files,
        var_dir=args.var_dir,
        host=args.host,
        port=args.port,
        called_aet=args.aet,
        calling_aet=args.calling_aet,
        keep_uids=args.keep_uids,
    )
    print(message)
    return EXIT_OK if ok else EXIT_FAILED


def register_demo(sub: argparse._SubParsersAction) -> None:
    """Add ``coronet demo send``."""
    parser = sub.add_parser(
        "demo",
        help="send the sample chest radiograph into the demo PACS of `coronet run`",
        description="Helpers for the all-in-one demo started by `coronet run` (make run).",
    )
    demo_sub = parser.add_subparsers(dest="demo_command", required=True, metavar="COMMAND")
    send = demo_sub.add_parser(
        "send",
        help="C-STORE a chest radiograph into the demo Orthanc, which routes it to the node",
        description="Send FILE (default: the real adult PA chest CR RG1_UNCR.dcm from "
        "pydicom-data) to the demo Orthanc over DICOM.  Orthanc's Lua script routes CR and DX "
        "to the node; the SR and the heatmap appear in the same study a few seconds later.  "
        "Each send gets new Study, Series and SOP Instance UIDs (a new study), unless "
        "--keep-uids.  Orthanc's address is read from <var-dir>/run/state.json unless given.",
    )
    send.add_argument("files", nargs="*", type=Path, metavar="FILE", help="DICOM files to send")
    send.add_argument(
        "--var-dir", type=Path, default=Path("var"), help="state folder of `coronet run`"
    )
    send.add_argument("--host", default=None, help="Orthanc host (default 127.0.0.1)")
    send.add_argument("--port", type=int, default=None, help="Orthanc DICOM port")
    send.add_argument("--aet", default=None, help="Orthanc's AE title")
    send.add_argument("--calling-aet", default="CORONETDEMO", help="our AE title for the send")
    send.add_argument(
        "--keep-uids", action="store_true", help="send the files unchanged (same UIDs)"
    )
    send.set_defaults(handler=_demo_send)


# --------------------------------------------------------------------------- run


def _run(args: argparse.Namespace) -> int:
    from worker.supervisor import RunOptions, run

    options = RunOptions(
        config=args.config,
        overrides=list(args.overrides),
        orthanc=not args.no_orthanc,
        var_dir=args.var_dir,
        redis_port=args.redis_port,
        worker_args=_worker_passthrough(args),
    )
    return run(options)


def _worker_passthrough(args: argparse.Namespace) -> list[str]:
    passed = [f"--heatmap={args.heatmap}", f"--pool={args.pool}"]
    if args.concurrency:
        passed.append(f"--concurrency={args.concurrency}")
    if args.threads:
        passed.append(f"--threads={args.threads}")
    return passed


def register_run(sub: argparse._SubParsersAction) -> None:
    """Add ``coronet run``."""
    from dicom_node.cli import add_config_options

    parser = sub.add_parser(
        "run",
        help="start everything: Redis, a demo Orthanc PACS, the node and a worker",
        description="Start, on this machine and on loopback: a Redis broker (append-only, "
        "data under <var-dir>/redis), a demo Orthanc PACS (config under <var-dir>/orthanc, Lua "
        "auto-routing of CR/DX to the node), the DICOM node and one worker with the demo "
        "weights.  The node's destinations are pointed at the demo Orthanc.  Prints the AE "
        "titles, ports and Orthanc's web address once everything answers; Ctrl-C stops the "
        "worker, the node, Orthanc and Redis, in that order.",
        epilog="Then, in another terminal: coronet demo send",
    )
    add_config_options(parser)
    parser.add_argument(
        "--no-orthanc",
        action="store_true",
        help="no demo PACS: results go to the configured destinations",
    )
    parser.add_argument(
        "--var-dir", type=Path, default=Path("var"), help="state and logs (default var/)"
    )
    parser.add_argument(
        "--redis-port", type=int, metavar="PORT", help="Redis port (default: a free port)"
    )
    parser.add_argument(
        "--concurrency", type=_positive_int, metavar="N", help="worker processes (default 1)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, metavar="N", help="torch threads per worker process"
    )
    parser.add_argument("--pool", choices=["prefork", "solo"], default="prefork")
    parser.add_argument(
        "--heatmap", choices=["fast", "full", "off"], default="fast", help="see coronet worker"
    )
    parser.set_defaults(handler=_run)


def main(argv: list[str] | None = None) -> int:
    """``coronet ...`` for tests."""
    from dicom_node.cli import main as cli_main

    return cli_main(argv if argv is not None else sys.argv[1:])
