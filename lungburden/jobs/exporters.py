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
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
from lungburden.jobs.queue import Job, JobStore

log = logging.getLogger(__name__)

#: PS3.4 B.2.3 warning statuses: the instance was stored.
_STORE_WARNINGS = {0xB000, 0xB006, 0xB007}


class ExportError(RuntimeError):
    """A delivery attempt failed (the message says why; retried with backoff)."""


class Exporter(Protocol):
    """Delivers a job's results to one destination; raises (preferably :class:`ExportError`) to retry."""

    def send(self, job: Job) -> None: ...


def result_files(job: Job) -> list[Path]:
    if job.result_dir is None:
        raise ExportError(f"job {job.id} has no results")
    files = [job.result_dir / "seg.dcm", job.result_dir / "sr.dcm"]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ExportError(f"job {job.id}: result files missing: {', '.join(missing)}")
    return files


class DimseExporter:
    """C-STORE SCU to one DICOM peer."""

    def __init__(self, dest: DimseDestination, calling_ae_title: str, timeout: float):
        self.dest = dest
        self.calling = dest.calling_ae_title or calling_ae_title
        self.timeout = timeout

    def send(self, job: Job) -> None:
        from pynetdicom import AE

        datasets = [pydicom.dcmread(f) for f in result_files(job)]
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
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


class ExportRunner:
    """Takes due deliveries from the store and performs them (one thread; see :meth:`run`).

    ``exporters``: more destinations by name (e.g. the Orthanc plugin's), before the configured ones.
    """

    def __init__(self, config: Config, store: JobStore, owner: str | None = None,
                 exporters: Mapping[str, Exporter] | None = None):
        self.config = config
        self.store = store
        self.owner = owner
        self.stats = ExportStats()
        self.exporters: dict[str, Exporter] = {d.name: make_exporter(d, config) for d in config.destinations}
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

    def deliver_one(self, job_ids: list[int] | None = None) -> bool:
        """Perform one due delivery; ``False`` when none is due."""
        delivery = self.store.claim_delivery(
            self.owner, lease_seconds=max(300.0, 4 * self.config.export.timeout_seconds),
            job_ids=job_ids, destinations=list(self.exporters),
        )
        if delivery is None:
            return False
        job = self.store.job(delivery.job_id)
        assert job is not None
        exporter = self.exporters[delivery.destination]
        start = time.perf_counter()
        try:
            exporter.send(job)
        except Exception as exc:  # noqa: BLE001 - every failure is retried, then dead-lettered
            message = str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {exc}"
            attempts = delivery.attempts + 1
            delay = backoff_delay(self.config.export, attempts)
            state = self.store.delivery_failed(job.id, delivery.destination, message,
                                               self.config.export.max_attempts, delay)
            self.stats.failed_attempts += 1
            if state == "dead":
                self.stats.dead += 1
                log.error("job %d: delivery to %s failed %d times, dead-lettered: %s", job.id,
                          delivery.destination, attempts, message)
            else:
                log.warning("job %d: delivery to %s failed (attempt %d/%d, next in %.1f s): %s", job.id,
                            delivery.destination, attempts, self.config.export.max_attempts, delay, message)
            return True
        self.store.delivery_succeeded(job.id, delivery.destination)
        self.stats.delivered += 1
        log.info("job %d: SEG + SR of series %s delivered to %s in %.2f s", job.id, job.series_instance_uid,
                 delivery.destination, time.perf_counter() - start)
        return True

    def run(self, stop: threading.Event, poll_seconds: float = 0.5) -> None:
        while not stop.is_set():
            try:
                if self.deliver_one():
                    continue
            except Exception:  # noqa: BLE001 - keep the exporter alive (e.g. database busy)
                log.exception("exporter error")
            due = self.store.next_delivery_due()
            wait = poll_seconds if due is None else min(poll_seconds, max(0.05, due - time.time()))
            stop.wait(wait)
