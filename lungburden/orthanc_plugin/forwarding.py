"""Deliveries of the Orthanc plugin: store the results into Orthanc, forward them to Orthanc's peers.

The results are the files of :func:`~lungburden.jobs.exporters.result_files`: SEG, SR and, where
produced, the Secondary Capture images and the Encapsulated PDF report.

Each class has the ``send(job)`` method of the node's exporters
(:class:`~lungburden.jobs.exporters.Exporter`), so the node's
:class:`~lungburden.jobs.exporters.ExportRunner` retries them with back-off and
dead-letters them like any destination; :func:`orthanc_exporters` names them:

- ``orthanc:store`` (:class:`OrthancStoreExporter`): ``POST /instances`` of ``seg.dcm`` and
  ``sr.dcm`` (they carry the source study's UIDs, so Orthanc files them in the source study).
  With ``ReplacePrevious`` the SEG/SR stored earlier for the same source series (an older version
  of it, or the same version before a re-run) are deleted from Orthanc once the new ones are stored.
  With ``Engine: celery`` the workers have stored them by STOW-RS already:
  :class:`StoredByWorkers` finds them by their UIDs instead and does the same bookkeeping.
- ``orthanc:modality:<name>`` (:class:`OrthancForwarder`): ``POST /modalities/<name>/store``
  (C-STORE by Orthanc to a peer of its ``DicomModalities``).
- ``orthanc:dicomweb:<name>`` (:class:`OrthancForwarder`): ``POST /dicom-web/servers/<name>/stow``
  (STOW-RS by Orthanc's DICOMweb plugin to a server of its ``DicomWeb.Servers``).

:class:`OrthancLinks` keeps, per job, the Orthanc identifiers of the source series and of the
stored results, the ``STABLE_SERIES`` time and the time the results were stored (a table of its
own, ``orthanc_jobs``, in the node's job database).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import pydicom

from lungburden.jobs.exporters import Exporter, ExportError, result_files
from lungburden.jobs.queue import Job, JobStore
from lungburden.orthanc_plugin.orthanc_client import OrthancClient, OrthancError, OrthancUnavailable

log = logging.getLogger("lungburden.orthanc")

STORE_DESTINATION = "orthanc:store"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orthanc_jobs (
    job_id              INTEGER PRIMARY KEY REFERENCES jobs(id),
    orthanc_series_id   TEXT NOT NULL,
    orthanc_study_id    TEXT,
    event_at            REAL,                   -- STABLE_SERIES (or re-run request) time
    stored_at           REAL,                   -- SEG + SR stored in Orthanc
    seg_orthanc_id      TEXT,
    sr_orthanc_id       TEXT,
    seg_series_uid      TEXT,
    sr_series_uid       TEXT
);
CREATE TABLE IF NOT EXISTS orthanc_job_extras (     -- SC images, PDF report: one row per instance
    job_id              INTEGER NOT NULL REFERENCES jobs(id),
    orthanc_id          TEXT,
    series_uid          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS orthanc_job_extras_job ON orthanc_job_extras(job_id);
CREATE INDEX IF NOT EXISTS orthanc_job_extras_series ON orthanc_job_extras(series_uid);
CREATE INDEX IF NOT EXISTS orthanc_jobs_seg ON orthanc_jobs(seg_series_uid);
CREATE INDEX IF NOT EXISTS orthanc_jobs_sr ON orthanc_jobs(sr_series_uid);
"""


class OrthancLinks:
    """The ``orthanc_jobs`` table: Orthanc identifiers and timings of each job."""

    def __init__(self, store: JobStore):
        self.store = store
        with store.transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    def link(self, job_id: int, series_id: str, study_id: str, event_at: float, reset: bool = False) -> None:
        """Attach a job to its Orthanc series; the event time is kept from the first event unless ``reset``."""
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO orthanc_jobs (job_id, orthanc_series_id, orthanc_study_id, event_at) VALUES (?,?,?,?) "
                "ON CONFLICT(job_id) DO UPDATE SET orthanc_series_id=excluded.orthanc_series_id, "
                "orthanc_study_id=excluded.orthanc_study_id"
                + (", event_at=excluded.event_at, stored_at=NULL" if reset else ""),
                (job_id, series_id, study_id, event_at),
            )

    def get(self, job_id: int) -> dict | None:
        rows = self.store.query("SELECT * FROM orthanc_jobs WHERE job_id=?", (job_id,))
        return dict(rows[0]) if rows else None

    def is_output_series(self, series_uid: str) -> bool:
        extra = self.store.query("SELECT 1 FROM orthanc_job_extras WHERE series_uid=? LIMIT 1", (series_uid,))
        if extra:
            return True
        rows = self.store.query("SELECT 1 FROM orthanc_jobs WHERE seg_series_uid=? OR sr_series_uid=? LIMIT 1",
                                (series_uid, series_uid))
        return bool(rows)

    def set_output_uids(self, job_id: int, seg_series_uid: str, sr_series_uid: str) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT INTO orthanc_jobs (job_id, orthanc_series_id) VALUES (?, '') "
                       "ON CONFLICT(job_id) DO NOTHING", (job_id,))
            db.execute("UPDATE orthanc_jobs SET seg_series_uid=?, sr_series_uid=? WHERE job_id=?",
                       (seg_series_uid, sr_series_uid, job_id))

    def set_stored(self, job_id: int, seg_id: str, sr_id: str) -> float | None:
        """Record the stored results; returns the seconds since the event (``None`` if unknown)."""
        now = time.time()
        with self.store.transaction() as db:
            db.execute(
                "UPDATE orthanc_jobs SET seg_orthanc_id=?, sr_orthanc_id=?, stored_at=COALESCE(stored_at, ?) "
                "WHERE job_id=?",
                (seg_id, sr_id, now, job_id),
            )
            row = db.execute("SELECT event_at, stored_at FROM orthanc_jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None or row["event_at"] is None:
            return None
        return float(row["stored_at"]) - float(row["event_at"])

    def previous_outputs(self, job: Job) -> list[tuple[int, str | None, str | None]]:
        """Results stored in Orthanc for other jobs of the same source series: ``(job_id, seg_id, sr_id)``."""
        rows = self.store.query(
            "SELECT o.job_id, o.seg_orthanc_id, o.sr_orthanc_id FROM orthanc_jobs o JOIN jobs j ON j.id=o.job_id "
            "WHERE j.series_instance_uid=? AND o.job_id<>? AND (o.seg_orthanc_id IS NOT NULL OR "
            "o.sr_orthanc_id IS NOT NULL)",
            (job.series_instance_uid, job.id),
        )
        return [(r["job_id"], r["seg_orthanc_id"], r["sr_orthanc_id"]) for r in rows]

    def forget_outputs(self, job_id: int) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE orthanc_jobs SET seg_orthanc_id=NULL, sr_orthanc_id=NULL WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM orthanc_job_extras WHERE job_id=?", (job_id,))

    def set_extras(self, job_id: int, extras: list[tuple[str | None, str]]) -> None:
        """Record the other results of a job (SC, PDF, ...): ``(orthanc_id or None, series_uid)``."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM orthanc_job_extras WHERE job_id=?", (job_id,))
            db.executemany("INSERT INTO orthanc_job_extras (job_id, orthanc_id, series_uid) VALUES (?,?,?)",
                           [(job_id, oid, uid) for oid, uid in extras])

    def extra_ids(self, job_id: int) -> list[str]:
        rows = self.store.query("SELECT orthanc_id FROM orthanc_job_extras WHERE job_id=? AND orthanc_id IS NOT NULL",
                                (job_id,))
        return [str(r["orthanc_id"]) for r in rows]


def _call(what: str, fn, *args):  # noqa: ANN001, ANN202 - tiny adapter
    try:
        return fn(*args)
    except (OrthancError, OrthancUnavailable) as exc:
        raise ExportError(f"{what}: {exc}") from exc


_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


class OrthancStoreExporter:
    """``POST /instances`` of every result file (the source study), replacing earlier results."""

    def __init__(self, client: OrthancClient, links: OrthancLinks, replace_previous: bool = True):
        self.client = client
        self.links = links
        self.replace_previous = replace_previous

    def _record_output_series(self, job: Job, seg_series: str, sr_series: str, other_series: list[str]) -> None:
        """Record the result series UIDs before they reach Orthanc, so that Orthanc's events for them
        are recognised as results, not input (the Orthanc IDs of earlier extras are kept)."""
        self.links.set_output_uids(job.id, seg_series, sr_series)
        previous = self.links.extra_ids(job.id)
        self.links.set_extras(job.id, [(oid, "") for oid in previous] + [(None, uid) for uid in other_series])

    def _store(self, job: Job) -> tuple[list[str], str | None, str | None, list[tuple[str | None, str]]]:
        """Store every result file; ``(all Orthanc IDs, SEG ID, SR ID, [(ID, series UID)] of the others)``."""
        paths = result_files(job)
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        classes = [str(h.SOPClassUID) for h in headers]
        seg = next((i for i, c in enumerate(classes) if c == _SEG_CLASS), None)
        sr = next((i for i, c in enumerate(classes) if c.startswith(_SR_CLASS_PREFIX)), None)
        others = [i for i in range(len(paths)) if i not in (seg, sr)]
        self._record_output_series(job, str(headers[seg].SeriesInstanceUID) if seg is not None else "",
                                   str(headers[sr].SeriesInstanceUID) if sr is not None else "",
                                   [str(headers[i].SeriesInstanceUID) for i in others])
        ids = [_call("storing into Orthanc", self.client.store_instance, p.read_bytes()) for p in paths]
        extras = [(ids[i], str(headers[i].SeriesInstanceUID)) for i in others]
        return ids, ids[seg] if seg is not None else None, ids[sr] if sr is not None else None, extras

    def store(self, job: Job) -> list[str]:
        """Store every result (idempotent: Orthanc answers AlreadyStored) and return their Orthanc IDs."""
        ids, _, _, extras = self._store(job)
        self.links.set_extras(job.id, extras)
        return ids

    def send(self, job: Job) -> None:
        previous = self.links.get(job.id) or {}
        previous_extras = self.links.extra_ids(job.id)
        ids, seg_id, sr_id, extras = self._store(job)
        if self.replace_previous:  # after storing: a failed attempt never leaves the study without results
            for oid in (previous.get("seg_orthanc_id"), previous.get("sr_orthanc_id"), *previous_extras):
                if oid and oid not in ids:  # a re-run produced new UIDs
                    _call("deleting earlier results", self.client.delete, f"/instances/{oid}")
            for old_job, *old_ids in self.links.previous_outputs(job):
                for oid in filter(None, [*old_ids, *self.links.extra_ids(old_job)]):
                    if oid not in ids:
                        _call("deleting earlier results", self.client.delete, f"/instances/{oid}")
                self.links.forget_outputs(old_job)
                log.info("job %d: results of job %d (same source series) removed from Orthanc", job.id, old_job)
        self.links.set_extras(job.id, extras)
        latency = self.links.set_stored(job.id, seg_id, sr_id)
        log.info("job %d: SEG + SR of series %s stored in Orthanc%s", job.id, job.series_instance_uid,
                 f" {latency:.1f} s after STABLE_SERIES" if latency is not None else "")


class StoredByWorkers(OrthancStoreExporter):
    """``orthanc:store`` of ``Engine: celery``: the Celery worker stored the results by STOW-RS;
    their Orthanc IDs are found from the UIDs of the job's result (``POST /tools/lookup``) and
    recorded, so that ``ReplacePrevious`` and the forwards work as with the local engine."""

    def _store(self, job: Job) -> tuple[list[str], str | None, str | None, list[tuple[str | None, str]]]:
        result = job.result or {}
        others = [(uid, str(result.get("sc_series_instance_uid") or ""))
                  for uid in result.get("sc_sop_instance_uids") or []]
        if result.get("pdf_sop_instance_uid"):
            others.append((str(result["pdf_sop_instance_uid"]), str(result.get("pdf_series_instance_uid") or "")))
        self._record_output_series(job, str(result.get("seg_series_instance_uid") or ""),
                                   str(result.get("sr_series_instance_uid") or ""), [series for _, series in others])

        def find(uid: str | None) -> str | None:
            if not uid:
                return None
            oid = _call("looking up the results in Orthanc", self.client.lookup_instance, uid)
            if oid is None:
                raise ExportError(f"result instance {uid} of job {job.id} is not in Orthanc")
            return oid

        seg_id, sr_id = find(result.get("seg_sop_instance_uid")), find(result.get("sr_sop_instance_uid"))
        extras = [(find(uid), series) for uid, series in others]
        return [i for i in (seg_id, sr_id, *(oid for oid, _ in extras)) if i], seg_id, sr_id, extras


class OrthancForwarder:
    """Orthanc sends the stored SEG and SR to one of its peers: ``POST <route>`` with their Orthanc IDs."""

    def __init__(self, client: OrthancClient, links: OrthancLinks, what: str, route: str,
                 stored_by_workers: bool = False):
        self.client = client
        self.what = what
        self.route = route
        self.storer = (StoredByWorkers if stored_by_workers else OrthancStoreExporter)(client, links,
                                                                                       replace_previous=False)

    def send(self, job: Job) -> None:
        ids = self.storer.store(job)
        _call(f"forwarding to {self.what}", self.client.post_json, self.route,
              {"Resources": ids, "Synchronous": True})


def orthanc_exporters(client: OrthancClient, links: OrthancLinks, replace_previous: bool = True,
                      modalities: Iterable[str] = (), dicomweb_servers: Iterable[str] = (),
                      stored_by_workers: bool = False) -> dict[str, Exporter]:
    """The plugin's deliveries by destination name: ``orthanc:store`` first, then the forwards
    (``stored_by_workers``: Celery workers stored the results, :class:`StoredByWorkers`)."""
    store = StoredByWorkers if stored_by_workers else OrthancStoreExporter
    exporters: dict[str, Exporter] = {STORE_DESTINATION: store(client, links, replace_previous)}
    for name in modalities:  # C-STORE by Orthanc to one of its DicomModalities
        exporters[f"orthanc:modality:{name}"] = OrthancForwarder(client, links, f"modality {name}",
                                                                 f"/modalities/{name}/store", stored_by_workers)
    for name in dicomweb_servers:  # STOW-RS by Orthanc's DICOMweb plugin to one of its DicomWeb.Servers
        exporters[f"orthanc:dicomweb:{name}"] = OrthancForwarder(client, links, f"DICOMweb server {name}",
                                                                 f"/dicom-web/servers/{name}/stow", stored_by_workers)
    return exporters
