"""The OHIF viewer for tests: its prebuilt ``dist/``, its configuration and a loopback web server.

``make ohif`` (a prerequisite of ``make test``) unpacks the npm package ``@ohif/app`` at
:data:`OHIF_VERSION`, whose tarball ships a prebuilt ``dist/``, into a cache folder outside the
repository: ``$OHIF_DIST`` when set, else ``$XDG_CACHE_HOME/coronet/ohif/<version>/dist``
(``~/.cache`` without ``XDG_CACHE_HOME``).  Nothing is built and nothing is fetched at run time.

Usage::

    with running_orthanc(tmp_path / "pacs", extra_config=dicomweb_config()) as pacs:
        with serving_ohif(pacs, tmp_path / "web") as viewer:
            url = viewer.study_url(study_uid, series_uid)
            ...  # open it in tests.support.browser.headless_chromium
            boxes = annotation_boxes(driver)      # the SR's labels and the viewport
            covers = overlays_over(driver, box)   # viewer overlays over an image region

:func:`serving_ohif` serves ``dist/`` on a free loopback port with an ``app-config.js`` that it
writes (one DICOMweb data source, no study list, no investigational-use dialog), answers any
other path with ``index.html`` (OHIF routes in the browser), and forwards ``/dicom-web/`` to
Orthanc's DICOMweb plugin, so that the viewer and its data share one origin and Orthanc needs
no CORS headers.  The forwarded requests keep the viewer's ``Host`` header, so the bulk data
URIs Orthanc writes into its metadata point back at this server.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from tests.support.orthanc import OrthancServer
from tests.support.ports import LOOPBACK, free_port

OHIF_VERSION = "3.13.2"
#: Orthanc's DICOMweb plugin as Debian's ``orthanc-dicomweb`` installs it.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web/"
PROXY_TIMEOUT_S = 60.0

#: File types the viewer loads that Python's table may not know.
_MIME_TYPES = {
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
}
#: The SVG text OHIF draws for SR annotations, with the rectangle of its viewport.
_ANNOTATION_BOXES_SCRIPT = """
const pane = document.querySelector('[data-cy="viewport-pane"]');
if (!pane) { return null; }
const r = pane.getBoundingClientRect();
const texts = [];
for (const node of pane.querySelectorAll('svg text')) {
  const b = node.getBoundingClientRect();
  texts.push({text: node.textContent, box: [b.left, b.top, b.right, b.bottom]});
}
return {viewport: [r.left, r.top, r.right, r.bottom], texts: texts};
"""

#: The page rectangle of an image region (column0, row0, column1, row1 in image pixels) of the
#: image shown in the first viewport, and the rectangles of the visible elements the viewer
#: draws over the viewport (its overlays, its cine player, its menus), or null before the
#: image is shown.
_OVERLAYS_SCRIPT = """
const [c0, r0, c1, r1] = arguments[0];
const cs = window.cornerstone;
const enabled = cs ? cs.getEnabledElements() : [];
if (!enabled.length) { return null; }
const vp = enabled[0].viewport;
const imageId = vp.getCurrentImageId && vp.getCurrentImageId();
if (!imageId || !(vp.getImageData && vp.getImageData())) { return null; }
const canvas = vp.canvas.getBoundingClientRect();
const toPage = (c, r) => {
  const p = vp.worldToCanvas(cs.utilities.imageToWorldCoords(imageId, [c, r]));
  return [canvas.left + p[0], canvas.top + p[1]];
};
const a = toPage(c0, r0), b = toPage(c1, r1);
const region = [Math.min(a[0], b[0]), Math.min(a[1], b[1]),
                Math.max(a[0], b[0]), Math.max(a[1], b[1])];
const pane = vp.element.closest('[data-cy="viewport-pane"]') || vp.element.parentElement;
const covers = [];
for (const el of pane.querySelectorAll('*')) {
  if (vp.element.contains(el)) { continue; }
  const style = getComputedStyle(el);
  const box = el.getBoundingClientRect();
  const painted = el.childElementCount === 0 || style.backgroundColor !== 'rgba(0, 0, 0, 0)';
  if (!painted || box.width === 0 || box.height === 0 || style.visibility === 'hidden'
      || Number(style.opacity) === 0) { continue; }
  const name = el.getAttribute('data-cy') || el.closest('[data-cy]')?.getAttribute('data-cy');
  covers.push({what: name || el.tagName, text: (el.innerText || '').slice(0, 40),
               box: [box.left, box.top, box.right, box.bottom]});
}
const r = pane.getBoundingClientRect();
return {region: region, covers: covers, viewport: [r.left, r.top, r.right, r.bottom]};
"""

#: Request headers worth passing on to Orthanc.
_FORWARDED = ("Accept", "Accept-Encoding", "Range", "Host")


class OhifError(RuntimeError):
    """The viewer's files are missing or cannot be served."""


def ohif_dist() -> Path:
    """The unpacked ``dist/`` of ``@ohif/app`` (see the module docstring)."""
    configured = os.environ.get("OHIF_DIST")
    if configured:
        dist = Path(configured)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        dist = cache / "coronet" / "ohif" / OHIF_VERSION / "dist"
    if not (dist / "index.html").is_file():
        raise OhifError(f"OHIF {OHIF_VERSION} is not unpacked at {dist} (run `make ohif`)")
    return dist


def ohif_version(dist: Path) -> str:
    """The version in the ``package.json`` unpacked beside ``dist/``."""
    manifest = json.loads((dist.parent / "package.json").read_text())
    return str(manifest["version"])


def dicomweb_config() -> dict[str, Any]:
    """Orthanc configuration keys that load and set up the DICOMweb plugin."""
    return {
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {
            "Enable": True,
            "Root": DICOMWEB_ROOT,
            "EnableWado": False,
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }


def app_config() -> str:
    """The viewer's ``app-config.js``: this server's DICOMweb proxy as the only data source."""
    root = DICOMWEB_ROOT.rstrip("/")
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": False,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        # No onboarding tour over the images.
        "customizationService": [{"ohif.tours": {"$set": []}}],
        "maxNumberOfWebWorkers": 1,
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (test)",
                    "name": "orthanc",
                    "wadoUriRoot": "/wado",
                    "qidoRoot": root,
                    "wadoRoot": root,
                    "qidoSupportsIncludeField": False,
                    "supportsReject": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


@dataclass
class OhifServer:
    """The viewer on ``http://127.0.0.1:<port>/``; ``failures`` lists answers of 400 and up."""

    port: int
    dist: Path
    failures: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def study_url(self, study_uid: str, series_uid: str | None = None) -> str:
        """The viewer on one study, opening ``series_uid`` first when given."""
        query = {"StudyInstanceUIDs": study_uid}
        if series_uid is not None:
            query["initialSeriesInstanceUID"] = series_uid
        return f"{self.base_url}/viewer?{urlencode(query)}"


def _handler(
    dist: Path, config_path: Path, orthanc: OrthancServer, server: OhifServer
) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.extensions_map = {**self.extensions_map, **_MIME_TYPES}
            super().__init__(*args, directory=str(dist), **kwargs)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path.startswith(DICOMWEB_ROOT):
                self._forward()
            elif path == "/app-config.js":
                self._send_file(config_path, "application/javascript")
            elif (dist / path.lstrip("/")).is_file():
                super().do_GET()
            else:  # a route of the single-page app
                self._send_file(dist / "index.html", "text/html")

        def _send_file(self, path: Path, content_type: str) -> None:
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _forward(self) -> None:
            connection = http.client.HTTPConnection(
                orthanc.host, orthanc.http_port, timeout=PROXY_TIMEOUT_S
            )
            headers = {k: v for k in _FORWARDED if (v := self.headers.get(k)) is not None}
            headers["Accept-Encoding"] = "identity"
            try:
                connection.request("GET", self.path, headers=headers)
                response = connection.getresponse()
                body = response.read()
            finally:
                connection.close()
            self.send_response(response.status)
            for name in ("Content-Type", "ETag", "Last-Modified"):
                value = response.getheader(name)
                if value is not None:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_response(self, code: int, message: str | None = None) -> None:
            if code >= 400:
                server.failures.append(f"{code} {self.command} {self.path}")
            super().send_response(code, message)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # failures are kept in ``server.failures``

    return Handler


@contextlib.contextmanager
def serving_ohif(orthanc: OrthancServer, workdir: Path) -> Iterator[OhifServer]:
    """Serve the viewer for ``orthanc`` (started with :func:`dicomweb_config`) until exit."""
    dist = ohif_dist()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "app-config.js"
    config_path.write_text(app_config())
    server = OhifServer(port=free_port(), dist=dist)
    httpd = http.server.ThreadingHTTPServer(
        (LOOPBACK, server.port), _handler(dist, config_path, orthanc, server)
    )
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="ohif-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Drawn:
    """Something on the page and its rectangle (left, top, right, bottom) in CSS pixels."""

    what: str
    box: Box


def _box(values: Any) -> Box:
    left, top, right, bottom = (float(v) for v in values)
    return (left, top, right, bottom)


def overlapping(a: Box, b: Box) -> bool:
    """Whether two rectangles share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(inner: Box, outer: Box) -> bool:
    """Whether ``inner`` lies within ``outer``."""
    return (
        inner[0] >= outer[0]
        and inner[1] >= outer[1]
        and inner[2] <= outer[2]
        and inner[3] <= outer[3]
    )


def annotation_boxes(driver: Any) -> tuple[Box, list[Drawn]] | None:
    """The viewport's rectangle and the SR annotation labels drawn in it, or None before the
    viewer shows a viewport."""
    found = driver.execute_script(_ANNOTATION_BOXES_SCRIPT)
    if not found:
        return None
    texts = [Drawn(str(t["text"]), _box(t["box"])) for t in found["texts"]]
    return _box(found["viewport"]), texts


@dataclass(frozen=True)
class Placement:
    """An image region on the page: its rectangle, its viewport's, and what is drawn over it."""

    region: Box
    viewport: Box
    covers: list[Drawn]


def overlays_over(driver: Any, region: Box) -> Placement | None:
    """Where the image region ``region`` (column0, row0, column1, row1 in the pixels of the
    image shown) is on the page, and the viewer's own elements drawn over it; None before the
    image is shown."""
    found = driver.execute_script(_OVERLAYS_SCRIPT, list(region))
    if not found:
        return None
    on_page = _box(found["region"])
    covers = [
        Drawn(f"{c['what']} {c['text']!r}", _box(c["box"]))
        for c in found["covers"]
        if overlapping(_box(c["box"]), on_page)
    ]
    return Placement(on_page, _box(found["viewport"]), covers)


#: The viewer's error notices: its toasts of type error and its error boundary's message.
_ERRORS_SCRIPT = """
const found = [];
for (const toast of document.querySelectorAll('[data-sonner-toast][data-type="error"]')) {
  found.push('toast: ' + toast.innerText);
}
if (document.body.innerText.includes('Something went wrong')) {
  found.push('page: Something went wrong');
}
return found;
"""


def error_notices(driver: Any) -> list[str]:
    """The error toasts and "Something went wrong" messages the viewer shows now."""
    found: list[str] = driver.execute_script(_ERRORS_SCRIPT)
    return found
