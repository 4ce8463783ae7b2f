"""``GET /healthz``: 200 when the node, the broker, the spool and a worker are fine; 503 naming
each failed check.  No login: it tells nothing about patients or studies.

Checks: ``node`` (the DICOM listener is up), ``broker`` (Redis answers PING), ``disk`` (the
spool's file system has at least ``storage.min_free_bytes`` free, as the node requires before it
stores anything), ``spool`` (a file can be created in it), ``worker`` (a worker's heartbeat is
newer than ``admin.worker_timeout``; skipped when that is 0, unknown while the broker is down).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dicom_node.admin.services import AdminServices
from dicom_node.core.errors import ConfigError
from dicom_node.core.telemetry import read_snapshot

router = APIRouter()


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


def run_checks(services: AdminServices) -> dict[str, Check]:
    """Every check, by name (see the module docstring)."""
    settings = services.settings
    checks: dict[str, Check] = {}
    node = services.node
    checks["node"] = Check(
        node.listening,
        f"{settings.node.ae_title} listening on port {settings.node.port}"
        if node.listening
        else "the DICOM listener is down",
    )
    workers: dict[str, float] | None = None
    try:
        client = services.redis()
        client.ping()
        workers = read_snapshot(client).workers
        checks["broker"] = Check(True, "Redis answers")
    except redis.exceptions.RedisError as err:
        checks["broker"] = Check(False, f"broker down: {err}")
    full = node.ingest.below_floor()
    checks["disk"] = Check(full is None, full or f"{services.free_bytes() / 1e9:.1f} GB free")
    try:
        node.spool.prepare()
        checks["spool"] = Check(True, "writable")
    except ConfigError as err:
        checks["spool"] = Check(False, str(err))
    timeout = settings.admin.worker_timeout
    if timeout > 0:
        if workers is None:
            checks["worker"] = Check(False, "unknown: the broker is down")
        else:
            newest = max(workers.values()) if workers else None
            if newest is None:
                checks["worker"] = Check(False, "no worker seen yet")
            elif time.time() - newest > timeout:
                checks["worker"] = Check(
                    False, f"no worker seen for {time.time() - newest:.0f} s (> {timeout:g} s)"
                )
            else:
                checks["worker"] = Check(True, f"{len(workers)} seen within {timeout:g} s")
    return checks


def health_body(checks: dict[str, Check]) -> tuple[int, dict[str, Any]]:
    failed = [name for name, check in checks.items() if not check.ok]
    body: dict[str, Any] = {
        "status": "fail" if failed else "ok",
        "failed": failed,
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
    }
    return (503 if failed else 200), body


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    services: AdminServices = request.app.state.services
    status, body = health_body(run_checks(services))
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
