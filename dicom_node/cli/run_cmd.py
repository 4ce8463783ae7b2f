"""``coronet run``: the whole system on this machine (``make run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.common import add_config_options, positive_int
from dicom_node.stack.supervisor import RunOptions, run


def _run(args: argparse.Namespace) -> int:
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet run``."""
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
        "--concurrency", type=positive_int, metavar="N", help="worker processes (default 1)"
    )
    parser.add_argument(
        "--threads", type=positive_int, metavar="N", help="torch threads per worker process"
    )
    parser.add_argument("--pool", choices=["prefork", "solo"], default="prefork")
    parser.add_argument(
        "--heatmap", choices=["fast", "full", "off"], default="fast", help="see coronet worker"
    )
    parser.set_defaults(handler=_run)
