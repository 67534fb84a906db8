"""Deliver a job's SEG + SR to the configured destinations, with retries and a dead-letter state.

- ``dimse``: C-STORE SCU (pynetdicom; PS3.4 Annex B). Warning statuses (0xB000, 0xB006, 0xB007)
  count as stored; any failure status, a rejected association or a network error is retried.
- ``dicomweb``: STOW-RS (dicomweb-client; PS3.18 10.5) to ``<url>/studies/<StudyInstanceUID>``;
  an HTTP error or a Failed SOP Sequence in the response is retried.
- ``folder``: ``<path>/<StudyInstanceUID>/<source SeriesInstanceUID>/v<version>/`` with
  ``seg.dcm``, ``sr.dcm`` and ``result.json`` (written to a temporary folder, then renamed).

Idempotency: the results of one source series version carry deterministic UIDs (derived from the
series UID, the hash of its SOP Instance UIDs and the model), so re-sending after a crash or a
retry stores the same instances again; PACS see a re-sent instance, never a duplicate.

Independent destinations: :meth:`ExportRunner.run` gives every destination its own thread, so a
destination that hangs until its timeout delays only its own deliveries (each keeps its own
back-off per delivery).

Retraction: when a later version of a source series is delivered to a configured destination that
holds the results of an earlier version, an IHE IOCM rejection note (:mod:`lungburden.results.kos`)
referencing those results is sent with the new SEG + SR (file ``kos.dcm``).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from lungburden.config.schema import (
    Config,
    Destination,
    DicomwebDestination,
    DimseDestination,
    ExportConfig,
    FolderDestination,
)
from lungburden.jobs.logs import audit
from lungburden.jobs.queue import Job, JobStore

log = logging.getLogger(__name__)

#: PS3.4 B.2.3 warning statuses: the instance was stored.
_STORE_WARNINGS = {0xB000, 0xB006, 0xB007}


class ExportError(RuntimeError):
    """A delivery attempt failed (the message says why; retried with backoff)."""


class Exporter(Protocol):
    """Delivers a job's results to one destination; raises (preferably :class:`ExportError`) to retry."""

    def send(self, job: Job) -> None: ...


#: The rejection note sent along with a delivery (see :meth:`ExportRunner.with_rejection_note`).
REJECTION_NOTE = "kos.dcm"


def result_files(job: Job) -> list[Path]:
    """The DICOM results of a job in delivery order, then ``kos.dcm`` where a rejection note goes with them.

    The outputs that ``result.json`` lists (``outputs``; SEG and SR when it lists none): ``seg.dcm``,
    ``sr.dcm``, the Secondary Captures ``sc/*.dcm`` and the Encapsulated PDF ``report.dcm``.
    """
    if job.result_dir is None:
        raise ExportError(f"job {job.id} has no results")
    try:
        outputs = json.loads((job.result_dir / "result.json").read_text()).get("outputs") or ["seg", "sr"]
    except (OSError, ValueError):
        outputs = ["seg", "sr"]
    files = [job.result_dir / name for key, name in (("seg", "seg.dcm"), ("sr", "sr.dcm")) if key in outputs]
    if "sc" in outputs:
        files.extend(sorted((job.result_dir / "sc").glob("*.dcm")) or [job.result_dir / "sc" / "sc_01.dcm"])
    if "pdf" in outputs:
        files.append(job.result_dir / "report.dcm")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ExportError(f"job {job.id}: result files missing: {', '.join(missing)}")
    if (job.result_dir / REJECTION_NOTE).exists():
        files.append(job.result_dir / REJECTION_NOTE)
    return files


def peer_tls_args(dest: DimseDestination) -> tuple | None:
    """pynetdicom's ``tls_args`` (SSL context, server name) towards a DICOM peer, or None for
    plain TCP: DICOM TLS (PS3.15 B.1, BCP 195: TLS 1.2+, the peer's certificate and name
    verified, our client certificate when configured)."""
    import ssl

    tls = dest.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(tls.ca_certificates) if tls.ca_certificates else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.verify_server_name
    if tls.certificate is not None and tls.private_key is not None:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx, tls.server_name or dest.host


class DimseExporter:
    """C-STORE SCU to one DICOM peer; with ``tls``, DICOM TLS (PS3.15 B.1, BCP 195: TLS 1.2+, the
    peer's certificate and name verified, our client certificate when configured)."""

    def __init__(self, dest: DimseDestination, calling_ae_title: str, timeout: float):
        self.dest = dest
        self.calling = dest.calling_ae_title or calling_ae_title
        self.timeout = timeout
        self.tls_args = peer_tls_args(dest)

    def send(self, job: Job) -> None:
        from pynetdicom import AE

        datasets = [pydicom.dcmread(f) for f in result_files(job)]
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=self.tls_args)
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise ExportError(f"association with {self.dest.ae_title}@{self.dest.host}:{self.dest.port} {reason}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code == -1:
                    raise ExportError(f"no C-STORE response for {ds.SOPInstanceUID} (connection lost or timeout)")
                if code != 0x0000 and code not in _STORE_WARNINGS:
                    comment = str(status.get("ErrorComment", "")) if status else ""
                    raise ExportError(f"C-STORE of {ds.SOPInstanceUID} failed with status 0x{code:04X} {comment}")
        finally:
            if assoc.is_established:
                assoc.release()


def dicomweb_client(url: str, username: str | None = None, password: str | None = None,
                    headers: dict[str, str] | None = None, timeout: float = 60.0):
    """A :class:`dicomweb_client.api.DICOMwebClient` with optional basic auth and extra headers."""
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if username is not None:
        session.auth = (username, password or "")
    return DICOMwebClient(url=url.rstrip("/"), session=session, headers=dict(headers or {}), timeout=timeout)


class DicomwebExporter:
    """STOW-RS to one DICOMweb origin server."""

    def __init__(self, dest: DicomwebDestination, timeout: float):
        self.dest = dest
        self.timeout = timeout

    def send(self, job: Job) -> None:
        datasets = [pydicom.dcmread(f) for f in result_files(job)]
        client = dicomweb_client(self.dest.url, self.dest.username, self.dest.password, self.dest.headers,
                                 self.timeout)
        try:
            response: Dataset | None = client.store_instances(datasets, study_instance_uid=job.study_instance_uid)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise ExportError(f"STOW-RS to {self.dest.url} failed: HTTP {code}") from exc
        except requests.RequestException as exc:
            raise ExportError(f"STOW-RS to {self.dest.url} failed: {type(exc).__name__}: {exc}"[:500]) from exc
        failed = list(response.get("FailedSOPSequence", [])) if response is not None else []
        if failed:
            reasons = ", ".join(
                f"{item.get('ReferencedSOPInstanceUID', '?')}: 0x{int(item.get('FailureReason', 0)):04X}"
                for item in failed
            )
            raise ExportError(f"STOW-RS to {self.dest.url}: instances failed ({reasons})")


class FolderExporter:
    """Copies the results into a local folder (used by ``make demo``)."""

    def __init__(self, dest: FolderDestination):
        self.dest = dest

    def target(self, job: Job) -> Path:
        return Path(self.dest.path) / job.study_instance_uid / job.series_instance_uid / f"v{job.version}"

    def send(self, job: Job) -> None:
        files = result_files(job)
        assert job.result_dir is not None
        result_json = job.result_dir / "result.json"
        if result_json.exists():
            files.append(result_json)
        target = self.target(job)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in files:
                shutil.copy2(f, tmp / f.name)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except OSError as exc:
            raise ExportError(f"cannot write to folder {self.dest.path}: {exc.strerror or exc}") from exc


def make_exporter(dest: Destination, config: Config) -> DimseExporter | DicomwebExporter | FolderExporter:
    if isinstance(dest, DimseDestination):
        return DimseExporter(dest, config.node.ae_title, config.export.timeout_seconds)
    if isinstance(dest, DicomwebDestination):
        return DicomwebExporter(dest, config.export.timeout_seconds)
    return FolderExporter(dest)


def backoff_delay(export: ExportConfig, attempts: int) -> float:
    """Delay before the next attempt after ``attempts`` failures (exponential, capped)."""
    delay = export.backoff_initial_seconds * export.backoff_factor ** max(0, attempts - 1)
    return min(export.backoff_max_seconds, delay)


@dataclass
class ExportStats:
    delivered: int = 0
    failed_attempts: int = 0
    dead: int = 0


@dataclass
class DestinationState:
    """What one destination's exporter saw last (``/health``)."""

    last_success_at: float | None = None
    last_error_at: float | None = None
    last_error: str | None = None
    delivered: int = 0
    failed_attempts: int = 0
    busy_since: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def to_json(self) -> dict:
        with self.lock:
            return {"last_success_at": self.last_success_at, "last_error_at": self.last_error_at,
                    "last_error": self.last_error, "delivered": self.delivered,
                    "failed_attempts": self.failed_attempts, "busy_since": self.busy_since}


def describe_destination(dest: Destination | None) -> dict:
    """Where a destination is, for the audit trail (no credentials)."""
    if isinstance(dest, DimseDestination):
        return {"destination_type": "dimse", "called_ae_title": dest.ae_title, "host": dest.host, "port": dest.port}
    if isinstance(dest, DicomwebDestination):
        return {"destination_type": "dicomweb", "url": dest.url}
    if isinstance(dest, FolderDestination):
        return {"destination_type": "folder", "path": str(dest.path)}
    return {}


class ExportRunner:
    """Takes due deliveries from the store and performs them (one thread per destination; see :meth:`run`).

    ``exporters``: more destinations by name (e.g. the Orthanc plugin's), before the configured ones.
    """

    def __init__(self, config: Config, store: JobStore, owner: str | None = None,
                 exporters: Mapping[str, Exporter] | None = None):
        self.config = config
        self.store = store
        self.owner = owner
        self.stats = ExportStats()
        self._stats_lock = threading.Lock()
        self.exporters: dict[str, Exporter] = {d.name: make_exporter(d, config) for d in config.destinations}
        self.states: dict[str, DestinationState] = {name: DestinationState() for name in self.exporters}
        self.add(exporters or {})

    def add(self, exporters: Mapping[str, Exporter]) -> None:
        """More destinations by name, placed before the configured ones."""
        clash = sorted(set(exporters) & set(self.exporters))
        if clash:
            raise ValueError(f"destination names used twice: {', '.join(clash)}")
        configured = {d.name for d in self.config.destinations}
        self.exporters = {
            **{k: v for k, v in self.exporters.items() if k not in configured}, **exporters,
            **{k: v for k, v in self.exporters.items() if k in configured},
        }
        for name in exporters:
            self.states.setdefault(name, DestinationState())

    def destination_states(self) -> dict[str, dict]:
        """Per destination: last success, last error, counts and pending deliveries (for ``/health``)."""
        counts = self.store.destination_counts()
        out = {}
        for name in self.exporters:
            state = self.states.setdefault(name, DestinationState()).to_json()
            per = counts.get(name, {})
            state.update(pending=per.get("pending", 0) + per.get("sending", 0), dead=per.get("dead", 0))
            out[name] = state
        return out

    def with_rejection_note(self, job: Job, destination: str) -> tuple[Job, list[int], str | None]:
        """``job`` as delivered to ``destination``: with a rejection note (IHE IOCM) for the results of
        earlier versions that ``destination`` holds, in a per-destination copy of the result folder.

        Returns ``(job to send, rejected job ids, note SOP Instance UID)``. Only the configured
        destination types get notes (front-door exporters handle replacement themselves).
        """
        exporter = self.exporters[destination]
        if job.result_dir is None or not isinstance(exporter, (DimseExporter, DicomwebExporter, FolderExporter)):
            return job, [], None
        earlier = [j for j in self.store.unrejected_earlier_versions(job, destination) if j.result]
        if not earlier:
            return job, [], None
        from lungburden.results.kos import build_rejection_note, rejected_results

        source = pydicom.dcmread(result_files(job)[0], stop_before_pixels=True)  # patient and study
        rejected = [r for j in earlier for r in rejected_results(j.result or {})]
        versions = ", ".join(str(j.version) for j in earlier)
        note = build_rejection_note(
            source, rejected,
            f"Results of version {versions} of source series {job.series_instance_uid} are withdrawn: "
            f"superseded by version {job.version} ({job.instance_count} instances).",
        )
        staged = job.result_dir / f"delivery-{destination}"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(job.result_dir, staged, ignore=shutil.ignore_patterns("delivery-*"))
        note.save_as(staged / REJECTION_NOTE, enforce_file_format=True)
        return replace(job, result_dir=staged), [j.id for j in earlier], str(note.SOPInstanceUID)

    def deliver_one(self, job_ids: list[int] | None = None, destinations: list[str] | None = None) -> bool:
        """Perform one due delivery (optionally of ``job_ids`` / to ``destinations``); ``False`` when none is due."""
        delivery = self.store.claim_delivery(
            self.owner, lease_seconds=max(300.0, 4 * self.config.export.timeout_seconds),
            job_ids=job_ids, destinations=list(destinations if destinations is not None else self.exporters),
        )
        if delivery is None:
            return False
        job = self.store.job(delivery.job_id)
        assert job is not None
        exporter = self.exporters[delivery.destination]
        state = self.states.setdefault(delivery.destination, DestinationState())
        try:
            dest_info = describe_destination(self.config.destination(delivery.destination))
        except KeyError:
            dest_info = {}
        uids = {"study_instance_uid": job.study_instance_uid, "series_instance_uid": job.series_instance_uid,
                "job_id": job.id, "version": job.version, "destination": delivery.destination, **dest_info}
        start = time.perf_counter()
        with state.lock:
            state.busy_since = time.time()
        rejected: list[int] = []
        note_uid = None
        try:
            send_job, rejected, note_uid = self.with_rejection_note(job, delivery.destination)
            exporter.send(send_job)
        except Exception as exc:  # noqa: BLE001 - every failure is retried, then dead-lettered
            message = str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {exc}"
            attempts = delivery.attempts + 1
            delay = backoff_delay(self.config.export, attempts)
            new_state = self.store.delivery_failed(job.id, delivery.destination, message,
                                                   self.config.export.max_attempts, delay)
            with self._stats_lock:
                self.stats.failed_attempts += 1
                self.stats.dead += new_state == "dead"
            with state.lock:
                state.last_error_at, state.last_error, state.busy_since = time.time(), message[:500], None
                state.failed_attempts += 1
            audit("delivery_dead" if new_state == "dead" else "delivery_failed", **uids, attempt=attempts,
                  outcome=message[:500])
            if new_state == "dead":
                log.error("job %d: delivery to %s failed %d times, dead-lettered: %s", job.id,
                          delivery.destination, attempts, message)
            else:
                log.warning("job %d: delivery to %s failed (attempt %d/%d, next in %.1f s): %s", job.id,
                            delivery.destination, attempts, self.config.export.max_attempts, delay, message)
            return True
        self.store.delivery_succeeded(job.id, delivery.destination)
        if rejected and note_uid:
            self.store.record_rejections(rejected, delivery.destination, job.id, note_uid)
            log.info("job %d: rejection note %s sent to %s for the results of jobs %s", job.id, note_uid,
                     delivery.destination, rejected)
        with self._stats_lock:
            self.stats.delivered += 1
        with state.lock:
            state.last_success_at, state.busy_since = time.time(), None
            state.delivered += 1
        result = job.result or {}
        audit("delivered", **uids, outcome="success", seg_sop_instance_uid=result.get("seg_sop_instance_uid"),
              sr_sop_instance_uid=result.get("sr_sop_instance_uid"), rejection_note_sop_instance_uid=note_uid,
              rejected_jobs=rejected or None)
        log.info("job %d: SEG + SR of series %s delivered to %s in %.2f s", job.id, job.series_instance_uid,
                 delivery.destination, time.perf_counter() - start)
        return True

    def _run_destination(self, name: str, stop: threading.Event, poll_seconds: float) -> None:
        while not stop.is_set():
            try:
                if self.deliver_one(destinations=[name]):
                    continue
            except Exception:  # noqa: BLE001 - keep the exporter alive (e.g. database busy)
                log.exception("exporter error (destination %s)", name)
            due = self.store.next_delivery_due()
            wait = poll_seconds if due is None else min(poll_seconds, max(0.05, due - time.time()))
            stop.wait(wait)

    def run(self, stop: threading.Event, poll_seconds: float = 0.5) -> None:
        """Deliver until ``stop``: one thread per destination, so one hung destination delays no other."""
        threads = [threading.Thread(target=self._run_destination, args=(name, stop, poll_seconds),
                                    name=f"exporter-{name}", daemon=True) for name in self.exporters]
        for thread in threads:
            thread.start()
        stop.wait()
        for thread in threads:
            thread.join(1.0)
