"""Priors from a PACS that speaks DIMSE only: Study Root C-FIND, C-GET or C-MOVE, results back by C-STORE.

Many PACS answer queries and retrievals over DICOM networking and not over DICOMweb.
:class:`DimseQueryRetrieve` is the SCU (pynetdicom) towards one such peer:

- :meth:`~DimseQueryRetrieve.find`: C-FIND with the Study Root Query/Retrieve Information Model
  (PS3.4 C.4.1) at STUDY or SERIES level;
- :meth:`~DimseQueryRetrieve.get_series`: C-GET of one series (PS3.4 C.4.3) on the same
  association as the C-STORE sub-operations it triggers, so the PACS needs no route back to
  lungburden; our side takes the Storage SCP role for CT images and SR documents (SCP/SCU Role
  Selection, PS3.7 D.3.3.4). For a PACS without C-GET, ``move_to``
  (:class:`~lungburden.config.schema.MoveReceiver`) makes it a C-MOVE (PS3.4 C.4.2) to an AE
  title the PACS knows for lungburden, received by a Storage SCP that lungburden runs on that
  port for the time of the search and that takes only instances of the series being retrieved.

One association carries the requests of a search; it is released before a prior is analysed
(a PACS ends idle associations) and opened again for the next request.

:class:`DimsePriors` is the :class:`~lungburden.followup.sources.PriorSource` built on it: the
patient's CT studies by C-FIND; the SR series of a prior by C-FIND and C-GET (or C-MOVE); a prior
without a lungburden SR has its CT series retrieved the same way, chosen with the node's rules on the
retrieved headers (:func:`lungburden.archive.search.choose_series`), analysed by the one
pipeline (:func:`lungburden.archive.tasks.analyse_files`) and its results sent back by C-STORE
(:class:`lungburden.jobs.exporters.DimseExporter`, DICOM TLS when configured).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

from lungburden.archive.search import choose_series
from lungburden.archive.tasks import analyse_files
from lungburden.config.schema import DimseDestination, FollowupConfig, MoveReceiver, SelectionConfig
from lungburden.dicom_io.series import discover_series
from lungburden.dicom_io.volume import SeriesRejected
from lungburden.dicom_node.scp import TRANSFER_SYNTAXES
from lungburden.followup.sources import STUDY_KEYS, AnalysedPrior, PriorUnavailable, text_of
from lungburden.jobs.exporters import DimseExporter, ExportError, peer_tls_args

log = logging.getLogger(__name__)

#: Study Root Query/Retrieve Information Model - FIND, - MOVE and - GET (PS3.4 C.4.1-C.4.3).
FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"
#: Storage SOP classes taken in a C-GET: CT images and the SR documents a lungburden SR may be.
GET_STORAGE_CLASSES = (
    CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage,
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
)
_SUCCESS, _PENDING = 0x0000, (0xFF00, 0xFF01)
#: C-STORE status for an instance no retrieval is waiting for (Refused: Out of Resources).
_REFUSED = 0xA700


class DimseError(RuntimeError):
    """The peer refused the association or a request failed (the message says which and how)."""


class DimseQueryRetrieve:
    """C-FIND and C-GET (or C-MOVE to ``move_to``) SCU towards ``peer`` (module docstring), on one
    association kept open from the first request to :meth:`close` (opened again if the peer
    ended it)."""

    def __init__(self, peer: DimseDestination, calling_ae_title: str, timeout: float,
                 move_to: MoveReceiver | None = None):
        self.peer = peer
        self.calling = peer.calling_ae_title or calling_ae_title
        self.timeout = timeout
        self.tls_args = peer_tls_args(peer)
        self.move_to = move_to
        self._assoc = None
        self._server = None
        self._sink: Callable[[Dataset], None] | None = None
        self._series: str | None = None

    def _on_store(self, event) -> int:
        """A C-STORE sub-operation of our retrieval: an instance of the series being retrieved
        goes to the current sink; anything else is refused."""
        ds = event.dataset
        if self._sink is None or str(ds.get("SeriesInstanceUID", "")) != self._series:
            log.info("C-STORE of an instance no retrieval waits for refused (from %s)",
                     event.assoc.requestor.ae_title)
            return _REFUSED
        ds.file_meta = event.file_meta
        self._sink(ds)
        return _SUCCESS

    def start_receiver(self) -> None:
        """Start the Storage SCP of ``move_to`` (once per search)."""
        if self._server is not None or self.move_to is None:
            return
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.move_to.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class in GET_STORAGE_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self._server = ae.start_server((self.move_to.host, self.move_to.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _association(self):
        """The open association: the FIND model, and the MOVE model (with ``move_to``) or the GET
        model with the storage classes in the SCP role."""
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        from pynetdicom import AE, build_role, evt

        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.add_requested_context(FIND_MODEL)
        roles = []
        if self.move_to is not None:
            ae.add_requested_context(MOVE_MODEL)
        else:
            ae.add_requested_context(GET_MODEL)
            for sop_class in GET_STORAGE_CLASSES:
                ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
            roles = [build_role(sop_class, scp_role=True) for sop_class in GET_STORAGE_CLASSES]
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title, tls_args=self.tls_args,
                             ext_neg=roles or None, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        if not assoc.is_established:
            how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise DimseError(f"association with {self.peer.ae_title}@{self.peer.host}:{self.peer.port} {how}")
        self._assoc = assoc
        return assoc

    def close(self) -> None:
        """Release the association and stop the C-MOVE receiver (if running)."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def find(self, level: str, keys: dict[str, str], returned: tuple[str, ...] = ()) -> list[Dataset]:
        """The identifiers of every match of a C-FIND at ``level`` (STUDY, SERIES): ``keys`` are
        matched, ``returned`` asked for (empty)."""
        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword in returned:
            setattr(query, keyword, "")
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        matches: list[Dataset] = []
        for status, identifier in self._association().send_c_find(query, FIND_MODEL):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in _PENDING and identifier is not None:
                matches.append(identifier)
            elif code != _SUCCESS:
                self.close()
                raise DimseError(f"C-FIND at {level} level failed with status 0x{code & 0xFFFF:04X}")
        return matches

    def get_series(self, study_uid: str, series_uid: str, sink: Callable[[Dataset], None]) -> int:
        """C-GET (or with ``move_to`` C-MOVE) of one series; each instance received is passed to
        ``sink`` (with its file meta). Returns the number received; raises :class:`DimseError`
        when a sub-operation failed."""
        received = 0

        def count(ds: Dataset) -> None:
            nonlocal received
            sink(ds)
            received += 1

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
        final, failed = -1, 0
        assoc = self._association()
        if self.move_to is not None:
            self.start_receiver()
            responses = assoc.send_c_move(query, self.move_to.ae_title, MOVE_MODEL)
        else:
            responses = assoc.send_c_get(query, GET_MODEL)
        self._sink, self._series = count, series_uid
        try:
            for status, _ in responses:
                final = int(getattr(status, "Status", -1)) if status else -1
                failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0) if status else failed
                if final not in _PENDING:
                    break
        finally:
            self._sink = self._series = None
        if final != _SUCCESS or failed:
            self.close()
            how = "C-MOVE" if self.move_to is not None else "C-GET"
            raise DimseError(f"{how} of series {series_uid}: status 0x{final & 0xFFFF:04X}, "
                             f"{failed} failed sub-operations, {received} instances received")
        return received



class DimsePriors:
    """:class:`~lungburden.followup.sources.PriorSource` over DIMSE at ``config.dimse``."""

    def __init__(self, config: FollowupConfig, selection: SelectionConfig, model: str | None,
                 weights: str | None, calling_ae_title: str):
        if config.dimse is None:
            raise ValueError("followup.dimse is not configured")
        self.config, self.selection, self.model, self.weights = config, selection, model, weights
        self.peer = config.dimse
        self.calling_ae_title = calling_ae_title
        self.scu = DimseQueryRetrieve(config.dimse, calling_ae_title, config.timeout_seconds, config.move_to)

    def close(self) -> None:
        self.scu.close()

    def find_studies(self, patient_id: str, start: date, end: date) -> list[Dataset]:
        """C-FIND at STUDY level: exact Patient ID, ModalitiesInStudy CT, the date range."""
        return self.scu.find("STUDY", {"PatientID": patient_id, "ModalitiesInStudy": "CT",
                                       "StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}"},
                             ("StudyInstanceUID", *STUDY_KEYS))

    def _series(self, study_uid: str, modality: str) -> list[Dataset]:
        return self.scu.find("SERIES", {"StudyInstanceUID": study_uid, "Modality": modality},
                             ("SeriesInstanceUID", "NumberOfSeriesRelatedInstances"))

    def sr_instances(self, study_uid: str) -> Iterator[Dataset]:
        """The study's SR series by C-FIND, each retrieved (C-GET or C-MOVE)."""
        for series in self._series(study_uid, "SR"):
            received: list[Dataset] = []
            self.scu.get_series(study_uid, text_of(series, "SeriesInstanceUID"), received.append)
            yield from received

    def analyse(self, study_uid: str) -> AnalysedPrior | None:
        """Retrieval of the study's CT series (those with at least ``min_slices`` instances), the
        node's choice among them, the one pipeline, C-STORE of the results (``store_results``)."""
        rules = self.selection.to_rules()
        with tempfile.TemporaryDirectory(prefix="lungburden-prior-") as tmp:
            root = Path(tmp)
            for n, series in enumerate(self._series(study_uid, "CT")):
                count = int(series.get("NumberOfSeriesRelatedInstances", 0) or 0)
                if count and count < rules.min_slices:
                    continue
                folder = root / "series" / f"{n:03d}"
                folder.mkdir(parents=True)

                def save(ds: Dataset, folder: Path = folder, number: Iterator[int] = itertools.count()) -> None:
                    ds.save_as(folder / f"{next(number):05d}.dcm", enforce_file_format=True)

                self.scu.get_series(study_uid, text_of(series, "SeriesInstanceUID"), save)
            self.scu.close()  # not held open through the analysis (a PACS ends idle associations)
            candidates = discover_series(root / "series") if (root / "series").is_dir() else []
            chosen = [c for c, reason in choose_series(candidates, rules, self.selection.prefer_one_reconstruction)
                      if reason is None]
            if not chosen:
                return None
            series = chosen[0]
            sop_uids = [str(h.SOPInstanceUID) for h in series.headers]
            try:
                job, outputs = analyse_files(list(series.files), sop_uids, study_uid, series.series_instance_uid,
                                             root / "result", self.model, self.weights, ("seg", "sr"),
                                             rules.min_slices)
            except SeriesRejected as exc:
                raise PriorUnavailable(f"series {series.series_instance_uid} not analysed: {exc}") from exc
            if self.config.store_results:
                try:
                    DimseExporter(self.peer, self.calling_ae_title, self.config.timeout_seconds).send(job)
                except ExportError as exc:
                    log.warning("prior series %s: results not stored (%s)", series.series_instance_uid, exc)
            return AnalysedPrior(series.series_instance_uid, outputs.result, outputs.result.get("sr_sop_instance_uid"))
