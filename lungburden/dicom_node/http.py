"""The node's HTTP endpoint (stdlib ``ThreadingHTTPServer``): health, job states, STOW-RS input.

- ``GET /health``: JSON status (200 when healthy, 503 when degraded: a worker missing or the spool
  nearly full), job and delivery counts, spool free space, SCP statistics.
- ``GET /jobs[?state=dead,failed&limit=100]`` and ``GET /jobs/<id>``: job states with reasons.
- ``POST /dicom-web/studies[/<StudyInstanceUID>]``: STOW-RS (PS3.18 10.5) with
  ``multipart/related; type="application/dicom"`` bodies; every part goes through the same
  intake as C-STORE (same checks, same durable spool). The response is the PS3.18 Store
  Instances Response Module in DICOM JSON (``application/dicom+json``): Referenced SOP Sequence
  (0008,1199), Failed SOP Sequence (0008,1198) with Failure Reason (0008,1197, PS3.4 B.2.3
  codes); HTTP 200 if all instances were stored, 202 if some failed, 409 if all failed.

The endpoint binds 127.0.0.1 by default and has no authentication: expose it only on a trusted
network or behind a reverse proxy.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from lungburden.config.schema import HttpConfig
from lungburden.jobs.queue import JOB_STATES, JobStore
from lungburden.jobs.spool import CANNOT_UNDERSTAND, Intake, StoreOutcome, valid_uid

log = logging.getLogger(__name__)

_STOW_PATH = re.compile(r"^(?:/dicom-web|/dicomweb|/wado-rs|)/studies(?:/([0-9.]+))?/?$")
_JOB_PATH = re.compile(r"^/jobs/(\d+)/?$")


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a ``multipart/related`` body (RFC 2387) into ``(headers, content)`` parts."""
    match = re.search(r'boundary="?([^";,]+)"?', content_type, re.IGNORECASE)
    if not match:
        raise ValueError("multipart/related without a boundary parameter")
    # A delimiter is CRLF "--" boundary (RFC 2046 5.1.1); the first one may start the body.
    delimiter = b"\r\n--" + match.group(1).strip().encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter)
    parts: list[tuple[dict[str, str], bytes]] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # close delimiter
        line_end = chunk.find(b"\r\n")
        if line_end < 0:
            raise ValueError("a multipart delimiter line is not terminated")
        chunk = chunk[line_end + 2:]  # transport padding and CRLF after the boundary
        if chunk.startswith(b"\r\n"):
            head, content = b"", chunk[2:]
        else:
            head, sep, content = chunk.partition(b"\r\n\r\n")
            if not sep:
                raise ValueError("a multipart part has no header/body separator")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def _sop_item(outcome: StoreOutcome, failed: bool) -> dict:
    item: dict = {}
    if outcome.sop_class_uid and valid_uid(outcome.sop_class_uid):
        item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
    if outcome.sop_instance_uid and valid_uid(outcome.sop_instance_uid):
        item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
    if failed:
        item["00081197"] = {"vr": "US", "Value": [outcome.status]}
    return item


def stow_response(outcomes: list[StoreOutcome], retrieve_url: str | None = None) -> tuple[int, dict]:
    """HTTP status and DICOM JSON body of a STOW-RS response (PS3.18 10.5.3)."""
    stored = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    body: dict = {}
    if retrieve_url:
        body["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_sop_item(o, True) for o in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_sop_item(o, False) for o in stored]}
    status = 200 if not failed else 202 if stored else 409
    return status, body


class _Handler(BaseHTTPRequestHandler):
    server: NodeHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s - %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: object, content_type: str = "application/json") -> None:
        data = json.dumps(payload, indent=1).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        url = urlsplit(self.path)
        try:
            if url.path in ("/health", "/healthz"):
                report = self.server.health()
                self._send_json(200 if report.get("status") == "ok" else 503, report)
            elif url.path in ("/jobs", "/jobs/"):
                query = parse_qs(url.query)
                states = [s for v in query.get("state", []) for s in v.split(",") if s]
                unknown = [s for s in states if s not in JOB_STATES]
                if unknown:
                    self._error(400, f"unknown state {unknown[0]!r}; known: {', '.join(JOB_STATES)}")
                    return
                limit = int(query.get("limit", ["200"])[0])
                jobs = self.server.store.jobs(states or None, limit=limit)
                self._send_json(200, {"counts": self.server.store.counts(), "jobs": [j.to_json() for j in jobs]})
            elif (m := _JOB_PATH.match(url.path)) is not None:
                job = self.server.store.job(int(m.group(1)))
                if job is None:
                    self._error(404, f"no job {m.group(1)}")
                else:
                    self._send_json(200, job.to_json())
            else:
                self._error(404, "not found; try /health, /jobs or POST /dicom-web/studies")
        except ValueError as exc:
            self._error(400, str(exc))
        except Exception:  # noqa: BLE001
            log.exception("http GET %s failed", url.path)
            self._error(500, "internal error")

    def _read_body(self) -> bytes | None:
        limit = self.server.config.max_request_mb * 2**20
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > limit:
                    return None
        length = int(self.headers.get("Content-Length", "0") or 0)
        if length > limit:
            return None
        return self.rfile.read(length)

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        url = urlsplit(self.path)
        match = _STOW_PATH.match(url.path)
        if match is None:
            self._error(404, "not found; STOW-RS is POST /dicom-web/studies[/{StudyInstanceUID}]")
            return
        content_type = self.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/related"):
            self._error(415, "STOW-RS expects multipart/related; type=\"application/dicom\"")
            return
        body = self._read_body()
        if body is None:
            self.close_connection = True
            self._error(413, f"request larger than {self.server.config.max_request_mb} MiB")
            return
        try:
            parts = parse_multipart_related(content_type, body)
        except ValueError as exc:
            self._error(400, str(exc))
            return
        study = match.group(1)
        source = f"stow:{self.client_address[0]}"
        outcomes = []
        for headers, content in parts:
            part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if part_type != "application/dicom":
                outcomes.append(StoreOutcome(CANNOT_UNDERSTAND, f"media type {part_type} not supported"))
                continue
            outcome = self.server.intake.accept(content, source=source)
            if outcome.ok and study and outcome.study_instance_uid != study:
                # Stored under its own study; the request named another one (PS3.18 10.5.1.2.2 warns).
                log.warning("STOW-RS to study %s carried an instance of study %s", study, outcome.study_instance_uid)
            outcomes.append(outcome)
        if not outcomes:
            self._error(400, "the request carried no parts")
            return
        log.info("STOW-RS from %s: %d stored, %d failed", self.client_address[0],
                 sum(o.ok for o in outcomes), sum(not o.ok for o in outcomes))
        status, response = stow_response(outcomes)
        self._send_json(status, response, "application/dicom+json")


class NodeHttpServer(ThreadingHTTPServer):
    """The HTTP endpoint; ``health`` is a callable returning the ``/health`` report."""

    daemon_threads = True

    def __init__(self, config: HttpConfig, store: JobStore, intake: Intake, health: Callable[[], dict]):
        self.config = config
        self.store = store
        self.intake = intake
        self.health = health
        super().__init__((config.host, config.port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> NodeHttpServer:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()
        log.info("HTTP endpoint on http://%s:%d (/health, /jobs, STOW-RS /dicom-web/studies)",
                 self.config.host, self.port)
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
