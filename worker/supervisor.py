"""``coronet run``: the whole system on one machine, on loopback, for a demo or a small site.

Started in this order, each waited for by polling (never a fixed sleep):

1. ``redis-server`` on 127.0.0.1 (a free port unless ``--redis-port``), append-only file on,
   data in ``<var>/redis``;
2. a demo Orthanc PACS (unless ``--no-orthanc``) on 127.0.0.1, ports 4242/8042 when free, else
   free ones; configuration written to ``<var>/orthanc/orthanc.json``, storage in
   ``<var>/orthanc/db``, and ``configs/orthanc/autoroute.lua``, which forwards CR and DX (never
   our SR and SC) to the node;
3. ``coronet node serve`` and 4. ``coronet worker``, child processes reading one effective
   configuration, ``<var>/run/coronet.yaml``: the given file and overrides, with the broker URL
   pointed at our Redis and, with Orthanc, the destinations replaced by the demo Orthanc and
   Orthanc allowed as a caller.

``<var>/run/state.json`` records the addresses (``coronet demo send`` reads it) while it runs.
SIGINT or SIGTERM stops the worker (it finishes its current task), the node, Orthanc and Redis,
in that order; if any child exits on its own, everything is stopped and the exit status is 1.
Logs: ``<var>/log/{redis,orthanc,node,worker}.log``; node and worker lines are also echoed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

import yaml

from dicom_node.config import Settings, load_settings, settings_from_data
from dicom_node.errors import ConfigError, CoronetError

logger = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
ORTHANC_BINARY: Final = "/usr/sbin/Orthanc"
REDIS_BINARY: Final = "redis-server"
ORTHANC_MODALITY: Final = "coronet"
"""Name of the node in Orthanc's ``DicomModalities``; the Lua script routes to it."""
DEMO_DESTINATION: Final = "demo-pacs"
DEFAULT_ORTHANC_AET: Final = "ORTHANC"
PREFERRED_ORTHANC_PORTS: Final = (4242, 8042)
LUA_SCRIPT: Final = Path("configs/orthanc/autoroute.lua")
READY_TIMEOUT_S: Final = 180.0
STOP_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.1
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class RunOptions:
    """What ``coronet run`` was asked for."""

    config: Path
    overrides: list[str] = field(default_factory=list)
    orthanc: bool = True
    var_dir: Path = Path("var")
    redis_port: int | None = None
    worker_args: list[str] = field(default_factory=list)


class SupervisorError(CoronetError):
    """A part of the system did not start, or stopped on its own."""


# --------------------------------------------------------------------------- small helpers


def port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _pick_port(preferred: int, taken: set[int]) -> int:
    port = preferred if preferred not in taken and port_free(preferred) else free_port()
    while port in taken:
        port = free_port()
    taken.add(port)
    return port


def lua_script_path() -> Path:
    """The auto-routing script: next to the sources (checkout) or under the current folder."""
    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        candidate = base / LUA_SCRIPT
        if candidate.is_file():
            return candidate
    raise ConfigError(f"cannot find {LUA_SCRIPT} (run from the repository root)")


def _wait_for(
    probe: Callable[[], bool], what: str, alive: Callable[[], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if not alive():
            raise SupervisorError(f"{what} exited while starting")
        if time.monotonic() > deadline:
            raise SupervisorError(f"{what} not ready after {timeout:g} s")
        time.sleep(POLL_S)


def _http_ok(url: str) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _tcp_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Plan:
    """Ports, folders and the effective configuration of one ``coronet run``."""

    settings: Settings
    config_path: Path
    var_dir: Path
    redis_port: int
    orthanc_aet: str | None
    orthanc_dicom_port: int | None
    orthanc_http_port: int | None

    @property
    def broker_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    @property
    def orthanc_web(self) -> str | None:
        if self.orthanc_http_port is None:
            return None
        return f"http://{LOOPBACK}:{self.orthanc_http_port}/app/explorer.html"


def effective_data(
    settings: Settings,
    broker_url: str,
    orthanc: tuple[str, int] | None,
) -> dict[str, Any]:
    """The configuration the children read: our broker and, with Orthanc, our demo PACS."""
    data = settings.model_dump(mode="json")
    data["broker"]["url"] = broker_url
    if orthanc is not None:
        aet, port = orthanc
        data["destinations"] = [
            {"name": DEMO_DESTINATION, "ae_title": aet, "host": LOOPBACK, "port": port}
        ]
        callers = [c for c in data["callers"] if c["ae_title"] != aet]
        data["callers"] = [*callers, {"ae_title": aet, "host": LOOPBACK}]
    return data


def make_plan(options: RunOptions) -> Plan:
    """Load the configuration, choose ports and write the effective configuration."""
    settings = load_settings(options.config, options.overrides)
    var_dir = options.var_dir
    for sub in ("run", "log", "redis"):
        (var_dir / sub).mkdir(parents=True, exist_ok=True)
    taken = {settings.node.port}
    redis_port = options.redis_port or free_port()
    while redis_port in taken:
        redis_port = free_port()
    taken.add(redis_port)
    orthanc_aet = dicom_port = http_port = None
    if options.orthanc:
        orthanc_aet = (
            settings.destinations[0].ae_title if settings.destinations else DEFAULT_ORTHANC_AET
        )
        dicom_port = _pick_port(PREFERRED_ORTHANC_PORTS[0], taken)
        http_port = _pick_port(PREFERRED_ORTHANC_PORTS[1], taken)
    broker_url = f"redis://{LOOPBACK}:{redis_port}/0"
    orthanc = (orthanc_aet, dicom_port) if orthanc_aet and dicom_port else None
    data = effective_data(settings, broker_url, orthanc)
    config_path = var_dir / "run" / "coronet.yaml"
    effective = settings_from_data(data, str(config_path))
    header = f"# Written by `coronet run` from {options.config}; edit that file instead.\n"
    config_path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return Plan(effective, config_path, var_dir, redis_port, orthanc_aet, dicom_port, http_port)


def orthanc_configuration(plan: Plan, lua: Path) -> dict[str, Any]:
    """Orthanc's JSON configuration for the demo PACS (loopback HTTP, Lua auto-routing)."""
    node = plan.settings.node
    storage = (plan.var_dir / "orthanc" / "db").resolve()
    return {
        "Name": "CoroNet demo PACS",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [],
        "LuaScripts": [str(lua.resolve())],
        "HttpServerEnabled": True,
        "HttpPort": plan.orthanc_http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": True,
        "HttpDescribeErrors": True,
        "DicomServerEnabled": True,
        "DicomAet": plan.orthanc_aet,
        "DicomPort": plan.orthanc_dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {ORTHANC_MODALITY: [node.ae_title, LOOPBACK, node.port]},
        "StableAge": 2,
        "ConcurrentJobs": 2,
        "SaveJobs": False,
    }


# --------------------------------------------------------------------------- children


class Child:
    """One supervised process; its output goes to a log file (and optionally to our stdout)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        echo: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._log: IO[str] = log_path.open("a", encoding="utf-8")
        self.process = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        self._echo = echo
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            with self._lock:
                self.lines.append(line)
            if self._echo:
                sys.stdout.write(f"[{self.name}] {line}")
                sys.stdout.flush()

    def tail(self, count: int) -> list[str]:
        with self._lock:
            return self.lines[-count:]

    def saw(self, text: str) -> int:
        with self._lock:
            return sum(1 for line in self.lines if text in line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Signal the process, wait, and kill its whole process group if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %g s; killing it", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT_S)
        # Pool processes of a worker live in its process group: none may outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._reader.join(timeout=5)
        self._log.close()
        return self.process.returncode


def _child_env() -> dict[str, str]:
    """Our environment without CORONET_* overrides (already in the effective config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORONET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _coronet(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicom_node.cli", *args]


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
        import redis

        client = redis.Redis(host=LOOPBACK, port=plan.redis_port, socket_connect_timeout=0.5)

        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False

        try:
            _wait_for(ping, "redis-server", self._alive_or_stopping("redis"), READY_TIMEOUT_S)
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
        _wait_for(
            lambda: _http_ok(url) and _tcp_open(dicom_port),
            "Orthanc",
            self._alive_or_stopping("orthanc"),
            READY_TIMEOUT_S,
        )

    def _start_node(self, plan: Plan, log_dir: Path) -> None:
        argv = _coronet("-v", "node", "serve", "--config", str(plan.config_path))
        self.children["node"] = Child(
            "node", argv, log_dir / "node.log", echo=True, env=_child_env()
        )
        node = self.children["node"]
        _wait_for(
            lambda: node.saw("listening on") > 0,
            "the node",
            self._alive_or_stopping("node"),
            READY_TIMEOUT_S,
        )

    def _start_worker(self, plan: Plan, log_dir: Path) -> None:
        argv = _coronet(
            "worker",
            "--config",
            str(plan.config_path),
            f"--hostname={self.worker_name}",
            *self.options.worker_args,
        )
        self.children["worker"] = Child(
            "worker", argv, log_dir / "worker.log", echo=True, env=_child_env()
        )
        worker = self.children["worker"]
        _wait_for(
            lambda: worker.saw("loaded on") > 0 and self._worker_answers(plan),
            "the worker",
            self._alive_or_stopping("worker"),
            READY_TIMEOUT_S,
        )

    def _worker_answers(self, plan: Plan) -> bool:
        from celery import Celery

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


# --------------------------------------------------------------------------- demo send


def _demo_target(
    var_dir: Path, host: str | None, port: int | None, aet: str | None
) -> tuple[str, int, str]:
    state: dict[str, Any] = {}
    path = var_dir / "run" / "state.json"
    if port is None or aet is None:
        try:
            state = json.loads(path.read_text(encoding="utf-8")).get("orthanc") or {}
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"no running `coronet run` with a demo Orthanc found ({path}: {err}); "
                "give --port and --aet"
            ) from err
        if not state:
            raise ConfigError("`coronet run` runs without Orthanc; give --port and --aet")
    return (
        host or str(state.get("host", LOOPBACK)),
        int(port if port is not None else state["dicom_port"]),
        aet or str(state["aet"]),
    )


def sample_radiograph() -> Path:
    """RG1_UNCR.dcm, a real adult PA chest CR from pydicom-data."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if not isinstance(path, str):
        raise ConfigError("pydicom-data is not installed: pip install pydicom-data")
    return Path(path)


def send_demo(
    *,
    files: Sequence[Path],
    var_dir: Path,
    host: str | None,
    port: int | None,
    called_aet: str | None,
    calling_aet: str,
    keep_uids: bool,
) -> tuple[bool, str]:
    """C-STORE ``files`` (default: RG1) into the demo PACS; return (ok, report)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
    from pynetdicom import AE

    target_host, target_port, target_aet = _demo_target(var_dir, host, port, called_aet)
    paths = list(files) or [sample_radiograph()]
    datasets = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err
        if not keep_uids:
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append((path, ds))
    ae = AE(ae_title=calling_aet)
    for _, ds in datasets:
        syntaxes = [str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian]
        syntaxes.append(ImplicitVRLittleEndian)
        ae.add_requested_context(str(ds.SOPClassUID), list(dict.fromkeys(syntaxes)))
    where = f"{target_aet} at {target_host}:{target_port}"
    assoc = ae.associate(target_host, target_port, ae_title=target_aet)
    if not assoc.is_established:
        return False, f"cannot associate with {where}"
    lines, ok = [], True
    try:
        for path, ds in datasets:
            response = assoc.send_c_store(ds)
            status = int(response.Status) if response and "Status" in response else None
            ok = ok and status == 0
            shown = "no response" if status is None else f"0x{status:04X}"
            lines.append(f"sent {path.name} to {where}: {shown}")
    finally:
        assoc.release()
    if ok:
        lines.append(
            "Orthanc routes it to the node; the SR and the heatmap appear in the same study "
            "within a few seconds (CPU: the heatmap takes longest)."
        )
    return ok, "\n".join(lines)


__all__ = [
    "Plan",
    "RunOptions",
    "Supervisor",
    "effective_data",
    "make_plan",
    "orthanc_configuration",
    "run",
    "send_demo",
    "summary",
]
