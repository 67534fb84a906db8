"""The OHIF viewer (``@ohif/app`` from the npm registry) served on the same origin as Orthanc.

:func:`ensure_dist` fetches the published package once with ``npm pack`` into a cache outside
the repository (``$LUNGBURDEN_OHIF_CACHE``, default ``~/.cache/lungburden-ohif``) and unpacks
its built ``dist/``. :class:`OhifServer` serves that folder from ``/`` with an ``app-config.js``
whose only data source is ``/dicom-web`` on the same origin, proxies ``/dicom-web`` to Orthanc
(no CORS involved) and answers unknown paths with ``index.html`` (the viewer's own routes).

Run as a script to fetch the package: ``python tests/viewer/ohif.py``.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"


def cache_root() -> Path:
    return Path(os.environ.get("LUNGBURDEN_OHIF_CACHE") or Path.home() / ".cache" / "lungburden-ohif")


def dist_dir(version: str = OHIF_VERSION) -> Path:
    return cache_root() / version / "package" / "dist"


def ensure_dist(version: str = OHIF_VERSION) -> Path:
    """The unpacked ``dist/`` of ``@ohif/app@version``, fetched with ``npm pack`` if missing."""
    dist = dist_dir(version)
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (Debian package npm); it fetches the OHIF viewer")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dist / "index.html").is_file():
            return dist
        out = subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{version}", "--json", "--pack-destination", str(root)],
            cwd=root, capture_output=True, text=True, timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"npm pack {OHIF_PACKAGE}@{version} failed:\n{out.stderr[-3000:]}")
        tarball = root / json.loads(out.stdout)[0]["filename"].replace("@", "").replace("/", "-")
        target = root / version
        partial = root / f"{version}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(tarball) as archive:
            archive.extractall(partial, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        tarball.unlink()
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"{OHIF_PACKAGE}@{version} has no dist/index.html")
    return dist


#: The viewer's configuration: one DICOMweb data source on this origin; otherwise OHIF's defaults
#: (opening a SEG asks for confirmation, an SR opens read-only in OHIF's SR viewport).
APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  disableConfirmationPrompts: false,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""

#: Request headers passed on to Orthanc (Host too: Orthanc builds BulkDataURIs on this origin).
_FORWARDED = ("accept", "content-type", "host", "range")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        with self.server.log_lock:
            self.server.requests.append(f"{self.command} {self.path} " + " ".join(str(a) for a in args[1:]))

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self._serve()

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        path = urlsplit(self.path).path
        if path == "/dicom-web" or path.startswith("/dicom-web/"):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, APP_CONFIG.encode(), "application/javascript")
        else:
            self._static(path)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, path: str) -> None:
        root = self.server.dist
        candidate = (root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            candidate = root / "index.html"  # the viewer's client-side routes
        content_type = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        if candidate.suffix == ".wasm":
            content_type = "application/wasm"
        elif candidate.suffix in (".js", ".mjs"):
            content_type = "application/javascript"
        self._send(200, candidate.read_bytes(), content_type)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED}
        connection = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=120)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except OSError as error:
            self._send(502, str(error).encode(), "text/plain")
            return
        finally:
            connection.close()
        self._send(response.status, data, response.getheader("Content-Type") or "application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, orthanc_port: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self.requests: list[str] = []
        self.log_lock = threading.Lock()


class OhifServer:
    """OHIF from ``dist`` on ``http://127.0.0.1:<port>/``, ``/dicom-web`` proxied to Orthanc."""

    def __init__(self, dist: Path, orthanc_http_port: int):
        self._server = _Server(Path(dist), orthanc_http_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[str]:
        return list(self._server.requests)

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":
    print(ensure_dist(sys.argv[1] if len(sys.argv) > 1 else OHIF_VERSION))
