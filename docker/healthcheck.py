#!/opt/lungburden/bin/python
"""HEALTHCHECK of the lungburden images (standard library only); exit 0 healthy, 1 unhealthy.

``lungburden-healthcheck node``: ``GET /health`` of the node (200 = ok; 503 = degraded: a worker
missing, the spool disk full). URL: ``$LUNGBURDEN_HEALTHCHECK_URL``, default
``http://127.0.0.1:${LUNGBURDEN_HTTP__PORT:-8081}/health``; with ``https`` the certificate is not
verified (the request never leaves the container).

``lungburden-healthcheck orthanc``: Orthanc's REST API on ``$ORTHANC_HEALTHCHECK_URL`` (default
``http://127.0.0.1:8042``) with the user ``orthanc`` and ``$ORTHANC_PASSWORD`` (or the file
``$ORTHANC_PASSWORD_FILE``): ``/lungburden/status`` must report a running worker; a configuration
without the plugin (404) needs ``/system`` to answer.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.request

TIMEOUT = 4.0


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def check_node() -> str | None:
    port = os.environ.get("LUNGBURDEN_HTTP__PORT", "8081")
    url = os.environ.get("LUNGBURDEN_HEALTHCHECK_URL") or f"http://127.0.0.1:{port}/health"
    status, body = _get(url)
    if status != 200:
        return f"{url} answered {status}: {body[:300].decode(errors='replace')}"
    return None


def _orthanc_password() -> str:
    path = os.environ.get("ORTHANC_PASSWORD_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("ORTHANC_PASSWORD", "")


def check_orthanc() -> str | None:
    base = (os.environ.get("ORTHANC_HEALTHCHECK_URL") or "http://127.0.0.1:8042").rstrip("/")
    token = base64.b64encode(f"orthanc:{_orthanc_password()}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    status, body = _get(f"{base}/lungburden/status", headers)
    if status == 404:  # Orthanc without the plugin (the PACS of the compose file)
        status, body = _get(f"{base}/system", headers)
        return None if status == 200 else f"/system answered {status}"
    if status != 200:
        return f"/lungburden/status answered {status}"
    worker = json.loads(body).get("worker", {})
    if not worker.get("running"):
        return f"the lungburden worker is not running: {worker.get('error') or worker.get('last_exit')}"
    return None


def main(argv: list[str]) -> int:
    checks = {"node": check_node, "orthanc": check_orthanc}
    if len(argv) != 1 or argv[0] not in checks:
        print("usage: lungburden-healthcheck node|orthanc", file=sys.stderr)
        return 2
    try:
        problem = checks[argv[0]]()
    except (OSError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
