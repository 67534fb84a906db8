"""The SCP on a hostile network (PS3.8 / PS3.15 BCP 195): slow and idle connections, oversized PDU
claims, malformed data sets, log injection, DICOM TLS. Real sockets, DCMTK storescu and openssl."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from ct_builders import encode, make_ct_dataset, write_ct_series
from node_helpers import InProcessNodes, NodeProcess, storescu
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from lungburden.dicom_io.volume import SeriesRejected, check_series
from lungburden.dicom_node.demo import dcmtk_tool
from lungburden.jobs.spool import CANNOT_UNDERSTAND, DATASET_MISMATCH, printable

HAVE_STORESCU = dcmtk_tool("storescu") is not None
HAVE_OPENSSL = shutil.which("openssl") is not None


@pytest.fixture
def node(tmp_path):
    nodes = InProcessNodes(tmp_path)
    yield lambda **node_options: nodes.start(node=node_options)
    nodes.stop()


def _associate(port: int, aet: str = "TESTSCU", **kwargs):
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="LUNGBURDEN", **kwargs)


def _associate_rq(calling: bytes = b"TESTSCU", called: bytes = b"LUNGBURDEN") -> bytes:
    """A minimal A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification."""
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    ctx = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32) + app + ctx + user
    return struct.pack(">BBL", 1, 0, len(body)) + body


def _closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until the peer closes; returns what it sent (fails if it keeps the connection)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# -- 1. denial of service ------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_STORESCU, reason="DCMTK storescu not installed")
def test_reception_continues_with_idle_and_trickling_connections(node, tmp_path):
    service = node(acse_timeout_seconds=3)
    port = service.scp.port
    stop = threading.Event()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]

    def trickle(sock: socket.socket) -> None:
        rq = _associate_rq()
        for byte in rq:
            if stop.wait(0.5):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in trickling]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        paths = write_ct_series(tmp_path / "in", slices=5)
        started = time.monotonic()
        result = storescu(port, tmp_path / "in", timeout=30)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert elapsed < 5, f"storescu took {elapsed:.1f} s"
        series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
        assert len(service.store.instances(series_uid)) == 5
        # the idle and the trickling connections are closed after the ACSE timeout
        for sock in idle + trickling:
            _closed_by_peer(sock, timeout=10)
    finally:
        stop.set()
        for sock in idle + trickling:
            sock.close()


def test_threads_return_to_baseline_after_connect_close_cycles(node):
    service = node()
    port = service.scp.port
    time.sleep(0.2)
    baseline = threading.active_count()
    for _ in range(500):
        socket.create_connection(("127.0.0.1", port)).close()
    deadline = time.monotonic() + 10
    while threading.active_count() > baseline + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= baseline + 1, [t.name for t in threading.enumerate()]
    assert _associate(port).release() is None  # still answering


def test_association_slots_count_established_associations_only(node):
    service = node(max_associations=8)
    port = service.scp.port
    half_open = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    try:
        results: list = [None] * 12

        def connect(i: int) -> None:
            results[i] = _associate(port)

        threads = [threading.Thread(target=connect, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        established = [a for a in results if a is not None and a.is_established]
        rejected = [a for a in results if a is not None and a.is_rejected]
        assert len(established) == 8 and len(rejected) == 4
        for assoc in established:
            assoc.release()
        time.sleep(0.3)
        assoc = _associate(port)  # the released slots are free again
        assert assoc.is_established
        assoc.release()
    finally:
        for sock in half_open:
            sock.close()


def test_pending_connections_are_capped(node):
    service = node(max_pending_connections=4, acse_timeout_seconds=5)
    port = service.scp.port
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port))
        assert _closed_by_peer(extra, timeout=5) == b""
        extra.close()
        assert service.scp.stats.dropped >= 1
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    assoc = _associate(port)
    assert assoc.is_established
    assoc.release()


# -- 2. oversized claims -------------------------------------------------------------------------
def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024  # MiB
    raise KeyError(key)


def _flood(port: int, header: bytes, prefix: bytes = b"", megabytes: int = 200) -> None:
    """Send ``header`` then zeros until the node closes the connection (or ``megabytes`` are sent)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        sock.sendall(prefix + header)
        chunk = bytes(1 << 20)
        try:
            for _ in range(megabytes):
                sock.sendall(chunk)
        except OSError:
            return


def test_oversized_pdu_claims_are_refused_before_buffering(tmp_path):
    with NodeProcess(tmp_path / "node", {"node": {"allowed_calling_aets": ["GOODSCU"]}}) as proc:
        pid = proc.process.pid
        before = _vm(pid, "VmRSS")
        # A-ASSOCIATE-RQ claiming 4 GiB, from a calling AE that is not allowed
        rq = _associate_rq(calling=b"EVILSCU")
        _flood(proc.port, struct.pack(">BBL", 1, 0, 0xFFFFFFFF) + rq[6:74])
        # A-ASSOCIATE-RQ claiming 4 GiB with no fixed part yet
        _flood(proc.port, struct.pack(">BBL", 1, 0, 0xFFFFFFFF))
        # P-DATA-TF claiming 4 GiB inside an established association
        ae = AE(ae_title="GOODSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", proc.port, ae_title="LUNGBURDEN")
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBL", 4, 0, 0xFFFFFFFF))
        try:
            for _ in range(200):
                raw.sendall(bytes(1 << 20))
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established
        peak = _vm(pid, "VmHWM")
        after = _vm(pid, "VmRSS")
        print(f"node RSS before {before} MiB, peak {peak} MiB, after {after} MiB")
        assert peak < 300, f"peak RSS {peak} MiB (before {before} MiB)"
        assert after < before + 50
        # still answering
        ae2 = AE(ae_title="GOODSCU")
        ae2.add_requested_context(Verification)
        ok = ae2.associate("127.0.0.1", proc.port, ae_title="LUNGBURDEN")
        assert ok.is_established and ok.send_c_echo().Status == 0
        ok.release()
        text = proc.log_text()
        assert text.count("claims 4294967295 bytes") == 3
        assert "Traceback" not in text


def test_calling_ae_is_rejected_from_the_fixed_part_of_the_request(node):
    service = node(allowed_calling_aets=["GOODSCU"])
    with socket.create_connection(("127.0.0.1", service.scp.port)) as sock:
        rq = _associate_rq(calling=b"EVILSCU")
        sock.sendall(rq[:74])  # the rest never comes
        reply = _closed_by_peer(sock, timeout=5)
    assert reply[:1] == b"\x03" and reply[7:10] == bytes([1, 1, 3])  # A-ASSOCIATE-RJ, calling AE


# -- 3. statuses, size limits, logs --------------------------------------------------------------
def _dataset(**changes):
    ds = make_ct_dataset(0, generate_uid(), generate_uid(), generate_uid())
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def test_corrupt_vr_and_empty_pixel_data_get_proper_failure_statuses(node, caplog):
    service = node()
    data = encode(_dataset())
    tag = b"\x08\x00\x16\x00UI"
    assert tag in data
    flipped = data.replace(tag, b"\x08\x00\x16\x00EI", 1)
    with caplog.at_level(logging.WARNING):
        outcome = service.intake.accept(flipped, "test")
        assert outcome.status == CANNOT_UNDERSTAND
        empty = _dataset()
        empty.PixelData = b""
        outcome = service.intake.accept(encode(empty), "test")
        assert outcome.status == DATASET_MISMATCH and "empty" in outcome.reason
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_rle_without_fragments_and_huge_dimensions_are_refused(node):
    service = node()
    rle = _dataset()
    rle.file_meta.TransferSyntaxUID = RLELossless
    rle.PixelData = b"\xfe\xff\x00\xe0" + bytes(4)  # an empty Basic Offset Table item, no fragment
    rle["PixelData"].VR = "OB"
    rle["PixelData"].is_undefined_length = True
    outcome = service.intake.accept(encode(rle), "test")
    assert outcome.status == DATASET_MISMATCH and "fragments" in outcome.reason
    huge = _dataset(Rows=65535, Columns=65535)
    huge.file_meta.TransferSyntaxUID = RLELossless
    huge.PixelData = encapsulate([b"\x01\x00\x00\x00\x40\x00\x00\x00" + bytes(56) + b"\x00\x00"])
    huge["PixelData"].VR = "OB"
    huge["PixelData"].is_undefined_length = True
    outcome = service.intake.accept(encode(huge), "test")
    assert outcome.status == DATASET_MISMATCH and "beyond the limits" in outcome.reason
    # and the worker's loader refuses such a header before allocating anything
    uids = generate_uid(), generate_uid(), generate_uid()
    headers = [make_ct_dataset(i, *uids) for i in range(20)]
    for ds in headers:
        ds.Rows = ds.Columns = 65535
    with pytest.raises(SeriesRejected, match="beyond the limits"):
        check_series(headers)


def test_random_bytes_log_one_line_per_connection(node, caplog):
    service = node()
    rng = __import__("random").Random(5)
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", service.scp.port)) as sock:
            try:
                sock.sendall(bytes(rng.randrange(256) for _ in range(5120)))
            except OSError:
                pass
            _closed_by_peer(sock)
        time.sleep(0.5)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(problems) <= 2, [r.getMessage() for r in problems]
    assert not any(r.exc_info for r in caplog.records)


def test_control_characters_from_the_wire_are_escaped_in_the_log(node, caplog):
    assert printable("1.2\nFORGED LINE\x1b[31m") == "1.2\\nFORGED LINE\\x1b[31m"
    service = node(allowed_calling_aets=["GOODSCU"])
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", service.scp.port)) as sock:
            sock.sendall(_associate_rq(calling=b"EV\nIL"))
            _closed_by_peer(sock)
        ds = _dataset()
        ds.SOPInstanceUID = "1.2.3\nERROR forged"
        ds.SeriesDescription = "Doe^John chest"
        outcome = service.intake.accept(encode(ds), "dimse:EV\nIL")
        assert not outcome.ok
    lines = caplog.text.splitlines()
    assert not any(line.startswith(("IL", "ERROR forged")) for line in lines), caplog.text
    assert "EV\\nIL" in caplog.text
    assert "Doe^John" not in caplog.text


# -- 5. files ------------------------------------------------------------------------------------
def test_spool_files_and_folders_are_private(node):
    service = node()
    outcome = service.intake.accept(encode(_dataset()), "test")
    assert outcome.ok
    assert outcome.path.stat().st_mode & 0o777 == 0o600
    for folder in (outcome.path.parent, outcome.path.parent.parent, service.spool.root, service.spool.storage_dir):
        assert folder.stat().st_mode & 0o777 == 0o700, folder


# -- 4. DICOM TLS --------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> Path:
    """A CA, a server certificate (CN localhost, SAN 127.0.0.1), a client certificate
    (CN scanner1) and a client certificate of another CA (CN rogue)."""
    folder.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                 "-subj", f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=folder)
    for name, ca, ext in (("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                          ("scanner1", "ca", "extendedKeyUsage=clientAuth"),
                          ("other", "ca", "extendedKeyUsage=clientAuth"),
                          ("rogue", "rogue-ca", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)
        (folder / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=folder)
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not HAVE_OPENSSL:
        pytest.skip("openssl not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_node(node, pki: Path, **tls):
    return node(allowed_calling_aets=["SCANNER1", "TESTSCU", "STORESCU"], tls={
        "certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key"),
        "ca_certificates": str(pki / "ca.crt"), **tls})


def _client_context(pki: Path, name: str | None = "scanner1"):
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if name:
        ctx.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    return ctx


@pytest.mark.skipif(not HAVE_STORESCU, reason="DCMTK storescu not installed")
def test_tls_storescu_and_pynetdicom(node, pki, tmp_path):
    service = _tls_node(node, pki)
    port = service.scp.port
    paths = write_ct_series(tmp_path / "in", slices=3)
    result = storescu(port, tmp_path / "in", extra=["+tls", str(pki / "scanner1.key"), str(pki / "scanner1.crt"),
                                                    "+cf", str(pki / "ca.crt")])
    assert result.returncode == 0, result.stderr
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    assert len(service.store.instances(series_uid)) == 3
    assoc = _associate(port, tls_args=(_client_context(pki), "localhost"))
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_tls_refuses_untrusted_missing_certificates_and_plain_tcp(node, pki):
    service = _tls_node(node, pki)
    port = service.scp.port
    for name in ("rogue", None):
        assoc = _associate(port, tls_args=(_client_context(pki, name), "localhost"))
        assert not assoc.is_established
    assoc = _associate(port)  # plain TCP against the TLS port
    assert not assoc.is_established
    assoc = _associate(port, tls_args=(_client_context(pki), "localhost"))
    assert assoc.is_established
    assoc.release()


def test_tls_client_certificate_maps_to_ae_titles(node, pki):
    service = _tls_node(node, pki, client_ae_by_certificate=[{"common_name": "scanner1", "ae_titles": ["SCANNER1"]}])
    port = service.scp.port
    assoc = _associate(port, aet="SCANNER1", tls_args=(_client_context(pki), "localhost"))
    assert assoc.is_established
    assoc.release()
    # the certificate does not cover this AE title; a certificate not listed is refused
    assert _associate(port, aet="TESTSCU", tls_args=(_client_context(pki), "localhost")).is_rejected
    assert not _associate(port, aet="SCANNER1", tls_args=(_client_context(pki, "other"), "localhost")).is_established


def test_cstore_destination_over_tls(node, pki):
    from lungburden.config.schema import DestinationTlsConfig, DimseDestination
    from lungburden.jobs.exporters import DimseExporter

    service = _tls_node(node, pki)
    dest = DimseDestination(name="n", host="127.0.0.1", port=service.scp.port, ae_title="LUNGBURDEN",
                            tls=DestinationTlsConfig(ca_certificates=pki / "ca.crt", certificate=pki / "scanner1.crt",
                                                     private_key=pki / "scanner1.key", server_name="localhost"))
    exporter = DimseExporter(dest, "SCANNER1", timeout=10)
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", service.scp.port, ae_title="LUNGBURDEN", tls_args=exporter.tls_args)
    assert assoc.is_established
    assert assoc.send_c_store(_dataset()).Status == 0
    assoc.release()
    # the peer's name is verified
    wrong = DimseExporter(DimseDestination(name="n", host="127.0.0.1", port=service.scp.port, ae_title="LUNGBURDEN",
                                           tls=DestinationTlsConfig(ca_certificates=pki / "ca.crt",
                                                                    certificate=pki / "scanner1.crt",
                                                                    private_key=pki / "scanner1.key",
                                                                    server_name="pacs.example")), "SCANNER1", 10)
    assert not ae.associate("127.0.0.1", service.scp.port, ae_title="LUNGBURDEN",
                            tls_args=wrong.tls_args).is_established


if os.environ.get("LUNGBURDEN_KEEP_PKI"):  # pragma: no cover - for generating a test PKI by hand
    make_pki(Path(os.environ["LUNGBURDEN_KEEP_PKI"]))
