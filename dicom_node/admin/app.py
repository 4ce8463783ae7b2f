"""The admin service's ASGI app, composed of routers so that a later feature adds its own:
``/healthz`` (:mod:`~dicom_node.admin.health`), ``/metrics`` (:mod:`~dicom_node.admin.metrics`),
``/api/v1`` (:mod:`~dicom_node.admin.api`), the console (:mod:`~dicom_node.admin.console`) and
``/fetch/v1``, the spool served to workers (:mod:`~dicom_node.admin.fetch`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Final

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from dicom_node import __version__
from dicom_node.admin import api, console, fetch, health, metrics
from dicom_node.admin.auth import Sessions
from dicom_node.admin.services import AdminServices

STATIC: Final = Path(__file__).resolve().parent / "static"

#: Sent with every response: no framing, no sniffing, scripts and styles only from here.
SECURITY_HEADERS: Final = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; form-action 'self'; frame-ancestors 'none'",
}


def create_app(
    services: AdminServices, extra_routers: Iterable[APIRouter] = (), *, secure: bool = False
) -> FastAPI:
    """The app for ``services``; ``secure``: served over TLS (cookies get ``Secure``)."""
    app = FastAPI(
        title="CoroNet DICOM node admin",
        version=__version__,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.services = services
    app.state.sessions = Sessions(services.secret, services.settings.admin.session_minutes, secure)
    registry = services.node.metrics.registry
    registry.register(metrics.AdminCollector(services))
    app.state.registry = registry
    routers = (health.router, metrics.router, api.router, console.router, fetch.router)
    for router in (*routers, *extra_routers):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return app


__all__ = ["create_app"]
