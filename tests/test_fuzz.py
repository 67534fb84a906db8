"""Bounded fuzzing of the node's input handling with Hypothesis (deterministic: the same examples
on every run).

What a sender controls reaches three parsers: the instance intake of C-STORE and STOW-RS (a
PS3.10 byte stream, :class:`lungburden.jobs.spool.Intake`), the series loader of the worker
(:func:`lungburden.dicom_io.volume.load_files`, on what the intake accepted) and the HTTP front
door (request head and ``multipart/related`` body, PS3.18 10.5). Every input must end in a
failure status, a :class:`SeriesRejected` or a 4xx — never an exception, a "processing failure"
status (0x0110, the intake's catch-all) or a 5xx.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ct_builders import encode, make_ct_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node_helpers import InProcessNodes
from pydicom.uid import generate_uid

from lungburden.dicom_io.volume import LoadLimits, SeriesRejected, load_files
from lungburden.dicom_node.http import parse_multipart_related
from lungburden.jobs.queue import JobStore
from lungburden.jobs.spool import PROCESSING_FAILURE, Intake, Spool


def fuzz(examples: int) -> settings:
    """Deterministic, bounded Hypothesis settings (no example database in the checkout)."""
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLICES = 16


def _series_bytes() -> list[bytes]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    return [encode(make_ct_dataset(i, study, series, frame, rows=16, cols=16)) for i in range(SLICES)]


SERIES = _series_bytes()
#: Where the header ends and Pixel Data starts: mutations aim at the header most of the time.
HEADER_END = SERIES[0].find(b"\xe0\x7f\x10\x00")

#: A mutation: ``(kind, position, value)`` applied in order to an encoded instance.
mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]),
                     st.one_of(st.integers(128, HEADER_END + 16), st.integers(0, len(SERIES[0]) - 1)),
                     st.integers(0, 255))


def mutate(data: bytes, mutations: list[tuple[str, int, int]], truncate: int | None) -> bytes:
    """``data`` with the byte ``mutations`` applied and cut to ``truncate`` bytes (None: whole)."""
    out = bytearray(data)
    for kind, pos, value in mutations:
        pos = min(pos, max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[pos] ^= 1 << (value % 8)
        elif kind == "set" and out:
            out[pos] = value
        elif kind == "insert":
            out[pos:pos] = bytes([value]) * (1 + value % 4)
        elif kind == "delete":
            del out[pos:pos + 1 + value % 4]
    return bytes(out if truncate is None else out[:truncate])


@pytest.fixture(scope="module")
def intake(tmp_path_factory):
    storage = tmp_path_factory.mktemp("fuzz-spool")
    return Intake(Spool(storage), JobStore.for_storage(storage))


@fuzz(800)
@given(mutations=st.lists(mutation, min_size=1, max_size=6),
       truncate=st.one_of(st.none(), st.integers(0, len(SERIES[0]))),
       index=st.integers(0, SLICES - 1))
def test_a_mutated_instance_is_stored_or_refused_with_a_status(intake, mutations, truncate, index):
    data = mutate(SERIES[index], mutations, truncate)
    outcome = intake.accept(data, source="dimse:FUZZ")
    assert outcome.status != PROCESSING_FAILURE, outcome.reason
    assert outcome.ok or outcome.reason


@fuzz(60)
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused_with_a_status(intake, data):
    outcome = intake.accept(b"\0" * 128 + b"DICM" + data, source="stow:FUZZ")
    assert not outcome.ok and outcome.status != PROCESSING_FAILURE, outcome.reason


@fuzz(80)
@given(mutations=st.lists(mutation, min_size=1, max_size=4), index=st.integers(0, SLICES - 1))
def test_a_series_with_an_accepted_mutated_instance_loads_or_is_rejected(tmp_path, mutations, index):
    """What the intake accepted reaches the worker: it loads, or is refused as a series."""
    data = mutate(SERIES[index], mutations, None)
    storage = tmp_path / generate_uid()
    intake = Intake(Spool(storage), JobStore.for_storage(storage))
    if not intake.accept(data, source="dimse:FUZZ").ok:
        return
    paths = []
    for i, raw in enumerate(SERIES):
        path = storage / f"{i:03d}.dcm"
        path.write_bytes(data if i == index else raw)
        paths.append(path)
    try:
        volume = load_files(paths, LoadLimits(min_slices=SLICES))
    except SeriesRejected as exc:
        assert str(exc)
    else:
        assert volume.hu.shape[0] == SLICES and np.isfinite(volume.hu).all()


BOUNDARY = "FUZZ-BOUNDARY"


@fuzz(300)
@given(content_type=st.one_of(st.just(f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'),
                              st.text(max_size=80)),
       parts=st.lists(st.binary(max_size=64), max_size=4),
       noise=st.binary(max_size=64), cut=st.integers(0, 400))
def test_multipart_bodies_parse_or_fail_with_a_value_error(content_type, parts, noise, cut):
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + noise + b"--" + BOUNDARY.encode() + b"--"
    try:
        spans = parse_multipart_related(content_type, body[:cut] if cut < len(body) else body)
    except ValueError:
        return
    assert all(isinstance(headers, dict) and isinstance(content, bytes) for headers, content in spans)


@pytest.fixture(scope="module")
def http_node(tmp_path_factory):
    nodes = InProcessNodes(tmp_path_factory.mktemp("fuzz-node"))
    yield nodes.start(http={"keep_alive_seconds": 1, "timeout_seconds": 2})
    nodes.stop()


token = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)


def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes (or 5 s pass: a request waiting for
    more body is cut by the server's own timeout)."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return reply


@fuzz(60)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "G\x00T"]),
       path=st.one_of(st.sampled_from(["/studies", "/jobs", "/jobs/1", "/health", "/dicom-web/studies/1.2"]),
                      token),
       headers=st.lists(st.tuples(st.sampled_from(["Content-Length", "Content-Type", "Transfer-Encoding",
                                                   "Authorization", "Host", "X"]), token), max_size=4),
       body=st.binary(max_size=200))
def test_malformed_http_requests_get_a_4xx_and_the_server_keeps_serving(http_node, method, path, headers, body):
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{fields}"
    reply = _exchange(http_node.http.port, head.encode("latin-1") + b"\r\n" + body)
    if reply:  # h11 may close a connection it cannot parse without a reply
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
        assert 100 <= status < 500, reply[:200]
    health = _exchange(http_node.http.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 "), health[:200]


def test_the_fuzzed_intake_stores_unmodified_instances(tmp_path):
    """The fuzz targets are live: an unmodified instance is stored and its series loads."""
    intake = Intake(Spool(tmp_path), JobStore.for_storage(tmp_path))
    assert all(intake.accept(raw, source="dimse:FUZZ").ok for raw in SERIES)
    paths = [tmp_path / f"{i}.dcm" for i in range(SLICES)]
    for path, raw in zip(paths, SERIES, strict=True):
        path.write_bytes(raw)
    assert load_files(paths, LoadLimits(min_slices=SLICES)).hu.shape == (SLICES, 16, 16)
    assert pydicom.dcmread(Path(paths[0])).Rows == 16
