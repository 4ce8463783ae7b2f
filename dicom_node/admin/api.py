"""The REST API, ``/api/v1`` (HTTP Basic, :mod:`dicom_node.admin.auth`).

* ``GET|POST /callers``, ``DELETE /callers/{ae_title}``: the allowed calling AE titles;
* ``GET|POST /destinations``, ``DELETE /destinations/{name}``,
  ``POST /destinations/{name}/echo``: where results go, and a C-ECHO to test one;
* ``GET /studies``, ``GET /studies/{key}``, ``POST /studies/{key}/retry``: recent studies and
  their state (:mod:`dicom_node.admin.studies`), and sending a study's dead letters again.

Bodies use the configuration's own field names.  A change is validated like ``coronet aet``
(422 naming the field; 409 for a duplicate, 404 for an unknown name), written to the
configuration file (comments kept, atomic), audited, and applied: callers at once by the node,
destinations by the workers before their next task (they re-read the file when it changes).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from dicom_node.admin.auth import api_user, client_address, json_body, services_of
from dicom_node.admin.config_edits import Actor
from dicom_node.admin.services import AdminServices
from dicom_node.admin.studies import make_pending_again, recent_studies, study_view
from dicom_node.core.errors import ConfigError, IngestError
from dicom_node.core.settings import Destination
from dicom_node.core.spool import check_key

router = APIRouter(prefix="/api/v1", dependencies=[Depends(api_user)])
User = Annotated[str, Depends(api_user)]


class CallerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ae_title: str
    host: str | None = None


class TLSBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None


class DestinationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    ae_title: str
    host: str
    port: int
    tls: TLSBody | None = None


def config_error_response(err: ConfigError) -> JSONResponse:
    """422 with FastAPI's error shape, naming each field; 409 duplicate; 404 not found."""
    reasons = [reason for _, reason in err.problems]
    if "duplicate" in reasons:
        return JSONResponse({"detail": str(err)}, status_code=409)
    if "not found" in reasons:
        return JSONResponse({"detail": str(err)}, status_code=404)
    if "not writable" in reasons:
        return JSONResponse({"detail": str(err)}, status_code=409)
    detail = [
        {"loc": ["body", path.split(".")[-1]], "field": path, "msg": reason, "type": "value_error"}
        for path, reason in err.problems
    ] or [{"loc": ["body"], "field": "", "msg": str(err), "type": "value_error"}]
    return JSONResponse({"detail": detail}, status_code=422)


def _actor(request: Request, user: str) -> Actor:
    return Actor(user, client_address(request))


def _caller_json(services: AdminServices) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json") for c in services.settings.callers]


def destination_json(destination: Destination) -> dict[str, Any]:
    data: dict[str, Any] = destination.model_dump(mode="json", exclude_none=False)
    return data


@router.get("/callers")
def list_callers(request: Request) -> list[dict[str, Any]]:
    return _caller_json(services_of(request))


@router.post("/callers", status_code=201, dependencies=[Depends(json_body)])
def add_caller(body: CallerBody, request: Request, user: User) -> Any:
    services = services_of(request)
    try:
        services.editor.add_caller(_actor(request, user), body.ae_title, body.host)
        settings = services.reload()
    except ConfigError as err:
        return config_error_response(err)
    caller = settings.caller(body.ae_title)
    return caller.model_dump(mode="json") if caller is not None else body.model_dump()


@router.delete("/callers/{ae_title}", status_code=204)
def remove_caller(ae_title: str, request: Request, user: User) -> Response:
    services = services_of(request)
    try:
        services.editor.remove_caller(_actor(request, user), ae_title)
        services.reload()
    except ConfigError as err:
        return config_error_response(err)
    return Response(status_code=204)


@router.get("/destinations")
def list_destinations(request: Request) -> list[dict[str, Any]]:
    return [destination_json(d) for d in services_of(request).settings.destinations]


@router.post("/destinations", status_code=201, dependencies=[Depends(json_body)])
def add_destination(body: DestinationBody, request: Request, user: User) -> Any:
    services = services_of(request)
    tls = body.tls.model_dump(exclude_none=True) if body.tls is not None else None
    try:
        services.editor.add_destination(
            _actor(request, user), body.name, body.ae_title, body.host, body.port, tls or None
        )
        settings = services.reload()
        return destination_json(settings.destination(body.name))
    except ConfigError as err:
        return config_error_response(err)


@router.delete("/destinations/{name}", status_code=204)
def remove_destination(name: str, request: Request, user: User) -> Response:
    services = services_of(request)
    try:
        services.editor.remove_destination(_actor(request, user), name)
        services.reload()
    except ConfigError as err:
        return config_error_response(err)
    return Response(status_code=204)


@router.post("/destinations/{name}/echo", dependencies=[Depends(json_body)])
def echo_destination(name: str, request: Request) -> dict[str, Any]:
    services = services_of(request)
    try:
        ok, message = services.echo(services.settings, name)
    except ConfigError as err:
        raise HTTPException(status_code=404, detail=str(err)) from err
    return {"ok": ok, "message": message}


@router.get("/studies")
def list_studies(
    request: Request, limit: Annotated[int | None, Query(ge=1, le=10_000)] = None
) -> list[dict[str, Any]]:
    services = services_of(request)
    settings = services.settings
    views = recent_studies(
        services.node.spool,
        services.outbox,
        settings.destinations,
        limit=limit or settings.admin.recent_studies,
        show_patient_name=settings.admin.show_patient_name,
    )
    return [v.to_json() for v in views]


def _study_key(key: str) -> str:
    try:
        return check_key(key)
    except IngestError as err:
        raise HTTPException(status_code=404, detail=f"no study {key}") from err


@router.get("/studies/{key}")
def get_study(key: str, request: Request) -> dict[str, Any]:
    services = services_of(request)
    settings = services.settings
    try:
        view = study_view(
            services.node.spool,
            services.outbox,
            _study_key(key),
            settings.destinations,
            show_patient_name=settings.admin.show_patient_name,
        )
    except IngestError as err:
        raise HTTPException(status_code=404, detail=f"no study {key}") from err
    return view.to_json()


def retry_study(services: AdminServices, study_key: str) -> list[str]:
    """Make the study's dead letters pending and queue the study; return what was retried."""
    settings = services.settings
    retried = make_pending_again(
        services.node.spool, services.outbox, study_key, settings.destinations
    )
    services.node.queue.schedule(study_key)
    return retried


@router.post("/studies/{key}/retry", dependencies=[Depends(json_body)])
def retry(key: str, request: Request) -> dict[str, Any]:
    services = services_of(request)
    study_key = _study_key(key)
    if study_key not in services.node.spool.study_keys():
        raise HTTPException(status_code=404, detail=f"no study {key} in the spool")
    retried = retry_study(services, study_key)
    return {"study": study_key, "retried": retried, "queued": True}


__all__ = ["config_error_response", "retry_study", "router"]
