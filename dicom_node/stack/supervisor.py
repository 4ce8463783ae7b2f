"""``coronet run``: the whole system on one machine, on loopback, for a demo or a small site.

Started in this order, each waited for by polling (never a fixed sleep):

1. ``redis-server`` on 127.0.0.1 (a free port unless ``--redis-port``), append-only file on,
   data in ``<var>/redis``;
2. a demo Orthanc PACS (unless ``--no-orthanc``) on 127.0.0.1, ports 4242/8042 when free, else
   free ones; configuration written to ``<var>/orthanc/orthanc.json``, storage in
   ``<var>/orthanc/db``, and ``configs/orthanc/autoroute.lua``, which forwards CR and DX (never
   our SR and SC) to the node;
3. ``coronet node serve`` and 4. ``coronet worker``, child processes reading the effective
   configuration of :mod:`dicom_node.stack.plan`.

``<var>/run/state.json`` records the addresses (``coronet demo send`` reads it) while it runs.
SIGINT or SIGTERM stops the worker (it finishes its current task), the node, Orthanc and Redis,
in that order; if any child exits on its own, everything is stopped and the exit status is 1.
Logs: ``<var>/log/{redis,orthanc,node,worker}.log``; node and worker lines are also echoed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import redis
from celery import Celery

from dicom_node.stack.children import (
    Child,
    SupervisorError,
    child_env,
    coronet_argv,
    http_ok,
    tcp_open,
    wait_for,
)
from dicom_node.stack.plan import (
    LOOPBACK,
    Plan,
    RunOptions,
    lua_script_path,
    make_plan,
    orthanc_configuration,
)

logger = logging.getLogger(__name__)

ORTHANC_BINARY: Final = "/usr/sbin/Orthanc"
REDIS_BINARY: Final = "redis-server"
READY_TIMEOUT_S: Final = 180.0


class Supervisor:
    """Starts and stops Redis, Orthanc, the node and the worker (see the module docstring)."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.plan: Plan | None = None
        self.children: dict[str, Child] = {}
        self.stop_requested = threading.Event()
        self.worker_name = f"coronet-run-{os.getpid()}@{socket.gethostname()}"

    @property
    def state_path(self) -> Path:
        return self.options.var_dir / "run" / "state.json"

    def _alive_or_stopping(self, name: str) -> Callable[[], bool]:
        def alive() -> bool:
            if self.stop_requested.is_set():
                raise SupervisorError("stopped while starting")
            child = self.children[name]
            if child.alive():
                return True
            tail = "".join(child.tail(15))
            raise SupervisorError(f"{name} exited while starting; its last output:\n{tail}")

        return alive

    def start(self) -> Plan:
        plan = self.plan = make_plan(self.options)
        log_dir = plan.var_dir / "log"
        self._start_redis(plan, log_dir)
        if plan.orthanc_aet is not None:
            self._start_orthanc(plan, log_dir)
        self._start_node(plan, log_dir)
        self._start_worker(plan, log_dir)
        self._write_state(plan)
        return plan

    def _start_redis(self, plan: Plan, log_dir: Path) -> None:
        if shutil.which(REDIS_BINARY) is None:
            raise SupervisorError("redis-server is not installed (make system-deps)")
        data_dir = (plan.var_dir / "redis").resolve()
        argv = [
            REDIS_BINARY,
            *("--bind", LOOPBACK, "--port", str(plan.redis_port)),
            *("--dir", str(data_dir), "--appendonly", "yes", "--save", ""),
            *("--protected-mode", "yes", "--logfile", ""),
        ]
        self.children["redis"] = Child("redis", argv, log_dir / "redis.log")
        client = redis.Redis(host=LOOPBACK, port=plan.redis_port, socket_connect_timeout=0.5)

        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False

        try:
            wait_for(ping, "redis-server", self._alive_or_stopping("redis"), READY_TIMEOUT_S)
        finally:
            client.close()

    def _start_orthanc(self, plan: Plan, log_dir: Path) -> None:
        binary = ORTHANC_BINARY if Path(ORTHANC_BINARY).exists() else shutil.which("Orthanc")
        if binary is None:
            raise SupervisorError("Orthanc is not installed (make system-deps, or --no-orthanc)")
        folder = plan.var_dir / "orthanc"
        (folder / "db").mkdir(parents=True, exist_ok=True)
        config_path = folder / "orthanc.json"
        config = orthanc_configuration(plan, lua_script_path())
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        self.children["orthanc"] = Child(
            "orthanc", [binary, str(config_path.resolve())], log_dir / "orthanc.log"
        )
        assert plan.orthanc_http_port is not None and plan.orthanc_dicom_port is not None
        url = f"http://{LOOPBACK}:{plan.orthanc_http_port}/system"
        dicom_port = plan.orthanc_dicom_port
        wait_for(
            lambda: http_ok(url) and tcp_open(dicom_port),
            "Orthanc",
            self._alive_or_stopping("orthanc"),
            READY_TIMEOUT_S,
        )

    def _start_node(self, plan: Plan, log_dir: Path) -> None:
        argv = coronet_argv("-v", "node", "serve", "--config", str(plan.config_path))
        self.children["node"] = Child(
            "node", argv, log_dir / "node.log", echo=True, env=child_env()
        )
        node = self.children["node"]
        wait_for(
            lambda: node.saw("listening on") > 0,
            "the node",
            self._alive_or_stopping("node"),
            READY_TIMEOUT_S,
        )

    def _start_worker(self, plan: Plan, log_dir: Path) -> None:
        argv = coronet_argv(
            "worker",
            "--config",
            str(plan.config_path),
            f"--hostname={self.worker_name}",
            *self.options.worker_args,
        )
        self.children["worker"] = Child(
            "worker", argv, log_dir / "worker.log", echo=True, env=child_env()
        )
        worker = self.children["worker"]
        wait_for(
            lambda: worker.saw("loaded on") > 0 and self._worker_answers(plan),
            "the worker",
            self._alive_or_stopping("worker"),
            READY_TIMEOUT_S,
        )

    def _worker_answers(self, plan: Plan) -> bool:
        app = Celery("coronet-run", broker=plan.broker_url, set_as_current=False)
        try:
            replies = app.control.ping(destination=[self.worker_name], timeout=1.0)
        except Exception as err:  # any broker error: not ready yet
            logger.debug("worker ping failed: %s", err)
            return False
        finally:
            app.close()
        return bool(replies)

    def _write_state(self, plan: Plan) -> None:
        node = plan.settings.node
        state: dict[str, Any] = {
            "pid": os.getpid(),
            "config": str(plan.config_path),
            "broker_url": plan.broker_url,
            "node": {"aet": node.ae_title, "host": node.host, "port": node.port},
            "worker": self.worker_name,
        }
        if plan.admin_url is not None:
            state["admin"] = {"url": plan.admin_url, "port": plan.admin_port}
        if plan.orthanc_aet is not None:
            state["orthanc"] = {
                "aet": plan.orthanc_aet,
                "host": LOOPBACK,
                "dicom_port": plan.orthanc_dicom_port,
                "http_port": plan.orthanc_http_port,
                "web": plan.orthanc_web,
            }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(tmp, self.state_path)

    def dead_child(self) -> str | None:
        """The name of a child that exited by itself, if any."""
        for name, child in self.children.items():
            if not child.alive():
                return name
        return None

    def stop(self) -> None:
        """Stop the worker, the node, Orthanc and Redis, in that order."""
        for name in ("worker", "node", "orthanc", "redis"):
            child = self.children.pop(name, None)
            if child is None:
                continue
            code = child.stop()
            print(f"stopped {name} (exit status {code})", flush=True)
        self.state_path.unlink(missing_ok=True)


def summary(plan: Plan, worker_args: Sequence[str]) -> str:
    """What ``coronet run`` prints once everything answers."""
    settings = plan.settings
    node = settings.node
    lines = [
        "CoroNet is running (not a medical device; demo weights).  Ctrl-C stops it.",
        f"  node       {node.ae_title} listening on {node.host}:{node.port} "
        f"(allowed callers: {', '.join(c.ae_title for c in settings.callers) or 'none'})",
        f"  worker     model {settings.model.bundle_dir} on {settings.model.device}; "
        f"{' '.join(worker_args)}",
        f"  broker     {plan.broker_url} (append-only data in {plan.var_dir / 'redis'})",
    ]
    if plan.admin_url is not None:
        lines += [
            f"  admin      console {plan.admin_url}  (health: {plan.admin_url}healthz, "
            f"metrics: {plan.admin_url}metrics)",
            f"             log in as a user of {settings.admin.users_file}: "
            "coronet admin user add NAME",
        ]
    if plan.orthanc_aet is not None:
        lines += [
            f"  demo PACS  Orthanc {plan.orthanc_aet} on {LOOPBACK}:{plan.orthanc_dicom_port}, "
            f"web {plan.orthanc_web}",
            f"             routes CR/DX to {node.ae_title}; results come back into the study",
        ]
    for dest in settings.destinations:
        lines.append(
            f"  results to {dest.name}: {dest.ae_title} at {dest.host}:{dest.port}"
            + (" (TLS)" if dest.tls else "")
        )
    lines += [
        f"  config     {plan.config_path}",
        f"  logs       {plan.var_dir / 'log'}/",
    ]
    if plan.orthanc_aet is not None:
        lines.append("Try it: coronet demo send   (then open the web address above)")
    return "\n".join(lines)


def run(options: RunOptions) -> int:
    """``coronet run``: start everything, wait for a signal or a failure, stop everything."""
    supervisor = Supervisor(options)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        supervisor.stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = False
    try:
        plan = supervisor.start()
        print(summary(plan, options.worker_args), flush=True)
        while not supervisor.stop_requested.wait(0.5):
            dead = supervisor.dead_child()
            if dead is not None:
                print(f"error: {dead} exited on its own; stopping everything", file=sys.stderr)
                failed = True
                break
    except SupervisorError as err:
        if not supervisor.stop_requested.is_set():
            print(f"error: {err}", file=sys.stderr)
            failed = True
    finally:
        print("stopping...", flush=True)
        supervisor.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if failed else 0
