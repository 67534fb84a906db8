"""The C-ECHO / C-STORE SCP of the node (pynetdicom; PS3.4 Annex A Verification, Annex B Storage).

Conformance (docs/node.md): Verification; CT Image Storage and (by default) Enhanced CT Image
Storage as SCP, in every transfer syntax of :data:`TRANSFER_SYNTAXES`. The handler never decodes
the data set: it hands ``event.encoded_dataset()`` to :class:`~lungburden.jobs.spool.Intake`,
which writes it durably (fsync) before the Success response.

Network hardening (docs/hardening.md): a connection must finish its TLS handshake and deliver its
A-ASSOCIATE-RQ within ``node.acse_timeout_seconds`` (PS3.8 9.1.5 ARTIM), otherwise it is closed;
connections still negotiating are capped by ``node.max_pending_connections`` and do not hold one
of the ``node.max_associations`` slots, which count established associations only. PDU lengths are
checked before anything is buffered (A-ASSOCIATE-RQ at most :data:`MAX_ASSOCIATE_RQ_BYTES`,
P-DATA-TF at most the advertised Maximum Length, PS3.8 D.3.3.1), and the calling AE title is
checked against ``node.allowed_calling_aets`` (and the AE titles bound to the TLS client
certificate) as soon as the fixed part of the A-ASSOCIATE-RQ is read. Protocol errors are logged
once per connection, with control characters escaped. DICOM TLS follows PS3.15 B.1 / BCP 195.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
import types
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from lungburden.config.schema import NodeConfig, NodeTlsConfig
from lungburden.jobs.spool import Intake, printable

log = logging.getLogger(__name__)

#: Transfer syntaxes accepted for storage: the uncompressed ones and the common compressed ones
#: that pydicom 3 decodes with pylibjpeg (JPEG, JPEG-LS, JPEG 2000, HTJ2K lossless, RLE).
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
]


def storage_sop_classes(node: NodeConfig) -> frozenset[str]:
    classes = {CTImageStorage}
    if node.accept_enhanced_ct:
        classes.add(EnhancedCTImageStorage)
    return frozenset(classes)


def _status(status: int, comment: str = "") -> Dataset | int:
    if not comment:
        return status
    ds = Dataset()
    ds.Status = status
    # Error Comment (0000,0902) is LO: at most 64 characters, no backslash.
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds



#: Largest A-ASSOCIATE-RQ (and any other non-data PDU) read from a peer: a request proposing the
#: 128 presentation contexts PS3.8 allows, with several transfer syntaxes each, is far smaller.
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024
#: Largest P-DATA-TF accepted when ``node.maximum_pdu_size`` is 0 (no Maximum Length advertised).
MAX_PDATA_BYTES_UNLIMITED = 64 * 2**20
#: After association, a PDU must arrive at this rate at least (bytes/s) on top of the idle timeout.
MIN_PDU_RATE = 64 * 1024
#: PS3.8 9.3.8 A-ABORT, source 2 (service provider), reason 2 (unexpected PDU) / 1 (unrecognised).
_ABORT_UNEXPECTED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 2])
_ABORT_UNRECOGNISED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1])
#: PS3.8 9.3.4 A-ASSOCIATE-RJ: permanent, service user, calling AE title not recognised.
_REJECT_CALLING_AE = bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3])


def tls_server_context(tls: NodeTlsConfig) -> ssl.SSLContext:
    """Server :class:`ssl.SSLContext` of the SCP: TLS 1.2 or later (BCP 195), the node's certificate,
    and client certificates verified against ``ca_certificates`` (required unless configured off)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _common_name(cert: dict | None) -> str:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


class _ProtocolLog:
    """At most one protocol-error line per connection, with control characters escaped."""

    def __init__(self, peer: str):
        self.peer = peer
        self.logged = False

    def error(self, message: str, *args: object) -> None:
        if self.logged:
            log.debug("DICOM protocol error from %s: " + message, self.peer, *(printable(a) for a in args))
            return
        self.logged = True
        log.warning("DICOM protocol error from %s: " + message + "; connection closed",
                    self.peer, *(printable(a) for a in args))


@dataclass
class _Connection:
    """One accepted TCP connection: its pending-slot and what its TLS certificate allows."""

    scp: StorageSCP
    peer: str
    deadline: float
    plog: _ProtocolLog
    #: AE titles the TLS client certificate may use; None = no certificate mapping applies.
    certificate_aets: frozenset[str] | None = None
    certificate_cn: str = ""
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Give back the pending slot (once: on association, or when the connection ends)."""
        with self.scp._lock:
            if not self._released:
                self._released = True
                self.scp._pending -= 1


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    """Read exactly ``n`` bytes before ``deadline`` (monotonic); None if the peer closed first."""
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _guarded_read_pdu_data(dul) -> None:  # noqa: ANN001 - pynetdicom DULServiceProvider
    """Replacement of ``DULServiceProvider._read_pdu_data`` (pynetdicom 3) for accepted connections.

    Reads the 6-byte PDU header, refuses a length above the limit of the PDU type before reading
    (or allocating) the rest, and reads under a deadline: before association the connection's
    ACSE deadline, afterwards the network timeout plus the length at :data:`MIN_PDU_RATE`.
    Problems close the connection (A-ABORT where PS3.8 9.2 asks for one), logged once.
    """
    conn: _Connection = dul._lb_connection
    asock = dul.socket
    raw = asock.socket if asock is not None else None
    if raw is None:
        dul.event_queue.put("Evt17")
        return
    node = conn.scp.node
    # Sta1-Sta3: no association yet (PS3.8 9.2 state table); Sta5 is the requestor's.
    associated = dul.state_machine.current_state not in ("Sta1", "Sta2", "Sta3")
    idle = node.network_timeout_seconds
    deadline = (time.monotonic() + idle) if associated else conn.deadline

    def close(abort: bytes | None = None) -> None:
        if abort is not None:
            try:
                raw.settimeout(1.0)
                raw.sendall(abort)
            except OSError:
                pass
        if not associated:
            dul.to_user_queue.put(None)  # ends the acceptor's wait for an A-ASSOCIATE-RQ at once
        if asock.socket is not None:
            asock.close()  # Evt17: transport connection closed
        else:
            dul.event_queue.put("Evt17")

    try:
        header = _recv_exact(raw, 6, deadline)
        if header is None:
            close()
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            conn.plog.error("unrecognised PDU type 0x%s", f"{pdu_type:02X}")
            close(_ABORT_UNRECOGNISED)
            return
        if pdu_type == 0x04:
            limit = conn.scp.max_pdata_bytes
        else:
            limit = MAX_ASSOCIATE_RQ_BYTES
        if pdu_type == 0x04 and not associated or pdu_type == 0x01 and associated:
            conn.plog.error("unexpected PDU type 0x%s", f"{pdu_type:02X}")
            close(_ABORT_UNEXPECTED)
            return
        if length > limit:
            conn.plog.error("PDU type 0x%s claims %s bytes, more than the limit of %s",
                            f"{pdu_type:02X}", length, limit)
            close(_ABORT_UNEXPECTED)
            return
        if associated:
            deadline = time.monotonic() + idle + length / MIN_PDU_RATE
        body = bytearray()
        if pdu_type == 0x01 and length >= 68:
            # Fixed part (PS3.8 9.3.2): version, reserved, called AE, calling AE, reserved.
            fixed = _recv_exact(raw, 68, deadline)
            if fixed is None:
                close()
                return
            body += fixed
            calling = fixed[20:36].decode("ascii", "replace").strip()
            if not conn.scp.calling_aet_allowed(calling, conn):
                log.warning("association rejected from %s (%s): calling AE title not allowed%s",
                            printable(calling), conn.peer,
                            f" for certificate {printable(conn.certificate_cn)!r}" if conn.certificate_aets
                            is not None else "")
                with conn.scp._lock:
                    conn.scp.stats.rejected += 1
                close(_REJECT_CALLING_AE)
                return
        rest = _recv_exact(raw, length - len(body), deadline)
        if rest is None:
            conn.plog.error("connection closed in the middle of a PDU")
            close()
            return
        body += rest
        raw.settimeout(idle)
    except (OSError, TimeoutError, ValueError) as exc:
        if isinstance(exc, TimeoutError) or isinstance(exc, socket.timeout):
            conn.plog.error("%s", "no complete PDU within the timeout" if associated
                            else "association not requested within the ACSE timeout")
        else:
            conn.plog.error("%s", f"{type(exc).__name__}: {exc}")
        close()
        return
    try:
        pdu, event = dul._decode_pdu(bytearray(header) + body)
    except Exception as exc:  # noqa: BLE001 - malformed PDU from the network
        conn.plog.error("undecodable PDU type 0x%s (%s)", f"{pdu_type:02X}", type(exc).__name__)
        close(_ABORT_UNRECOGNISED)
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


class _GuardedHandler(RequestHandler):
    """Per-connection handler: TLS handshake and first bytes under the ACSE deadline, then the
    pynetdicom association with :func:`_guarded_read_pdu_data`, in this connection's thread."""

    server: _GuardedServer

    def handle(self) -> None:
        scp = self.server.scp
        node = scp.node
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        conn = _Connection(scp, peer, time.monotonic() + node.acse_timeout_seconds, _ProtocolLog(peer))
        sock: socket.socket = self.request
        try:
            if scp.ssl_context is not None:
                sock = scp.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                sock.settimeout(max(conn.deadline - time.monotonic(), 0.001))
                sock.do_handshake()
                if not scp.map_certificate(sock, conn):
                    return
            else:
                readable, _, _ = select.select([sock], [], [], max(conn.deadline - time.monotonic(), 0))
                if not readable:
                    log.info("connection from %s closed: no A-ASSOCIATE-RQ within %.0f s", peer,
                             node.acse_timeout_seconds)
                    return
                if not sock.recv(1, socket.MSG_PEEK):
                    return  # opened and closed without a word (port scan, load balancer probe)
            sock.settimeout(node.network_timeout_seconds)
            self.request = sock
            assoc = self._create_association()
            assoc._lb_connection = conn
            assoc.dul._lb_connection = conn
            assoc.dul._read_pdu_data = types.MethodType(_guarded_read_pdu_data, assoc.dul)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        except (OSError, ssl.SSLError) as exc:
            reason = "TLS handshake timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            conn.plog.error("%s", reason)
        finally:
            conn.release()
            for s in {id(sock): sock, id(self.request): self.request}.values():
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass


class _GuardedServer(ThreadedAssociationServer):
    """Association server with the pending-connection cap and TCP_NODELAY on accepted sockets."""

    daemon_threads = True
    #: listen() backlog (socketserver's default of 5 drops bursts of connection attempts).
    request_queue_size = 256
    scp: StorageSCP

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = self.socket.accept()
        try:
            # Disable Nagle's algorithm: small C-STORE responses must not wait for delayed ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        scp = self.scp
        with scp._lock:
            full = scp._pending >= scp.node.max_pending_connections
            if not full:
                scp._pending += 1
            else:
                scp.stats.dropped += 1
        if full:
            now = time.monotonic()
            if now - scp._last_drop_log > 10:
                scp._last_drop_log = now
                log.warning("%d connections still negotiating (node.max_pending_connections): closing new "
                            "connections, e.g. from %s", scp.node.max_pending_connections, address[0])
            sock.close()
            raise OSError("too many pending connections")  # socketserver drops the request
        return sock, address


class _RateLimit(logging.Filter):
    """On pynetdicom's and pydicom's loggers: escape control characters, drop tracebacks, and pass at most
    ``burst`` ERROR records per minute (our own per-connection line says what happened)."""

    def __init__(self, burst: int = 5):
        super().__init__()
        self.burst = burst
        self.window = 0.0
        self.count = 0
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            message = str(record.msg)
        record.msg, record.args = printable(message, 500), ()
        if record.exc_info:
            record.exc_info = None
            record.exc_text = None
        if record.levelno < logging.ERROR:
            return True
        with self.lock:
            now = time.monotonic()
            if now - self.window > 60:
                self.window, self.count = now, 0
            self.count += 1
            return self.count <= self.burst


_PYNETDICOM_FILTER = _RateLimit()


def _install_log_filter() -> None:
    names = ["pynetdicom", "pydicom"] + [n for n in logging.root.manager.loggerDict
                                         if n.startswith(("pynetdicom.", "pydicom."))]
    for name in names:
        logger = logging.getLogger(name)
        if _PYNETDICOM_FILTER not in logger.filters:
            logger.addFilter(_PYNETDICOM_FILTER)


@dataclass
class ScpStats:
    associations: int = 0
    stored: int = 0
    refused: int = 0
    bytes_stored: int = 0
    #: Associations rejected (calling AE, certificate, association limit).
    rejected: int = 0
    #: Connections closed at once because too many were still negotiating.
    dropped: int = 0


class StorageSCP:
    """A running C-STORE SCP; ``port`` is the bound port (useful when configured as 0)."""

    def __init__(self, node: NodeConfig, intake: Intake):
        self.node = node
        self.intake = intake
        self.stats = ScpStats()
        self._lock = threading.Lock()
        self._pending = 0
        self._last_drop_log = 0.0
        self._admitted: list[object] = []
        self.ssl_context = tls_server_context(node.tls) if node.tls is not None else None
        self._allowed = frozenset(a.strip() for a in node.allowed_calling_aets)
        self._certificate_aets = {
            m.common_name: frozenset(a.strip() for a in m.ae_titles)
            for m in (node.tls.client_ae_by_certificate if node.tls is not None else [])
        }
        self.max_pdata_bytes = node.maximum_pdu_size + 6 if node.maximum_pdu_size else MAX_PDATA_BYTES_UNLIMITED
        ae = AE(ae_title=node.ae_title)
        # Established associations are limited in _on_requested; pynetdicom's own count includes
        # connections still negotiating, so its limit only has to stay out of the way.
        ae.maximum_associations = node.max_associations + node.max_pending_connections + 1
        ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.network_timeout = node.network_timeout_seconds
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.network_timeout_seconds
        ae.maximum_pdu_size = node.maximum_pdu_size
        ae.add_supported_context(Verification)
        for sop_class in sorted(storage_sop_classes(node)):
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.ae = ae
        self._server: _GuardedServer | None = None
        self._thread: threading.Thread | None = None

    # -- admission -----------------------------------------------------------------------------
    def calling_aet_allowed(self, calling: str, conn: _Connection) -> bool:
        if self._allowed and calling not in self._allowed:
            return False
        return conn.certificate_aets is None or calling in conn.certificate_aets

    def map_certificate(self, sock: ssl.SSLSocket, conn: _Connection) -> bool:
        """Bind the AE titles of a verified client certificate (``client_ae_by_certificate``)."""
        cert = sock.getpeercert() if sock.getpeercert(binary_form=True) else None
        conn.certificate_cn = _common_name(cert)
        if not self._certificate_aets:
            return True
        aets = self._certificate_aets.get(conn.certificate_cn)
        if aets is None:
            log.warning("TLS connection from %s closed: certificate %r is not in node.tls.client_ae_by_certificate",
                        conn.peer, printable(conn.certificate_cn) or "(none)")
            with self._lock:
                self.stats.rejected += 1
            return False
        conn.certificate_aets = aets
        return True

    # -- event handlers (PS3.7 9.1.1 C-STORE, 9.1.5 C-ECHO) -------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset | int:
        calling = printable(event.assoc.requestor.ae_title.strip()) if event.assoc else "?"
        request = event.request
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a broken file meta
            log.warning("cannot read a C-STORE data set from %s: %s", calling, printable(exc))
            with self._lock:
                self.stats.refused += 1
            return _status(0xC000, "cannot read the data set")
        outcome = self.intake.accept(
            data,
            source=f"dimse:{calling}",
            expected_sop_class=str(request.AffectedSOPClassUID or ""),
            expected_sop_instance=str(request.AffectedSOPInstanceUID or ""),
        )
        with self._lock:
            if outcome.ok:
                self.stats.stored += 1
                self.stats.bytes_stored += len(data)
            else:
                self.stats.refused += 1
        return _status(outcome.status, outcome.reason)

    def _on_requested(self, event: evt.Event) -> None:
        """A-ASSOCIATE-RQ received: admit it only if an association slot is free (transient
        rejection 'local limit exceeded' otherwise, PS3.8 9.3.4)."""
        assoc = event.assoc
        with self._lock:
            self._admitted = [a for a in self._admitted
                              if a.is_alive() and not (a.is_released or a.is_aborted or a.is_rejected)]
            full = len(self._admitted) >= self.node.max_associations
            if full:
                self.stats.rejected += 1
            else:
                self._admitted.append(assoc)
        if full:
            calling = printable(str(assoc.requestor.primitive.calling_ae_title).strip())
            log.warning("association from %s rejected: %d associations active (node.max_associations)",
                        calling, self.node.max_associations)
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        conn = getattr(event.assoc, "_lb_connection", None)
        if conn is not None:
            conn.release()
        with self._lock:
            self.stats.associations += 1
        log.info("association accepted from %s (%s:%s)%s", printable(event.assoc.requestor.ae_title.strip()),
                 event.assoc.requestor.address, event.assoc.requestor.port,
                 f", TLS certificate {printable(conn.certificate_cn)!r}" if conn is not None and conn.certificate_cn
                 else "")

    def _on_rejected(self, event: evt.Event) -> None:
        with self._lock:
            self.stats.rejected += 1
        log.warning("association rejected from %s (%s)", printable(event.assoc.requestor.ae_title.strip()),
                    event.assoc.requestor.address)

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("association aborted with %s", printable(event.assoc.requestor.ae_title.strip()))

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> StorageSCP:
        _install_log_filter()
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        server = self.ae.make_server((self.node.host, self.node.port), evt_handlers=handlers,
                                     server_class=_GuardedServer, request_handler=_GuardedHandler)
        server.scp = self
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, name="DicomScpAcceptor", daemon=True)
        self._thread.start()
        self._server = server
        log.info("DICOM SCP %s listening on %s:%d%s (associations <= %d, calling AEs: %s)",
                 self.node.ae_title, self.node.host, self.port, " with TLS" if self.ssl_context else "",
                 self.node.max_associations, ", ".join(self.node.allowed_calling_aets) or "any")
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            return self.node.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
