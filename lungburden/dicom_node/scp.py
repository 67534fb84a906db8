"""The C-ECHO / C-STORE SCP of the node (pynetdicom; PS3.4 Annex A Verification, Annex B Storage).

Conformance (docs/node.md): Verification; CT Image Storage and (by default) Enhanced CT Image
Storage as SCP, in every transfer syntax of :data:`TRANSFER_SYNTAXES`. The handler never decodes
the data set: it hands ``event.encoded_dataset()`` to :class:`~lungburden.jobs.spool.Intake`,
which writes it durably (fsync) before the Success response. Associations are limited to
``node.max_associations``; calling AE titles to ``node.allowed_calling_aets`` (empty = any).
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

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

from lungburden.config.schema import NodeConfig
from lungburden.jobs.spool import Intake

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


@dataclass
class ScpStats:
    associations: int = 0
    stored: int = 0
    refused: int = 0
    bytes_stored: int = 0


class StorageSCP:
    """A running C-STORE SCP; ``port`` is the bound port (useful when configured as 0)."""

    def __init__(self, node: NodeConfig, intake: Intake):
        self.node = node
        self.intake = intake
        self.stats = ScpStats()
        self._lock = threading.Lock()
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.network_timeout = node.network_timeout_seconds
        ae.acse_timeout = node.network_timeout_seconds
        ae.dimse_timeout = node.network_timeout_seconds
        ae.maximum_pdu_size = node.maximum_pdu_size
        ae.add_supported_context(Verification)
        for sop_class in sorted(storage_sop_classes(node)):
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.ae = ae
        self._server = None

    # -- event handlers (PS3.7 9.1.1 C-STORE, 9.1.5 C-ECHO) -------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset | int:
        calling = event.assoc.requestor.ae_title.strip() if event.assoc else "?"
        request = event.request
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a broken file meta
            log.warning("cannot read a C-STORE data set from %s: %s", calling, exc)
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

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self.stats.associations += 1
        log.info("association accepted from %s (%s:%s)", event.assoc.requestor.ae_title.strip(),
                 event.assoc.requestor.address, event.assoc.requestor.port)

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("association rejected from %s (%s)", event.assoc.requestor.ae_title.strip(),
                    event.assoc.requestor.address)

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("association aborted with %s", event.assoc.requestor.ae_title.strip())

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> StorageSCP:
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        server = self.ae.start_server((self.node.host, self.node.port), block=False, evt_handlers=handlers)
        accept = server.get_request

        def get_request() -> tuple[socket.socket, object]:
            # Disable Nagle's algorithm: small C-STORE responses must not wait for delayed ACKs.
            sock, address = accept()
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            return sock, address

        server.get_request = get_request  # type: ignore[method-assign]
        self._server = server
        log.info("DICOM SCP %s listening on %s:%d (associations <= %d, calling AEs: %s)",
                 self.node.ae_title, self.node.host, self.port, self.node.max_associations,
                 ", ".join(self.node.allowed_calling_aets) or "any")
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
