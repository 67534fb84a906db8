"""The HTTP endpoint and the Orthanc plugin's REST routes on a hostile network: slow clients,
malformed framing (RFC 9112), oversized bodies, keep-alive after a refused request, credentials,
HTTPS (BCP 195). Real sockets against a running node; openssl for a test CA; a real Orthanc."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import select
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from ct_builders import encode, make_ct_dataset
from node_helpers import InProcessNodes
from orthanc import PYTHON_PLUGIN, OrthancServer, find_plugin, orthanc_available
from pydicom.uid import generate_uid

from lungburden.config.schema import HttpAuthConfig
from lungburden.dicom_node.http import Authenticator, hash_password

HAVE_OPENSSL = shutil.which("openssl") is not None
BOUNDARY = "LUNGBURDEN-TEST"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
TOKEN = "token-of-modality-1"
PASSWORD = "password-of-reader-1"


@pytest.fixture
def endpoint(tmp_path):
    nodes = InProcessNodes(tmp_path)
    yield lambda **http_options: nodes.start(http={"keep_alive_seconds": 2, **http_options},
                                             logging={"audit_file": str(tmp_path / "audit.jsonl")})
    nodes.stop()


def stow_body(count: int = 1) -> bytes:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    return b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + encode(make_ct_dataset(i, study, series, frame)) + b"\r\n" for i in range(count)) \
        + f"--{BOUNDARY}--\r\n".encode()


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; everything received until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def no_traceback(caplog) -> None:
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records), caplog.text[-3000:]


# -- slow clients ----------------------------------------------------------------------------------

def test_slow_clients_do_not_exhaust_the_server(endpoint):
    service = endpoint(timeout_seconds=2, max_connections=500)
    port = service.http.port
    threads_before = threading.active_count()
    slow = []
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 3:  # body that stalls after a few bytes
            s.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                      "Content-Length: 100000\r\n\r\n--".encode())
        else:  # request head that never ends
            s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    started = time.monotonic()
    r = requests.post(f"http://127.0.0.1:{port}/dicom-web/studies", data=stow_body(), timeout=10,
                      headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 200 and "00081199" in r.json()
    assert time.monotonic() - started < 5
    assert threading.active_count() - threads_before < 10  # no thread per connection
    # every slow connection is answered 408 or closed after timeout_seconds
    deadline = time.monotonic() + 10
    for s in slow:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
            assert data == b"" or status_of(data) == 408
        except ConnectionResetError:
            pass
        s.close()
    assert time.monotonic() < deadline


# -- malformed framing -----------------------------------------------------------------------------

@pytest.mark.parametrize("head, body, expected", [
    ("Content-Length: -1", b"", 400),
    ("Content-Length: abc", b"", 400),
    ("Content-Length: 5\r\nContent-Length: 7", b"12345", 400),
    ("Content-Length: 99999999999999", b"", 413),
    ("Content-Length: 99999999999999999999999999", b"", 400),
    ("Transfer-Encoding: chunked", b"zz\r\nabc\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding: chunked", b"5\r\nabc\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding: chunked", b"FFFFFFFFFFFFFFFFFFFFFFFFF\r\nabc", 400),
])
def test_malformed_framing_gets_4xx_without_traceback(endpoint, caplog, head, body, expected):
    service = endpoint(max_request_mb=1)
    with caplog.at_level(logging.DEBUG):
        response = exchange(service.http.port, f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
                                               f"Content-Type: {STOW_TYPE}\r\n{head}\r\n\r\n".encode() + body)
        assert status_of(response) == expected
        assert requests.get(f"http://127.0.0.1:{service.http.port}/health", timeout=10).status_code == 200
    no_traceback(caplog)


def _stream_until_answered(port: int, head: bytes, piece: bytes, max_bytes: int) -> tuple[bytes, int]:
    """Send ``head`` then ``piece`` after ``piece`` until the server answers; (answer, bytes sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head)
    sent = 0
    try:
        while sent < max_bytes:
            if select.select([s], [], [], 0)[0]:
                break
            s.sendall(piece)
            sent += len(piece)
        s.settimeout(10)
        answer = s.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        answer = b""
    finally:
        s.close()
    return answer, sent


def test_bodies_over_the_limit_are_refused_before_they_are_buffered(endpoint, caplog):
    service = endpoint(max_request_mb=1)
    port = service.http.port
    with caplog.at_level(logging.DEBUG):
        # announced by Content-Length: 413 before a byte of the body is sent
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                      f"Content-Length: {2**20 + 1}\r\n\r\n".encode())
            answer = s.recv(65536)
        assert status_of(answer) == 413 and b"connection: close" in answer.lower()
        # a chunk claiming 1 TiB, streamed: refused once the limit is passed, not at the end
        answer, sent = _stream_until_answered(
            port, f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFF\r\n".encode(), b"\0" * 65536, 64 * 2**20)
        assert sent < 16 * 2**20
        assert answer == b"" or status_of(answer) == 413
        # the same without a Content-Length, in many small chunks
        piece = b"10000\r\n" + b"\0" * 65536 + b"\r\n"
        answer, sent = _stream_until_answered(
            port, f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode(), piece, 64 * 2**20)
        assert sent < 16 * 2**20
        assert answer == b"" or status_of(answer) == 413
    assert "over http.max_request_mb" in caplog.text or "refused (http.max_request_mb" in caplog.text
    no_traceback(caplog)
    assert list((service.spool.storage_dir).glob(".stow-*")) == []


def test_job_ids_and_limits_out_of_range(endpoint, caplog):
    base = f"http://127.0.0.1:{endpoint().http.port}"
    with caplog.at_level(logging.DEBUG):
        for job_id in ("99999999999999999999999", "9223372036854775808", "0"):
            assert requests.get(f"{base}/jobs/{job_id}", timeout=10).status_code == 404
        for limit in ("abc", "-1", "0", "1e9", "99999999999999999999"):
            assert requests.get(f"{base}/jobs?limit={limit}", timeout=10).status_code == 400
        assert requests.get(f"{base}/jobs?limit=5", timeout=10).status_code == 200
        assert requests.delete(f"{base}/jobs", timeout=10).status_code == 405
    no_traceback(caplog)


def test_refused_post_body_is_never_parsed_as_the_next_request(endpoint):
    port = endpoint().http.port
    smuggled = b"GET /jobs HTTP/1.1\r\nHost: x\r\n\r\n"
    for content_type, path in (("text/plain", "/dicom-web/studies"),       # 415
                               (STOW_TYPE, "/elsewhere"),                   # 404
                               ("multipart/related", "/dicom-web/studies")):  # 400, no boundary
        response = exchange(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                                  f"Content-Length: {len(smuggled)}\r\n\r\n".encode() + smuggled)
        assert status_of(response) in (400, 404, 415)
        assert response.count(b"HTTP/1.1 ") == 1, response
        assert b"connection: close" in response.lower()
    # a POST whose body was read keeps the connection, and the next request is answered
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        body = stow_body()
        s.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body + b"GET /jobs/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 ") < 2:
            data += s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 404" in data


# -- credentials -------------------------------------------------------------------------------------

def test_stow_and_jobs_need_credentials(endpoint, tmp_path):
    token_file = tmp_path / "reader.token"
    token_file.write_text("token-in-a-file\n")
    token_file.chmod(0o600)
    service = endpoint(auth={
        "tokens": [{"name": "modality1", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()},
                   {"name": "reader2", "token_file": str(token_file)}],
        "users": [{"name": "reader1", "password_hash": hash_password(PASSWORD, iterations=1000)}],
    })
    base = f"http://127.0.0.1:{service.http.port}"
    headers = {"Content-Type": STOW_TYPE}
    r = requests.post(f"{base}/dicom-web/studies", data=stow_body(), headers=headers, timeout=10)
    assert r.status_code == 401 and "Bearer" in r.headers["WWW-Authenticate"]
    r = requests.post(f"{base}/dicom-web/studies", data=stow_body(), timeout=10,
                      headers={**headers, "Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert requests.post(f"{base}/dicom-web/studies", data=stow_body(), timeout=10,
                         auth=("reader1", "wrong")).status_code == 401
    r = requests.post(f"{base}/dicom-web/studies", data=stow_body(2), timeout=10,
                      headers={**headers, "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 2
    r = requests.post(f"{base}/dicom-web/studies", data=stow_body(), headers=headers, timeout=10,
                      auth=("reader1", PASSWORD))
    assert r.status_code == 200
    # /jobs: credentials required; /health: status only without them
    assert requests.get(f"{base}/jobs", timeout=10).status_code == 401
    assert requests.get(f"{base}/jobs/1", timeout=10).status_code == 401
    assert requests.get(f"{base}/jobs", timeout=10, headers={"Authorization": "Bearer token-in-a-file"}).ok
    assert requests.get(f"{base}/jobs", timeout=10, auth=("reader1", PASSWORD)).ok
    assert requests.get(f"{base}/health", timeout=10).json() == {"status": "ok"}
    assert "jobs" in requests.get(f"{base}/health", timeout=10, auth=("reader1", PASSWORD)).json()
    basic = "Basic " + base64.b64encode(b"\xff\xfe:x").decode()
    assert requests.get(f"{base}/jobs", timeout=10, headers={"Authorization": basic}).status_code == 401
    # the audit trail names the client
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    received = [r for r in records if r["event"] == "instance_received"]
    assert [r["user"] for r in received] == ["modality1", "modality1", "reader1"]
    assert {(r["channel"], r["host"]) for r in received} == {("stow", "127.0.0.1")}


def test_credentials_are_required_off_loopback_unless_anonymous_is_allowed():
    assert Authenticator(HttpAuthConfig(), "0.0.0.0").required
    assert not Authenticator(HttpAuthConfig(), "127.0.0.1").required
    assert not Authenticator(HttpAuthConfig(allow_anonymous=True), "0.0.0.0").required


# -- HTTPS -------------------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if not HAVE_OPENSSL:
        pytest.skip("needs openssl")
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "server.ext", "-out", "server.crt", cwd=folder)
    return folder


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_https(endpoint, pki, caplog):
    service = endpoint(tls={"certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key")},
                       auth={"tokens": [{"name": "modality1",
                                         "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]})
    port = service.http.port
    r = requests.post(f"https://127.0.0.1:{port}/dicom-web/studies", data=stow_body(), verify=str(pki / "ca.crt"),
                      headers={"Content-Type": STOW_TYPE, "Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200
    assert requests.get(f"https://127.0.0.1:{port}/health", verify=str(pki / "ca.crt"), timeout=10).ok
    with pytest.raises(requests.exceptions.SSLError):  # not our CA
        requests.get(f"https://127.0.0.1:{port}/health", timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP to the TLS port
        requests.get(f"http://127.0.0.1:{port}/health", timeout=10)
    # TLS 1.1 and older are refused (BCP 195)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki / "ca.crt")
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname="localhost")
    no_traceback(caplog)


# -- the Orthanc plugin ------------------------------------------------------------------------------

def test_orthanc_config_writes_private_credentials(tmp_path):
    out, creds = tmp_path / "orthanc.json", tmp_path / "credentials"
    result = subprocess.run([sys.executable, "-m", "lungburden.cli", "orthanc-config",
                             "--storage", str(tmp_path / "db"), "--output", str(out), "--credentials-file", str(creds)],
                            check=True, capture_output=True, text=True, timeout=60)
    assert result.stdout == ""
    config = json.loads(out.read_text())
    user, password = creds.read_text().strip().split(":", 1)
    assert config["AuthenticationEnabled"] is True and config["RegisteredUsers"] == {user: password}
    assert password not in result.stderr
    for path in (out, creds):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.integration
@pytest.mark.skipif(not (orthanc_available() and find_plugin(PYTHON_PLUGIN)),
                    reason="needs Debian packages orthanc, orthanc-dicomweb, orthanc-python")
def test_plugin_rest_routes_need_credentials(tmp_path):
    from lungburden.orthanc_plugin.commands import orthanc_config

    server = OrthancServer(tmp_path / "orthanc", dicomweb=False)
    config = orthanc_config(http_port=server.http_port, dicom_port=server.dicom_port,
                            storage=server.workdir / "storage", stable_age=1)
    config["Plugins"] = [p for p in config["Plugins"] if Path(p).exists()]
    config["LungBurden"]["processing"]["model"] = "threshold"
    server.config.update(config)
    assert server.auth is not None
    with server:
        series = f"{'0' * 8}{'-00000000' * 4}"
        for method, path in (("POST", f"/lungburden/series/{series}/rerun"), ("GET", "/lungburden/jobs"),
                             ("GET", "/lungburden/status"), ("POST", "/lungburden/worker/restart"),
                             ("GET", "/system")):
            assert requests.request(method, server.url + path, timeout=30).status_code == 401, path
            assert requests.request(method, server.url + path, timeout=30,
                                    auth=(server.auth[0], "wrong")).status_code == 401, path
        answer = requests.post(f"{server.url}/lungburden/series/{series}/rerun", auth=server.auth, timeout=30)
        assert answer.status_code == 404
        assert requests.get(f"{server.url}/lungburden/jobs", auth=server.auth, timeout=30).ok
