"""The worker process of the Orthanc plugin: ``python -m lungburden.orthanc_plugin.worker --work-dir DIR``.

Started and supervised by ``plugin.py`` inside Orthanc, run by the virtual environment's
interpreter (``LungBurden.Python``), so numpy/torch never load into Orthanc. It reuses the
node's parts on a private job database in ``<WorkDir>``:

- events: the plugin writes one JSON file per ``STABLE_SERIES`` (or re-run request) into
  ``<WorkDir>/inbox``; :meth:`OrthancWorker.handle_event` reads the series through Orthanc's REST
  API (``/series/{id}``, ``/series/{id}/instances``, ``/instances/{id}/file``) into the node's
  spool (:class:`~lungburden.jobs.spool.Spool`) and hands it to the node's
  :class:`~lungburden.jobs.assembly.SeriesAssembler` (selection rules, preferred
  reconstruction, late-instance policy, ``skipped`` jobs with the reason);
- jobs: the node's :class:`~lungburden.jobs.queue.JobStore` and
  :class:`~lungburden.jobs.runner.JobRunner` (shared pipeline, heartbeat, poison-input rule);
- deliveries: the node's :class:`~lungburden.jobs.exporters.ExportRunner` (retries,
  dead letter) with three more kinds of destination (:mod:`.forwarding`): ``orthanc:store``
  (``POST /instances`` into the source study, always), ``orthanc:modality:<name>`` and
  ``orthanc:dicomweb:<name>`` (Orthanc forwards to its configured peers), plus the YAML
  ``destinations``.

Idempotency: a job is keyed on the series' SOP Instance UID set (and model), so a re-sent or
re-stabilised unchanged series creates no job and no SEG/SR; a re-run request re-processes the
same job and (``ReplacePrevious``) replaces the SEG/SR it stored before.

Logs name series by UID only (no patient data). A failure is recorded in the job (state and
reason) and logged; the process itself exits only on a configuration error (status 78) or when
Orthanc is gone.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pydicom
from pydicom.tag import Tag

from lungburden.config.loader import ConfigError
from lungburden.config.schema import Config
from lungburden.jobs.assembly import SeriesAssembler, job_model
from lungburden.jobs.exporters import ExportRunner
from lungburden.jobs.logs import configure_logging as _configure_logging
from lungburden.jobs.queue import JobStore, instance_set_hash
from lungburden.jobs.runner import JobRunner, set_parent_death_signal
from lungburden.jobs.spool import Spool, purge_finished
from lungburden.orthanc_plugin.forwarding import OrthancLinks, orthanc_exporters
from lungburden.orthanc_plugin.orthanc_client import OrthancClient, OrthancError, OrthancUnavailable
from lungburden.orthanc_plugin.settings import PluginSettings, load_settings

log = logging.getLogger("lungburden.orthanc")

EXIT_CONFIG = 78
INBOX = "inbox"


@dataclasses.dataclass(frozen=True)
class SeriesEvent:
    """A series to look at: ``reason`` is ``stable`` (STABLE_SERIES) or ``rerun`` (REST request)."""

    orthanc_series_id: str
    event_at: float
    reason: str = "stable"

    @classmethod
    def from_json(cls, data: dict) -> SeriesEvent:
        return cls(str(data["orthanc_series_id"]), float(data.get("event_at") or time.time()),
                   str(data.get("reason") or "stable"))


class OrthancWorker:
    """Inbox → spool → jobs → pipeline → SEG + SR into Orthanc (and forwards)."""

    def __init__(self, settings: PluginSettings, client: OrthancClient | None = None):
        self.settings = settings
        self.config: Config = settings.config
        self.work_dir = settings.work_dir
        self.inbox = self.work_dir / INBOX
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.client = client or OrthancClient(settings.orthanc_url, settings.authorization)
        self.store = JobStore.for_storage(self.work_dir, self.config.node.db_journal_mode)
        self.links = OrthancLinks(self.store)
        self.spool = Spool(self.work_dir)
        self.rules = self.config.selection.to_rules()
        self.model = job_model(self.config)
        self.assembler = SeriesAssembler(self.config, self.store)
        forwarders = orthanc_exporters(self.client, self.links, settings.replace_previous,
                                       settings.forward_modalities, settings.forward_dicomweb_servers)
        self.exporter = ExportRunner(self.config, self.store, exporters=forwarders)
        # every analysed job gets one delivery per destination: the Orthanc ones, then the YAML ones
        self.runner = JobRunner(self.config, self.store, destinations=list(self.exporter.exporters))
        self.stop = threading.Event()

    # -- events ----------------------------------------------------------------------------------
    def ingest_inbox(self) -> int:
        """Handle the queued event files (oldest first); returns how many were consumed."""
        done = 0
        for path in sorted(self.inbox.glob("*.json")):
            if self.stop.is_set():
                break
            try:
                event = SeriesEvent.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError) as exc:
                log.error("unreadable event file %s dropped: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            try:
                self.handle_event(event)
            except OrthancUnavailable as exc:
                log.info("%s; will retry", exc)
                break  # keep the file: retried on the next pass
            except Exception as exc:  # noqa: BLE001 - one bad series must not stop the others
                log.error("Orthanc series %s could not be queued: %s: %s", event.orthanc_series_id,
                          type(exc).__name__, exc)
            path.unlink(missing_ok=True)
            done += 1
        return done

    def handle_event(self, event: SeriesEvent) -> None:
        """Spool a stable series and create its job (or record why it is skipped); idempotent."""
        oid = event.orthanc_series_id
        try:
            series = self.client.get_json(f"/series/{oid}")
        except OrthancError as exc:
            if exc.status == 404:
                log.info("Orthanc series %s was deleted before it could be analysed", oid)
                return
            raise
        tags = series.get("MainDicomTags", {})
        series_uid = str(tags.get("SeriesInstanceUID", ""))
        if self.links.is_output_series(series_uid):
            log.debug("series %s holds our own results; ignored", series_uid)
            return
        study = self.client.get_json(f"/studies/{series['ParentStudy']}")
        study_uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
        instances = {
            str(i["MainDicomTags"]["SOPInstanceUID"]): str(i["ID"])
            for i in self.client.get_json(f"/series/{oid}/instances")
        }
        existing = self.store.find_job(series_uid, instance_set_hash(instances), self.model)
        if existing is not None and event.reason != "rerun":
            log.info("series %s unchanged (%d instances): job %d (%s) stands, nothing to do", series_uid,
                     len(instances), existing.id, existing.state)
            return
        modality = str(tags.get("Modality", ""))
        if existing is None and modality not in self.rules.modalities:
            reason = f"selection: modality {modality or '?'} is not one of {', '.join(self.rules.modalities)}"
            job, _ = self.store.add_job(study_uid, series_uid, [], list(instances), self.model,
                                        state="skipped", reason=reason)
            self.links.link(job.id, oid, str(series["ParentStudy"]), event.event_at)
            log.warning("series %s not analysed (job %d skipped): %s", series_uid, job.id, reason)
            return
        files = self._spool_series(study_uid, series_uid, instances)
        if existing is not None:  # re-run request for a version that has a job already
            if not self.store.rerun_job(existing.id, files):
                state = (self.store.job(existing.id) or existing).state
                log.info("re-run of series %s ignored: job %d is %s", series_uid, existing.id, state)
                return
            self.links.link(existing.id, oid, str(series["ParentStudy"]), event.event_at, reset=True)
            log.warning("series %s: job %d re-queued on request", series_uid, existing.id)
            return
        state = self.store.series(series_uid)
        assert state is not None
        for job in self.assembler.complete([state], force=True):
            if job.series_instance_uid == series_uid:
                self.links.link(job.id, oid, str(series["ParentStudy"]), event.event_at)
                if job.state == "skipped":
                    log.warning("series %s not analysed (job %d skipped): %s", series_uid, job.id, job.reason)

    def _spool_series(self, study_uid: str, series_uid: str, instances: dict[str, str]) -> list[Path]:
        """Copy the series into the spool (only missing files) and register exactly these instances."""
        known = {r.sop_instance_uid for r in self.store.instances(series_uid)}
        if known - set(instances):  # instances deleted from Orthanc since the last time
            self.store.forget_instances(series_uid)
            for sop in known - set(instances):
                self.spool.path_for(study_uid, series_uid, sop).unlink(missing_ok=True)
        files = []
        start = time.perf_counter()
        fetched = 0
        for sop, instance_id in sorted(instances.items()):
            path = self.spool.path_for(study_uid, series_uid, sop)
            if path.exists() and sop in known:
                files.append(path)
                continue
            data = self.client.get_bytes(f"/instances/{instance_id}/file")
            path = self.spool.write(data, study_uid, series_uid, sop)
            fetched += 1
            try:
                sop_class = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                                specific_tags=[Tag("SOPClassUID")]).SOPClassUID)
            except Exception:  # noqa: BLE001 - the pipeline reports unreadable files
                sop_class = ""
            self.store.record_instance(sop, series_uid, study_uid, sop_class, path, "orthanc")
            files.append(path)
        if fetched:
            log.info("series %s: %d instances read from Orthanc in %.1f s", series_uid, fetched,
                     time.perf_counter() - start)
        return files

    # -- loops -----------------------------------------------------------------------------------
    def _job_loop(self) -> None:
        try:  # load the pipeline and the model now rather than on the first series
            self.runner.preload(self.model)
        except Exception as exc:  # noqa: BLE001 - reported again (per job) when a series is processed
            log.error("model %s cannot be loaded: %s: %s", self.model, type(exc).__name__, exc)
        while not self.stop.is_set():
            try:
                started = time.time()
                if self.runner.run_next():
                    self._report_failures(started)
                    continue
            except Exception:  # noqa: BLE001 - e.g. database busy for too long
                log.exception("error while taking a job")
            self.stop.wait(0.2)

    def _report_failures(self, since: float) -> None:
        """One warning per failed job in the same form as for skipped series (UID and reason)."""
        for job in self.store.jobs(states=["failed"], limit=5):
            if (job.finished_at or 0) >= since:
                log.warning("series %s not analysed (job %d failed): %s", job.series_instance_uid, job.id, job.reason)

    def purge(self, cutoff: float) -> int:
        """Delete the spooled copies and result files of finished series older than ``cutoff``.

        Orthanc keeps the originals and the stored SEG + SR; a re-run reads the series again.
        """
        n = purge_finished(self.spool, self.store, cutoff)
        if n:
            log.info("retention: removed the spooled copies of %d finished series", n)
        return n

    def _orthanc_gone(self) -> bool:
        pid = self.settings.orthanc_pid
        return pid is not None and os.getppid() != pid

    def run(self) -> None:
        """Run until :attr:`stop` is set or Orthanc is gone."""
        self.spool.clean_temporaries()
        requeued = self.store.requeue_lost(check_pids=True)
        if requeued:
            log.warning("re-queued jobs interrupted by a worker restart: %s", requeued)
        threads = [
            threading.Thread(target=self._job_loop, name="jobs", daemon=True),
            threading.Thread(target=self.exporter.run, args=(self.stop,), name="export", daemon=True),
        ]
        for t in threads:
            t.start()
        log.info("worker ready (pid %d, Orthanc %s, model %s, deliveries: %s)", os.getpid(),
                 self.settings.orthanc_url, self.model, ", ".join(self.exporter.exporters))
        last_maintenance = 0.0
        last_retention = 0.0
        while not self.stop.is_set():
            if self._orthanc_gone():
                log.warning("Orthanc is gone; the worker exits")
                break
            try:
                self.ingest_inbox()
                now = time.time()
                if now - last_maintenance > 5:
                    last_maintenance = now
                    lost = self.store.requeue_lost()
                    if lost:
                        log.warning("re-queued jobs of a lost worker thread: %s", lost)
                retention = self.config.node.retention_hours
                if retention > 0 and now - last_retention > 600:
                    last_retention = now
                    self.purge(now - retention * 3600)
            except Exception:  # noqa: BLE001 - keep serving
                log.exception("worker loop error")
            self.stop.wait(0.25)
        self.stop.set()


def configure_logging(config: Config) -> None:
    """Log lines on stderr start with the level (the plugin relays them into Orthanc's log)."""
    _configure_logging(config, stream_format="%(levelname)s %(name)s: %(message)s",
                       file_format="%(asctime)s %(levelname)s %(name)s: %(message)s", replace_handlers=True,
                       quiet=("pynetdicom", "urllib3", "highdicom"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lungburden.orthanc_plugin.worker",
                                     description="lungburden worker of the Orthanc plugin (started by plugin.py)")
    parser.add_argument("--work-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.work_dir)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"ERROR {line.strip()}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    configure_logging(settings.config)
    set_parent_death_signal()
    worker = OrthancWorker(settings)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
