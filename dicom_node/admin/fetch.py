"""``/fetch/v1``: the node's spool served to workers on other hosts (:mod:`dicom_node.core.fetch`).

No login: each request carries the ticket of its task's study, signed with the node's secret;
a tampered, foreign or expired ticket is refused (403) and audited as a failed login.  An
instance sent to a worker is audited as instances transferred (PS3.15 A.5.3.4), one message
per fetch.  A worker's report marks instances done in the spool and records its dead letters
in the node's outbox, so the console shows them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from dicom_node.admin.auth import client_address, services_of
from dicom_node.admin.services import AdminServices
from dicom_node.core import audit
from dicom_node.core.errors import REASON_MAX, IngestError
from dicom_node.core.fetch import (
    DIGEST_HEADER,
    MAX_REPORT_BYTES,
    PATH_PREFIX,
    TICKET_PARAM,
    TicketRefused,
    TicketSigner,
    digest_header,
)
from dicom_node.core.spool import check_key

logger = logging.getLogger(__name__)

router = APIRouter(prefix=PATH_PREFIX, include_in_schema=False)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HASH_CHUNK = 1 << 20

Ticket = Annotated[str, Query(alias=TICKET_PARAM, max_length=2048)]


def _checked(request: Request, study_key: str, ticket: str) -> AdminServices:
    """The services, once ``study_key`` is a key and ``ticket`` grants it; 404/403 otherwise."""
    services = services_of(request)
    try:
        check_key(study_key)
    except IngestError as err:
        raise HTTPException(status_code=404, detail="no such study") from err
    signer = TicketSigner(services.secret, services.settings.fetch.url_ttl)
    try:
        signer.check(ticket, study_key)
    except TicketRefused as err:
        services.audit_trail.record(
            audit.authentication(
                "worker",
                client_address(request),
                f"{services.settings.node.ae_title} fetch",
                outcome=audit.MINOR_FAILURE,
                why=str(err),
            )
        )
        logger.warning("fetch of study %s refused: %s", study_key, err)
        raise HTTPException(status_code=403, detail=str(err)) from err
    return services


@router.get("/studies/{study_key}")
def study(request: Request, study_key: str, ticket: Ticket = "") -> JSONResponse:
    spool = _checked(request, study_key, ticket).node.spool
    try:
        records = spool.instances(study_key)
        lost = spool.lost_instances(study_key)
    except IngestError as err:
        raise HTTPException(status_code=404, detail="no such study") from err
    body = {
        "format": 1,
        "study_key": study_key,
        "instances": [
            {
                "instance_key": r.instance_key,
                "selected": r.selected,
                "done": r.done,
                "bytes": r.bytes,
                "received": r.received,
            }
            for r in records
        ],
        "lost": lost,
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.digest()


@router.get("/studies/{study_key}/instances/{instance_key}")
def instance(
    request: Request, study_key: str, instance_key: str, ticket: Ticket = ""
) -> FileResponse:
    services = _checked(request, study_key, ticket)
    spool = services.node.spool
    try:
        path = spool.instance_path(study_key, check_key(instance_key))
        sha256 = _sha256(path)
    except (IngestError, OSError) as err:
        raise HTTPException(status_code=404, detail="no such instance") from err
    _audit_sent(services, request, study_key, instance_key)
    return FileResponse(
        path,
        media_type="application/dicom",
        headers={DIGEST_HEADER: digest_header(sha256), "Cache-Control": "no-store"},
    )


def _audit_sent(
    services: AdminServices, request: Request, study_key: str, instance_key: str
) -> None:
    if not services.audit_trail.enabled:
        return
    spool = services.node.spool
    try:
        study_uid = spool.study_uid(study_key)
        patient_id = spool.study_info(study_key).get("patient_id")
        sop_class = next(
            (r.sop_class_uid for r in spool.instances(study_key) if r.instance_key == instance_key),
            None,
        )
    except IngestError as err:
        logger.warning("study %s: no audit message for a fetch: %s", study_key, err)
        return
    services.audit_trail.record(
        audit.instances_transferred(
            audit.Participant(services.settings.node.ae_title, False, audit.SOURCE),
            audit.Participant("worker", True, audit.DESTINATION, client_address(request)),
            study_uid,
            patient_id,
            {sop_class or "unknown": 1},
        )
    )


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_REPORT_BYTES):
        raise HTTPException(status_code=413, detail="report too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REPORT_BYTES:
            raise HTTPException(status_code=413, detail="report too large")
    try:
        return json.loads(body)
    except ValueError as err:
        raise HTTPException(status_code=400, detail="the report is not JSON") from err


def _report_items(data: Any) -> tuple[list[str], dict[str, str]]:
    if not isinstance(data, dict):
        raise HTTPException(status_code=400, detail="the report must be an object")
    done, dead = data.get("done", []), data.get("dead", {})
    if not isinstance(done, list) or not isinstance(dead, dict):
        raise HTTPException(status_code=400, detail="done must be a list and dead an object")
    try:
        keys = [check_key(k) for k in done]
        reasons = {check_key(k): _CONTROL.sub(" ", str(v))[:REASON_MAX] for k, v in dead.items()}
    except IngestError as err:
        raise HTTPException(status_code=400, detail=str(err)) from err
    return keys, reasons


def _record(services: AdminServices, study_key: str, done: list[str], dead: dict[str, str]) -> None:
    spool = services.node.spool
    spool.study_uid(study_key)  # IngestError when the study is gone
    outbox = services.outbox
    for instance_key, reason in dead.items():
        outbox.dead_letter_source(study_key, instance_key, reason)
    spool.mark_done(study_key, [*done, *dead])


@router.post("/studies/{study_key}/report")
async def report(request: Request, study_key: str, ticket: Ticket = "") -> JSONResponse:
    services = _checked(request, study_key, ticket)
    done, dead = _report_items(await _json_body(request))
    try:
        await run_in_threadpool(_record, services, study_key, done, dead)
    except IngestError as err:
        raise HTTPException(status_code=404, detail="no such study") from err
    logger.info(
        "study %s: a worker finished %d instances (%d dead-lettered)",
        study_key,
        len(done) + len(dead),
        len(dead),
    )
    return JSONResponse({"done": len(done) + len(dead)})


__all__ = ["router"]
