"""The web console: ``GET /`` and plain HTML forms, rendered on the server (Jinja2), no
JavaScript and no build step.

It shows the node and its health, the allowed callers and the destinations (add, remove,
C-ECHO), the queue, the recent studies with their state, and the dead letters with a retry
button.  Every form posts, is checked for the session's CSRF token, and redirects back to
``/`` with a one-line message (post/redirect/get).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Final

import redis
from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from dicom_node.admin.api import retry_study
from dicom_node.admin.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
    Sessions,
    audit_login,
    check_csrf,
    client_address,
    services_of,
)
from dicom_node.admin.config_edits import Actor
from dicom_node.admin.health import run_checks
from dicom_node.admin.studies import recent_studies
from dicom_node.core.errors import ConfigError, IngestError
from dicom_node.core.spool import check_key
from dicom_node.core.telemetry import WORKERS_KEY

HERE: Final = Path(__file__).resolve().parent
TEMPLATES: Final = Jinja2Templates(directory=str(HERE / "templates"))
FLASH_COOKIE: Final = "coronet_flash"

router = APIRouter()
FormText = Annotated[str, Form()]


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=_sessions(request).secure,
        path="/",
    )


def _back(request: Request, message: str, ok: bool = True) -> RedirectResponse:
    response = RedirectResponse("/", status_code=303)
    flash = ("ok:" if ok else "error:") + message
    _cookie(response, request, FLASH_COOKIE, urllib.parse.quote(flash[:500]), 60)
    return response


def _login_page(request: Request, error: str | None = None, status: int = 200) -> Response:
    token, cookie = _sessions(request).login_token()
    response = TEMPLATES.TemplateResponse(
        request,
        "login.html",
        {"login_csrf": token, "error": error, "user": None, "flash": None},
        status_code=status,
    )
    _cookie(response, request, LOGIN_COOKIE, cookie, 3600)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return _login_page(request)


@router.post("/login")
def login(
    request: Request,
    username: FormText = "",
    password: FormText = "",
    csrf: FormText = "",
) -> Response:
    sessions = _sessions(request)
    if not sessions.check_login_token(request, csrf):
        return _login_page(request, "The form expired; please try again.", 400)
    if not services_of(request).users.verify(username, password):
        audit_login(request, username or "-", False, why="console: wrong user name or password")
        return _login_page(request, "Wrong user name or password.", 401)
    audit_login(request, username, True)
    value, _ = sessions.issue(username)
    response = RedirectResponse("/", status_code=303)
    _cookie(response, request, SESSION_COOKIE, value, sessions.max_age)
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, csrf: FormText = "") -> Response:
    session = _sessions(request).read(request)
    if session is not None and check_csrf(session, csrf):
        audit_login(request, session.user, True, logout=True)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _queue_state(request: Request) -> dict[str, Any]:
    services = services_of(request)
    state: dict[str, Any] = {
        "published": services.node.queue.published,
        "depth": None,
        "workers": None,
    }
    try:
        client = services.redis()
        state["depth"] = int(client.llen(services.settings.broker.queue))
        state["workers"] = int(client.zcard(WORKERS_KEY))
    except redis.exceptions.RedisError:
        pass
    return state


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> Response:
    session = _sessions(request).read(request)
    if session is None:
        return RedirectResponse("/login", status_code=303)
    services = services_of(request)
    settings = services.settings
    flash_raw = urllib.parse.unquote(request.cookies.get(FLASH_COOKIE, ""))
    kind, _, flash = flash_raw.partition(":")
    studies = recent_studies(
        services.node.spool,
        services.outbox,
        settings.destinations,
        limit=settings.admin.recent_studies,
        show_patient_name=settings.admin.show_patient_name,
    )
    response = TEMPLATES.TemplateResponse(
        request,
        "index.html",
        {
            "user": session.user,
            "csrf": session.csrf,
            "settings": settings,
            "checks": run_checks(services),
            "queue": _queue_state(request),
            "studies": studies,
            "flash": flash or None,
            "flash_kind": "error" if kind == "error" else "ok",
        },
    )
    response.headers["Cache-Control"] = "no-store"
    if flash_raw:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def _authorised(request: Request, csrf: str) -> Session | None:
    session = _sessions(request).read(request)
    if session is None or not check_csrf(session, csrf):
        return None
    return session


def _denied() -> Response:
    return RedirectResponse("/login", status_code=303)


def _actor(request: Request, session: Session) -> Actor:
    return Actor(session.user, client_address(request))


def _problem(err: ConfigError) -> str:
    if err.problems and not any(r in ("duplicate", "not found") for _, r in err.problems):
        return "; ".join(f"{path}: {reason}" for path, reason in err.problems)
    return str(err).splitlines()[0]


@router.post("/console/callers")
def add_caller(
    request: Request, ae_title: FormText = "", host: FormText = "", csrf: FormText = ""
) -> Response:
    session = _authorised(request, csrf)
    if session is None:
        return _denied()
    services = services_of(request)
    try:
        services.editor.add_caller(_actor(request, session), ae_title, host.strip() or None)
        services.reload()
    except ConfigError as err:
        return _back(request, f"Caller not added: {_problem(err)}", ok=False)
    return _back(request, f"Caller {ae_title.strip()} added; it may associate now.")


@router.post("/console/callers/{ae_title}/remove")
def remove_caller(ae_title: str, request: Request, csrf: FormText = "") -> Response:
    session = _authorised(request, csrf)
    if session is None:
        return _denied()
    services = services_of(request)
    try:
        services.editor.remove_caller(_actor(request, session), ae_title)
        services.reload()
    except ConfigError as err:
        return _back(request, f"Caller not removed: {_problem(err)}", ok=False)
    return _back(request, f"Caller {ae_title} removed.")


@router.post("/console/destinations")
def add_destination(
    request: Request,
    name: FormText = "",
    ae_title: FormText = "",
    host: FormText = "",
    port: FormText = "",
    csrf: FormText = "",
) -> Response:
    session = _authorised(request, csrf)
    if session is None:
        return _denied()
    services = services_of(request)
    try:
        number = int(port)
    except ValueError:
        return _back(request, "Destination not added: port must be a number", ok=False)
    try:
        services.editor.add_destination(
            _actor(request, session), name.strip(), ae_title, host.strip(), number, None
        )
        services.reload()
    except ConfigError as err:
        return _back(request, f"Destination not added: {_problem(err)}", ok=False)
    return _back(
        request, f"Destination {name.strip()} added; workers use it from their next study."
    )


@router.post("/console/destinations/{name}/remove")
def remove_destination(name: str, request: Request, csrf: FormText = "") -> Response:
    session = _authorised(request, csrf)
    if session is None:
        return _denied()
    services = services_of(request)
    try:
        services.editor.remove_destination(_actor(request, session), name)
        services.reload()
    except ConfigError as err:
        return _back(request, f"Destination not removed: {_problem(err)}", ok=False)
    return _back(request, f"Destination {name} removed.")


@router.post("/console/destinations/{name}/echo")
def echo(name: str, request: Request, csrf: FormText = "") -> Response:
    if _authorised(request, csrf) is None:
        return _denied()
    services = services_of(request)
    try:
        ok, message = services.echo(services.settings, name)
    except ConfigError as err:
        return _back(request, str(err), ok=False)
    return _back(request, message, ok=ok)


@router.post("/console/studies/{key}/retry")
def retry(key: str, request: Request, csrf: FormText = "") -> Response:
    if _authorised(request, csrf) is None:
        return _denied()
    services = services_of(request)
    try:
        study_key = check_key(key)
    except IngestError:
        return _back(request, "No such study.", ok=False)
    if study_key not in services.node.spool.study_keys():
        return _back(request, "The study is not in the spool.", ok=False)
    retried = retry_study(services, study_key)
    return _back(
        request, f"Study {study_key[:12]} queued again ({len(retried)} dead letters cleared)."
    )


__all__ = ["TEMPLATES", "router"]
