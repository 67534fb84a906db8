"""The node's HTTP endpoint: health, job states, STOW-RS input.

- ``GET /health``: JSON status (200 when healthy, 503 when degraded: a worker missing or the spool
  nearly full), job and delivery counts, spool free space, SCP statistics. When credentials are
  required (see below), a request without them gets ``{"status": ...}`` only.
- ``GET /jobs[?state=dead,failed&limit=100]`` and ``GET /jobs/<id>``: job states with reasons.
- ``POST /dicom-web/studies[/<StudyInstanceUID>]``: STOW-RS (PS3.18 10.5) with
  ``multipart/related; type="application/dicom"`` bodies; every part goes through the same
  intake as C-STORE (same checks, same durable spool). The response is the PS3.18 Store
  Instances Response Module in DICOM JSON (``application/dicom+json``): Referenced SOP Sequence
  (0008,1199), Failed SOP Sequence (0008,1198) with Failure Reason (0008,1197, PS3.4 B.2.3
  codes); HTTP 200 if all instances were stored, 202 if some failed, 409 if all failed.

Server stack: a plain ASGI application on uvicorn with its h11 protocol, in a thread of the node
process. h11 enforces the HTTP/1.1 message framing (RFC 9112 6-7: Content-Length syntax, chunk
sizes, header size) and answers malformed requests 400; the event loop holds no thread per
connection, so slow clients cannot exhaust a thread pool. On top of that this module enforces a
deadline for the request head, an idle timeout on every body read, ``max_request_mb`` while the
body streams in (413 before any byte beyond the limit is buffered, at once when Content-Length
announces it), ``Connection: close`` on every answer that leaves a request body unread, HTTPS
(TLS 1.2+, BCP 195) and bearer-token / Basic authentication with a client name for the audit
trail (``http.auth``). Blocking work (intake, job database) runs in worker threads.

``python -m lungburden.dicom_node.http hash-password`` prints a ``password_hash`` for
``http.auth.users``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import mmap
import re
import secrets
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lungburden.config.schema import HttpAuthConfig, HttpConfig
from lungburden.jobs.queue import JOB_STATES, JobStore
from lungburden.jobs.spool import CANNOT_UNDERSTAND, Intake, StoreOutcome, valid_uid

log = logging.getLogger(__name__)

_STOW_PATH = re.compile(r"^(?:/dicom-web|/dicomweb|/wado-rs|)/studies(?:/([0-9.]+))?/?$")
_JOB_PATH = re.compile(r"^/jobs/(\d+)/?$")
#: Bodies up to this size stay in memory; larger ones go to an unlinked file in the storage folder.
_MEMORY_BODY = 16 * 2**20
#: Largest request head (request line and header fields) accepted.
_MAX_HEAD = 64 * 1024
_MAX_JOB_ID = 2**63 - 1
_MAX_JOBS_LIMIT = 10000


# -- multipart/related (RFC 2387, RFC 2046 5.1) ---------------------------------------------------

def _multipart_spans(content_type: str, body: Any) -> list[tuple[dict[str, str], int, int]]:
    """``(headers, start, end)`` of every part of a ``multipart/related`` body (``bytes`` or ``mmap``)."""
    match = re.search(r'boundary="?([^";,]+)"?', content_type, re.IGNORECASE)
    if not match:
        raise ValueError("multipart/related without a boundary parameter")
    boundary = match.group(1).strip().encode("latin-1")
    # A delimiter is CRLF "--" boundary (RFC 2046 5.1.1); the first one may start the body.
    delimiter = b"\r\n--" + boundary
    size = len(body)
    if body[:len(boundary) + 2] == b"--" + boundary:
        pos = len(boundary) + 2
    else:
        first = body.find(delimiter)
        if first < 0:
            return []
        pos = first + len(delimiter)
    spans: list[tuple[dict[str, str], int, int]] = []
    while True:
        if body[pos:pos + 2] == b"--":
            break  # close delimiter
        following = body.find(delimiter, pos)
        end = following if following >= 0 else size
        line_end = body.find(b"\r\n", pos, end)
        if line_end < 0:
            raise ValueError("a multipart delimiter line is not terminated")
        start = line_end + 2  # transport padding and CRLF after the boundary
        if body[start:start + 2] == b"\r\n":
            head, content_start = b"", start + 2
        else:
            head_end = body.find(b"\r\n\r\n", start, end)
            if head_end < 0:
                raise ValueError("a multipart part has no header/body separator")
            head, content_start = body[start:head_end], head_end + 4
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        spans.append((headers, content_start, end))
        if following < 0:
            break
        pos = following + len(delimiter)
    return spans


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a ``multipart/related`` body (RFC 2387) into ``(headers, content)`` parts."""
    return [(headers, bytes(body[start:end])) for headers, start, end in _multipart_spans(content_type, body)]


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


# -- authentication ----------------------------------------------------------------------------------

PBKDF2_ITERATIONS = 300_000


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A ``password_hash`` for ``http.auth.users``: ``pbkdf2_sha256$<iterations>$<salt>$<hash>``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _check_password(password: str, encoded: str) -> bool:
    _, iterations, salt, digest = encoded.split("$")
    computed = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(computed, base64.b64decode(digest))


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class Authenticator:
    """Bearer tokens (compared by SHA-256) and Basic users (PBKDF2) of ``http.auth``.

    ``required``: requests without valid credentials are refused (STOW-RS, ``/jobs``), unless
    ``allow_anonymous``; with no credentials configured that is the case on a non-loopback host only.
    """

    def __init__(self, config: HttpAuthConfig, host: str):
        self.tokens: list[tuple[bytes, str]] = []
        for t in config.tokens:
            if t.token_file is not None:
                lines = Path(t.token_file).read_text().splitlines()
                token = lines[0].strip() if lines else ""
                if not token:
                    raise ValueError(f"http.auth token file {t.token_file} is empty")
                self.tokens.append((hashlib.sha256(token.encode()).digest(), t.name))
            else:
                self.tokens.append((bytes.fromhex(t.token_sha256 or ""), t.name))
        self.users = {u.name: u.password_hash for u in config.users}
        configured = bool(self.tokens or self.users)
        self.required = not config.allow_anonymous and (configured or not _loopback(host))
        self.configured = configured
        self._verified: dict[bytes, str] = {}  # SHA-256 of a verified Basic header -> user
        self._lock = threading.Lock()

    def identify(self, authorization: str | None) -> str | None:
        """The client name for an ``Authorization`` header value, or ``None``. May take ~0.1 s (PBKDF2)."""
        if not authorization:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            digest = hashlib.sha256(value.encode("latin-1", "replace")).digest()
            name = None
            for expected, client in self.tokens:  # no early exit: constant work per token
                if hmac.compare_digest(digest, expected):
                    name = client
            return name
        if scheme.lower() == "basic" and value:
            key = hashlib.sha256(value.encode("latin-1", "replace")).digest()
            with self._lock:
                if key in self._verified:
                    return self._verified[key]
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            encoded = self.users.get(user)
            if not sep or encoded is None or not _check_password(password, encoded):
                return None
            with self._lock:
                if len(self._verified) > 1024:
                    self._verified.clear()
                self._verified[key] = user
            return user
        return None


# -- the ASGI application ------------------------------------------------------------------------------

class _Exchange:
    """One request: headers, and the single response sent for it."""

    def __init__(self, scope: dict, receive: Callable, send: Callable):
        self.scope, self.receive, self._send = scope, receive, send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.client = (scope.get("client") or ("?", 0))[0]
        self.headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            self.headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        self.has_body = "transfer-encoding" in self.headers or self.headers.get("content-length", "0") != "0"
        self.body_read = False
        self.responded = False

    async def respond(self, status: int, payload: object, content_type: str = "application/json",
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        data = json.dumps(payload, indent=1).encode()
        out = [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode())]
        out += headers or []
        if self.has_body and not self.body_read:
            out.append((b"connection", b"close"))  # never read an unread body as the next request
        self.responded = True
        await self._send({"type": "http.response.start", "status": status, "headers": out})
        await self._send({"type": "http.response.body", "body": data if self.method != "HEAD" else b""})

    async def error(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.respond(status, {"error": message}, headers=headers)


class _Body:
    """A request body: in memory up to :data:`_MEMORY_BODY`, then in an unlinked temporary file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.memory = bytearray()
        self.file: Any = None
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.file is None and self.size > _MEMORY_BODY:
            self.file = tempfile.TemporaryFile(dir=self.folder, prefix=".stow-")
            self.file.write(self.memory)
            self.memory = bytearray()
        if self.file is not None:
            self.file.write(chunk)
        else:
            self.memory += chunk

    def view(self) -> Any:
        if self.file is None:
            return bytes(self.memory)
        self.file.flush()
        return mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class NodeHttpApp:
    """ASGI application of the endpoint (PS3.18 STOW-RS, ``/health``, ``/jobs``)."""

    def __init__(self, config: HttpConfig, store: JobStore, intake: Intake, health: Callable[[], dict]):
        self.config = config
        self.store = store
        self.intake = intake
        self.health = health
        self.auth = Authenticator(config.auth, config.host)
        self.limit = config.max_request_mb * 2**20

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        ex = _Exchange(scope, receive, send)
        try:
            await self._route(ex)
        except Exception:  # noqa: BLE001 - one failed request must not reach the server's log as a crash
            log.exception("http %s %s failed", ex.method, ex.path[:200])
            if not ex.responded:
                await ex.error(500, "internal error")

    @staticmethod
    async def _run(func: Callable, *args: object) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)

    async def _user(self, ex: _Exchange) -> str | None:
        authorization = ex.headers.get("authorization")
        if not authorization:
            return None
        user = await self._run(self.auth.identify, authorization)
        if user is None:
            log.warning("http %s: invalid credentials for %s %s", ex.client, ex.method, ex.path[:200])
        return user

    async def _unauthorized(self, ex: _Exchange) -> None:
        message = ("credentials required (Authorization: Bearer or Basic)" if self.auth.configured
                   else "credentials required, but none are configured (http.auth)")
        await ex.error(401, message, headers=[(b"www-authenticate", b'Bearer realm="lungburden"'),
                                              (b"www-authenticate", b'Basic realm="lungburden", charset="UTF-8"')])

    async def _route(self, ex: _Exchange) -> None:
        path = ex.path
        if path in ("/health", "/healthz"):
            if ex.method not in ("GET", "HEAD"):
                await ex.error(405, "use GET", headers=[(b"allow", b"GET, HEAD")])
                return
            report = await self._run(self.health)
            status = 200 if report.get("status") == "ok" else 503
            if self.auth.required and await self._user(ex) is None:
                report = {"status": report.get("status")}
            await ex.respond(status, report)
            return
        if path in ("/jobs", "/jobs/") or path.startswith("/jobs/"):
            if ex.method not in ("GET", "HEAD"):
                await ex.error(405, "use GET", headers=[(b"allow", b"GET, HEAD")])
                return
            user = await self._user(ex)
            if self.auth.required and user is None:
                await self._unauthorized(ex)
                return
            await self._jobs(ex)
            return
        match = _STOW_PATH.match(path)
        if match is not None:
            if ex.method != "POST":
                await ex.error(405, "STOW-RS is POST", headers=[(b"allow", b"POST")])
                return
            await self._stow(ex, match.group(1))
            return
        await ex.error(404, "not found; try /health, /jobs or POST /dicom-web/studies")

    async def _jobs(self, ex: _Exchange) -> None:
        if ex.path in ("/jobs", "/jobs/"):
            query = parse_qs(ex.scope["query_string"].decode("latin-1"))
            states = [s for v in query.get("state", []) for s in v.split(",") if s]
            unknown = [s for s in states if s not in JOB_STATES]
            if unknown:
                await ex.error(400, f"unknown state {unknown[0][:64]!r}; known: {', '.join(JOB_STATES)}")
                return
            text = query.get("limit", ["200"])[0]
            if not text.isdigit() or len(text) > 9 or int(text) < 1:
                await ex.error(400, f"limit must be an integer from 1 to {_MAX_JOBS_LIMIT}")
                return
            limit = min(int(text), _MAX_JOBS_LIMIT)

            def listing() -> dict:
                jobs = self.store.jobs(states or None, limit=limit)
                return {"counts": self.store.counts(), "jobs": [j.to_json() for j in jobs]}

            await ex.respond(200, await self._run(listing))
            return
        m = _JOB_PATH.match(ex.path)
        job_id = int(m.group(1)) if m is not None and len(m.group(1)) <= 19 else None
        if job_id is None or job_id > _MAX_JOB_ID:
            await ex.error(404, "no such job")
            return
        job = await self._run(self.store.job, job_id)
        if job is None:
            await ex.error(404, f"no job {job_id}")
        else:
            await ex.respond(200, job.to_json())

    async def _stow(self, ex: _Exchange, study: str | None) -> None:
        user = await self._user(ex)
        if self.auth.required and user is None:
            await self._unauthorized(ex)
            return
        content_type = ex.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/related"):
            await ex.error(415, "STOW-RS expects multipart/related; type=\"application/dicom\"")
            return
        if not re.search(r"boundary=", content_type, re.IGNORECASE):
            await ex.error(400, "multipart/related without a boundary parameter")
            return
        length = ex.headers.get("content-length")
        if length is not None and int(length) > self.limit:  # h11 checked the syntax (RFC 9112 6.3)
            log.warning("http %s: STOW-RS of %s bytes refused (http.max_request_mb %d)", ex.client, length,
                        self.config.max_request_mb)
            await ex.error(413, f"request larger than {self.config.max_request_mb} MiB")
            return
        if length is not None and not self.intake.spool.has_room(int(length)):
            await ex.error(503, "the node's storage is full", headers=[(b"retry-after", b"300")])
            return
        body = await self._read_body(ex)
        if body is None:
            return
        try:
            source = f"stow:{user}@{ex.client}" if user else f"stow:{ex.client}"
            result = await self._run(self._store, body, content_type, source, study)
        finally:
            body.close()
        if isinstance(result, str):
            await ex.error(400, result)
            return
        log.info("STOW-RS from %s%s: %d stored, %d failed", ex.client, f" ({user})" if user else "",
                 sum(o.ok for o in result), sum(not o.ok for o in result))
        status, response = stow_response(result)
        await ex.respond(status, response, "application/dicom+json")

    async def _read_body(self, ex: _Exchange) -> _Body | None:
        """The whole body, or ``None`` after answering 408 / 413 (or when the client went away)."""
        body = _Body(self.intake.spool.storage_dir)
        try:
            while True:
                try:
                    message = await asyncio.wait_for(ex.receive(), self.config.timeout_seconds)
                except TimeoutError:
                    log.warning("http %s: request body stalled for %s s; connection closed", ex.client,
                                self.config.timeout_seconds)
                    await ex.error(408, f"no request data for {self.config.timeout_seconds} s")
                    body.close()
                    return None
                if message["type"] == "http.disconnect":
                    body.close()
                    return None
                chunk = message.get("body", b"")
                if body.size + len(chunk) > self.limit:
                    log.warning("http %s: STOW-RS body over http.max_request_mb %d refused", ex.client,
                                self.config.max_request_mb)
                    await ex.error(413, f"request larger than {self.config.max_request_mb} MiB")
                    body.close()
                    return None
                body.write(chunk)
                if not message.get("more_body", False):
                    ex.body_read = True
                    return body
        except BaseException:
            body.close()
            raise

    def _store(self, body: _Body, content_type: str, source: str, study: str | None) -> list[StoreOutcome] | str:
        view = body.view()
        try:
            try:
                spans = _multipart_spans(content_type, view)
            except ValueError as exc:
                return str(exc)
            if not spans:
                return "the request carried no parts"
            outcomes = []
            for headers, start, end in spans:
                part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
                if part_type != "application/dicom":
                    outcomes.append(StoreOutcome(CANNOT_UNDERSTAND, f"media type {part_type} not supported"))
                    continue
                outcome = self.intake.accept(bytes(view[start:end]), source=source)
                if outcome.ok and study and outcome.study_instance_uid != study:
                    # Stored under its own study; the request named another one (PS3.18 10.5.1.2.2 warns).
                    log.warning("STOW-RS to study %s carried an instance of study %s", study,
                                outcome.study_instance_uid)
                outcomes.append(outcome)
            return outcomes
        finally:
            if isinstance(view, mmap.mmap):
                view.close()


# -- the server ------------------------------------------------------------------------------------------

def _protocol(head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request head (against slow headers)."""

    class Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm_head_timer()
            elif self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("http %s: no complete request within %s s; connection closed",
                         self.client[0] if self.client else "?", head_timeout)
                self.transport.close()

    return Protocol


def server_ssl_context(tls: Any) -> ssl.SSLContext:
    """Server context of ``http.tls``: TLS 1.2+ (BCP 195), client certificates when a CA is set."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class NodeHttpServer:
    """The endpoint on uvicorn, in a thread of the node; ``health`` returns the ``/health`` report."""

    def __init__(self, config: HttpConfig, store: JobStore, intake: Intake, health: Callable[[], dict]):
        self.config = config
        self.app = NodeHttpApp(config, store, intake, health)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._socket = socket.create_server((config.host, config.port), family=family, backlog=256)
        uv_config = uvicorn.Config(
            self.app, http=_protocol(config.timeout_seconds), loop="asyncio", lifespan="off",
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
            timeout_keep_alive=max(1, round(config.keep_alive_seconds)), limit_concurrency=config.max_connections,
            h11_max_incomplete_event_size=_MAX_HEAD, timeout_graceful_shutdown=5,
        )
        uv_config.load()
        if config.tls is not None:
            uv_config.ssl = server_ssl_context(config.tls)
        self._server = uvicorn.Server(uv_config)
        self._thread: threading.Thread | None = None
        if self.app.auth.required and not self.app.auth.configured:
            log.warning("http.host %s is not a loopback address and http.auth has no tokens or users: "
                        "STOW-RS and /jobs refuse every request", config.host)
        elif not self.app.auth.required and not _loopback(config.host):
            log.warning("http.auth.allow_anonymous: STOW-RS and /jobs on %s need no credentials", config.host)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls is not None else "http"

    def start(self) -> NodeHttpServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise RuntimeError("the HTTP endpoint did not start")
        log.info("HTTP endpoint on %s://%s:%d (/health, /jobs, STOW-RS /dicom-web/studies)%s", self.scheme,
                 self.config.host, self.port, ", credentials required" if self.app.auth.required else "")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._socket.close()


def main(argv: list[str] | None = None) -> int:
    """``hash-password``: read a password (twice, not echoed) and print its ``password_hash``."""
    import getpass

    args = sys.argv[1:] if argv is None else argv
    if args != ["hash-password"]:
        print("usage: python -m lungburden.dicom_node.http hash-password", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
