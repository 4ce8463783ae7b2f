"""``coronet node serve|echo|reload``: run the Storage SCP, test a destination, reload config.

``serve`` writes its process id to ``<spool_dir>/node.pid``; ``reload`` sends SIGHUP to that
process, which re-reads the configuration (same file, ``--set`` values and environment) and
applies it without dropping open associations.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from dicom_node.admin.app import create_app
from dicom_node.admin.config_edits import ConfigEditor
from dicom_node.admin.jobs import PeriodicJob
from dicom_node.admin.retention import prune
from dicom_node.admin.server import AdminServer
from dicom_node.admin.services import AdminServices, load_secret
from dicom_node.admin.users import UserStore
from dicom_node.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    add_config_options,
    settings_from_args,
)
from dicom_node.core.audit_trail import AuditTrail, default_source_id
from dicom_node.core.errors import CoronetError
from dicom_node.core.fetch import Locator, TicketSigner, default_base_url, spool_identity
from dicom_node.core.logs import quiet_libraries
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Settings
from dicom_node.core.spool import Spool
from dicom_node.scp.node import DicomNode
from worker.delivery import echo

logger = logging.getLogger(__name__)

PID_FILE = "node.pid"

_SERVE_EPILOG = """\
Admin service: with admin.enabled (the default) the node also serves the web console, the
REST API (/api/v1), /healthz and /metrics on admin.host:admin.port (loopback by default; see
`coronet admin user add`), and /fetch/v1, from which workers on any host fetch the instances
of their tasks (each task carries a signed URL, valid for fetch.url_ttl seconds; workers reach
it at fetch.url).  Without the admin service, workers must share the spool folder.  Delivered
studies are removed after storage.retention days, checked every storage.prune_interval seconds.

Signals: SIGHUP reloads the configuration (callers, AE title, SOP classes, limits, selection,
grouping, broker; a new host, port or TLS setting opens a new listener); SIGINT and SIGTERM
stop the node.  Instances are answered Success only once they are on disk; anything spooled
but not yet queued (e.g. while the broker is down) is queued when the broker is back, or at
the next start.
"""


def pid_file(settings: Settings) -> Path:
    """Where ``node serve`` records its process id."""
    return settings.storage.spool_dir / PID_FILE


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_pid_file(path: Path) -> None:
    other = _read_pid(path)
    if other is not None and other != os.getpid() and _alive(other):
        raise CoronetError(f"another node (pid {other}) already serves this spool ({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n", encoding="ascii")


def _release_pid_file(path: Path) -> None:
    if _read_pid(path) == os.getpid():
        path.unlink(missing_ok=True)


def _node_logging(verbosity: int) -> None:
    """Our INFO lines (one per association) always; pynetdicom's only with ``-vv``."""
    logging.getLogger("dicom_node").setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    if verbosity < 2:
        quiet_libraries()


def audit_trail(settings: Settings) -> AuditTrail:
    """The audit trail of ``settings`` (the node's and the admin commands')."""
    return AuditTrail.from_settings(settings.audit, default_source_id(settings.node.ae_title))


def _echo_destination(settings: Settings, name: str) -> tuple[bool, str]:
    return echo(settings, name, 10.0)


def _locator(settings: Settings, secret: bytes) -> Locator:
    """What each task carries so that a worker on any host reaches the study's instances."""
    return Locator(
        TicketSigner(secret, settings.fetch.url_ttl),
        default_base_url(settings),
        spool_identity(settings.storage.spool_dir, create=True) or "",
    )


def _admin_server(
    node: DicomNode, args: argparse.Namespace, trail: AuditTrail, secret: bytes
) -> AdminServer:
    """The admin service of a running node, wired to the worker's C-ECHO (composition root)."""
    settings = node.settings
    services = AdminServices(
        node=node,
        config_path=args.config,
        overrides=list(args.overrides),
        editor=ConfigEditor(args.config, trail),
        users=UserStore(settings.admin.users_file),
        audit_trail=trail,
        echo=_echo_destination,
        secret=secret,
    )
    app = create_app(services, secure=settings.admin.tls is not None)
    return AdminServer(app, settings.admin)


def _prune_job(node: DicomNode) -> PeriodicJob:
    def run() -> None:
        storage = node.settings.storage
        if storage.retention is not None:
            prune(
                node.spool,
                Outbox(storage.outbox_dir),
                node.settings.destinations,
                storage.retention,
            )

    return PeriodicJob("retention", lambda: node.settings.storage.prune_interval, run)


def _requeue_job(node: DicomNode) -> PeriodicJob:
    """Pending studies whose fetch URL expired get a task with a new one."""
    ttl = node.settings.fetch.url_ttl
    return PeriodicJob("requeue", lambda: ttl / 4, lambda: node.queue.requeue_stale(ttl))


def _serve(args: argparse.Namespace) -> int:
    _node_logging(getattr(args, "verbose", 0))
    settings = settings_from_args(args)
    trail = audit_trail(settings)
    Spool(settings.storage.spool_dir).prepare()  # a clear error for an unusable folder, first
    secret = load_secret(settings.admin.secret_file) if settings.admin.enabled else None
    locate = _locator(settings, secret).task_kwargs if secret is not None else None
    node = DicomNode.from_settings(settings, audit_trail=trail, locate=locate)
    wake = threading.Event()
    requests: dict[str, bool] = {"stop": False, "reload": False}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        requests["reload" if signum == signal.SIGHUP else "stop"] = True
        wake.set()

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
    }
    pid_path = pid_file(settings)
    admin: AdminServer | None = None
    jobs = [_prune_job(node)]
    if secret is not None:
        jobs.append(_requeue_job(node))
    try:
        _claim_pid_file(pid_path)
        if secret is not None:  # first: once the node says it listens, all of it answers
            admin = _admin_server(node, args, trail, secret)
            admin.start()
            print(f"admin console on {admin.url}", flush=True)
        node.start()
        for job in jobs:
            job.start()
        host, port = node.address
        print(
            f"{settings.node.ae_title} listening on {host}:{port} (pid {os.getpid()})", flush=True
        )
        while not requests["stop"]:
            wake.wait(1.0)
            wake.clear()
            if requests["reload"] and not requests["stop"]:
                requests["reload"] = False
                _reload(node, args)
    finally:
        for job in jobs:
            job.stop()
        if admin is not None:
            admin.stop()
        node.stop()
        trail.close()
        _release_pid_file(pid_path)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


def _reload(node: DicomNode, args: argparse.Namespace) -> None:
    try:
        node.reload(settings_from_args(args))
    except CoronetError as err:
        logger.error("reload failed, keeping the previous configuration: %s", err)
    else:
        print("configuration reloaded", flush=True)


def _echo(args: argparse.Namespace) -> int:
    ok, message = echo(settings_from_args(args), args.destination, args.timeout)
    print(message)
    return EXIT_OK if ok else EXIT_FAILED


def _signal_reload(args: argparse.Namespace) -> int:
    path = args.pid_file or pid_file(settings_from_args(args))
    pid = _read_pid(path)
    if pid is None or not _alive(pid):
        print(f"error: no running node found (pid file {path})", file=sys.stderr)
        return EXIT_FAILED
    os.kill(pid, signal.SIGHUP)
    print(f"asked node pid {pid} to reload its configuration")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet node serve|echo|reload``."""
    parser = sub.add_parser(
        "node",
        help="run the DICOM Storage SCP, C-ECHO a destination, reload a running node",
        description="The DICOM side of the node: receive chest radiographs by C-STORE, store "
        "them durably in the spool and queue them for the model.",
    )
    node_sub = parser.add_subparsers(dest="node_command", required=True, metavar="COMMAND")

    serve = node_sub.add_parser(
        "serve",
        help="run the Storage and Verification SCP until SIGINT or SIGTERM",
        description="Listen for associations from the allowed callers, store every received\n"
        "CR and DX instance in the spool and queue the selected ones as Celery tasks.\n"
        "Prints the AE title and port once it listens; writes its pid to\n"
        "<spool_dir>/node.pid for `coronet node reload`.",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(serve)
    serve.set_defaults(handler=_serve)

    echo_parser = node_sub.add_parser(
        "echo",
        help="send a C-ECHO to a configured destination (exit 0 if it answers Success)",
        description="Open an association with the destination DEST from the configuration "
        "(see `coronet aet list`), send a C-ECHO and print the result.  Exit 0 on Success, 1 "
        "otherwise.",
    )
    add_config_options(echo_parser)
    echo_parser.add_argument("destination", metavar="DEST", help="destination name, e.g. demo-pacs")
    echo_parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each step (default 10)"
    )
    echo_parser.set_defaults(handler=_echo)

    reload_parser = node_sub.add_parser(
        "reload",
        help="make a running node re-read its configuration (SIGHUP)",
        description="Send SIGHUP to the node whose pid is in <spool_dir>/node.pid.  Use it "
        "after `coronet aet add|remove`: new associations see the change, open ones go on.  "
        "The node re-reads its own configuration file with the --set values it was started "
        "with; to change a value, edit the file (there is no --set here).",
    )
    add_config_options(reload_parser, with_overrides=False)
    reload_parser.add_argument(
        "--pid-file", type=Path, help="pid file of the node (default: <spool_dir>/node.pid)"
    )
    reload_parser.set_defaults(handler=_signal_reload)
