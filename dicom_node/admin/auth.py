"""Who may use the admin service, and how.

* The REST API (``/api/v1``) takes HTTP Basic credentials, checked against ``admin.users_file``
  (argon2).  A request that changes something must send ``Content-Type: application/json``
  (else 415): a browser form from another site cannot, so credentials a browser remembers
  cannot be used against the API by another page.  A refused login is audited.
* The console takes a login form; the session is a cookie signed with ``admin.secret_file``
  (itsdangerous), ``HttpOnly``, ``SameSite=Strict``, ``Secure`` under TLS, valid for
  ``admin.session_minutes``.  Every form that changes something carries the session's CSRF
  token; the login form carries one bound to a cookie of its own.  Logins (accepted or
  refused) and logouts are audited.
* ``/healthz`` and ``/metrics`` need no login.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from itsdangerous import BadSignature, URLSafeTimedSerializer

from dicom_node.admin.services import AdminServices
from dicom_node.core import audit

REALM: Final = "CoroNet admin"
SESSION_COOKIE: Final = "coronet_session"
LOGIN_COOKIE: Final = "coronet_login"
_basic = HTTPBasic(auto_error=False, realm=REALM)


def client_address(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def services_of(request: Request) -> AdminServices:
    services: AdminServices = request.app.state.services
    return services


def audit_login(
    request: Request, user: str, ok: bool, *, logout: bool = False, why: str | None = None
) -> None:
    services = services_of(request)
    services.audit_trail.record(
        audit.authentication(
            user,
            client_address(request),
            f"{services.settings.node.ae_title} admin",
            logout=logout,
            outcome=audit.SUCCESS if ok else audit.MINOR_FAILURE,
            why=why,
        )
    )


def api_user(
    request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]
) -> str:
    """The API's user (HTTP Basic); 401 with a challenge otherwise."""
    if credentials is not None:
        if services_of(request).users.verify(credentials.username, credentials.password):
            return credentials.username
        audit_login(request, credentials.username, False, why="API: wrong user name or password")
    raise HTTPException(
        status_code=401,
        detail="authentication required",
        headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
    )


def json_body(request: Request) -> None:
    """415 unless a changing request says its body is JSON (see the module docstring)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise HTTPException(status_code=415, detail="send Content-Type: application/json")


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str


class Sessions:
    """Signed session cookies of the console (see the module docstring)."""

    def __init__(self, secret: bytes, minutes: float, secure: bool) -> None:
        self.max_age = int(minutes * 60)
        self.secure = secure
        self._sessions = URLSafeTimedSerializer(secret, salt="coronet-console-session")
        self._logins = URLSafeTimedSerializer(secret, salt="coronet-console-login")

    def issue(self, user: str) -> tuple[str, Session]:
        session = Session(user, secrets.token_urlsafe(24))
        return self._sessions.dumps({"u": session.user, "c": session.csrf}), session

    def read(self, request: Request) -> Session | None:
        value = request.cookies.get(SESSION_COOKIE)
        if not value:
            return None
        try:
            data = self._sessions.loads(value, max_age=self.max_age)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), str):
            return None
        if data["u"] not in services_of(request).users.users():
            return None  # the user was removed
        return Session(data["u"], str(data.get("c", "")))

    def login_token(self) -> tuple[str, str]:
        """A CSRF token for the login form and the cookie value that binds it."""
        token = secrets.token_urlsafe(24)
        return token, self._logins.dumps(token)

    def check_login_token(self, request: Request, token: str) -> bool:
        value = request.cookies.get(LOGIN_COOKIE, "")
        try:
            expected = self._logins.loads(value, max_age=3600)
        except BadSignature:
            return False
        return isinstance(expected, str) and hmac.compare_digest(expected, token)


def check_csrf(session: Session, token: str) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf, token)


__all__ = [
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "Session",
    "Sessions",
    "api_user",
    "audit_login",
    "check_csrf",
    "client_address",
    "json_body",
    "services_of",
]
