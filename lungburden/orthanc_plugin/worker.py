"""The worker process of the Orthanc plugin: ``python -m lungburden.orthanc_plugin.worker --work-dir DIR``.

Started and supervised by ``plugin.py`` inside Orthanc, run by the virtual environment's
interpreter (``LungBurden.Python``), so numpy/torch never load into Orthanc. It runs the node's
job engine (:class:`~lungburden.jobs.engine.JobEngine`: job store, spool, selection, pipeline,
exporter, retention) on a private job database in ``<WorkDir>``, with jobs analysed in one thread
and series completed by Orthanc's events instead of a quiet time:

- events: the plugin writes one JSON file per ``STABLE_SERIES`` (or re-run request) into
  ``<WorkDir>/inbox``; :meth:`OrthancWorker.handle_event` reads the series through Orthanc's REST
  API (``/series/{id}``, ``/series/{id}/instances``, ``/instances/{id}/file``) into the spool and
  hands it to the engine's :class:`~lungburden.jobs.assembly.SeriesAssembler` (selection rules,
  preferred reconstruction, late-instance policy, ``skipped`` jobs with the reason);
- deliveries: the engine's exporter (retries, dead letter) with three more kinds of destination
  (:mod:`.forwarding`): ``orthanc:store`` (``POST /instances`` into the source study, always),
  ``orthanc:modality:<name>`` and ``orthanc:dicomweb:<name>`` (Orthanc forwards to its configured
  peers), plus the YAML ``destinations``.

Engines (``LungBurden.Engine``): ``local`` analyses the queued jobs in this process (one
thread); ``celery`` sends each one to archive-mode Celery workers instead
(:class:`~lungburden.orthanc_plugin.celery_engine.CeleryDispatcher`), which fetch the series from
Orthanc's DICOMweb and store the results back; events, selection and jobs stay here.

Idempotency: a job is keyed on the series' SOP Instance UID set (and model), so a re-sent or
re-stabilised unchanged series creates no job and no SEG/SR; a re-run request re-processes the
same job and (``ReplacePrevious``) replaces the SEG/SR it stored before.

Logs name series by UID only (no patient data). A failure is recorded in the job (state and
reason) and logged; the process itself exits only on a configuration error
(:data:`~lungburden.exit_codes.EXIT_CONFIG`) or when Orthanc is gone.
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
from lungburden.exit_codes import EXIT_CONFIG, EXIT_OK
from lungburden.jobs.engine import JobEngine
from lungburden.jobs.logs import configure_logging
from lungburden.jobs.queue import instance_set_hash
from lungburden.jobs.runner import set_parent_death_signal
from lungburden.orthanc_plugin.celery_engine import CeleryDispatcher, safe_url
from lungburden.orthanc_plugin.forwarding import OrthancLinks, orthanc_exporters
from lungburden.orthanc_plugin.orthanc_client import OrthancClient, OrthancError, OrthancUnavailable
from lungburden.orthanc_plugin.settings import PluginSettings, load_settings
from lungburden.results.seg import MANUFACTURER

log = logging.getLogger("lungburden.orthanc")

INBOX = "inbox"
#: Modalities of the results (SEG, SR, Secondary Capture, Encapsulated PDF): a series of these made
#: by lungburden (``Manufacturer``) is a result, e.g. stored by Celery workers, never input.
RESULT_MODALITIES = ("SEG", "SR", "OT", "DOC")
#: Seconds between two looks into the inbox.
INBOX_SECONDS = 0.25


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
        self.stopping = threading.Event()
        celery = settings.engine == "celery"
        # Orthanc says when a series is complete (STABLE_SERIES): no completion by quiet time here
        self.engine = JobEngine(self.config, analysis="none" if celery else "thread", complete_quiet_series=False)
        self.store, self.spool = self.engine.store, self.engine.spool
        self.links = OrthancLinks(self.store)
        self.engine.add_exporters(orthanc_exporters(self.client, self.links, settings.replace_previous,
                                                    settings.forward_modalities, settings.forward_dicomweb_servers,
                                                    stored_by_workers=celery))
        self.engine.add_periodic("inbox", INBOX_SECONDS, self.ingest_inbox)
        self.rules = self.config.selection.to_rules()
        self.dispatcher: CeleryDispatcher | None = None
        if celery:
            assert settings.broker is not None  # required by the settings
            self.dispatcher = CeleryDispatcher(
                self.config, self.store, settings.broker, settings.dicomweb_url,
                destinations=lambda: self.engine.runner.destinations, result_dir=self.engine.runner.result_dir,
                backend=settings.result_backend, queue=settings.queue)

    # -- events ----------------------------------------------------------------------------------
    def ingest_inbox(self) -> int:
        """Handle the queued event files (oldest first); returns how many were consumed."""
        done = 0
        for path in sorted(self.inbox.glob("*.json")):
            if self.stopping.is_set():
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
        modality = str(tags.get("Modality", ""))
        if self.links.is_output_series(series_uid) or (
                tags.get("Manufacturer") == MANUFACTURER and modality in RESULT_MODALITIES):
            log.debug("series %s holds lungburden results; ignored", series_uid)
            return
        study = self.client.get_json(f"/studies/{series['ParentStudy']}")
        study_uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
        instances = {
            str(i["MainDicomTags"]["SOPInstanceUID"]): str(i["ID"])
            for i in self.client.get_json(f"/series/{oid}/instances")
        }
        existing = self.store.find_job(series_uid, instance_set_hash(instances), self.engine.model)
        if existing is not None and event.reason != "rerun":
            log.info("series %s unchanged (%d instances): job %d (%s) stands, nothing to do", series_uid,
                     len(instances), existing.id, existing.state)
            return
        if existing is None and modality not in self.rules.modalities:
            reason = f"selection: modality {modality or '?'} is not one of {', '.join(self.rules.modalities)}"
            job, _ = self.store.add_job(study_uid, series_uid, [], list(instances), self.engine.model,
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
        for job in self.engine.assembler.complete([state], force=True):
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

    # -- life cycle ------------------------------------------------------------------------------
    def _orthanc_gone(self) -> bool:
        pid = self.settings.orthanc_pid
        return pid is not None and os.getppid() != pid

    def run(self) -> None:
        """Run until :attr:`stopping` is set or Orthanc is gone."""
        self.engine.start()
        log.info("worker ready (pid %d, Orthanc %s, model %s, deliveries: %s)", os.getpid(),
                 self.settings.orthanc_url, self.engine.model, ", ".join(self.engine.exporter.exporters))
        if self.dispatcher is not None:
            threading.Thread(target=self.dispatcher.run, args=(self.stopping,), name="celery-dispatch",
                             daemon=True).start()
            log.info("engine celery: series are analysed by `lungburden worker` processes (broker %s, queue %s), "
                     "which read them from %s", safe_url(self.dispatcher.broker), self.dispatcher.queue,
                     safe_url(self.settings.dicomweb_url))
        while not self.stopping.wait(INBOX_SECONDS):
            if self._orthanc_gone():
                log.warning("Orthanc is gone; the worker exits")
                break
        self.stopping.set()
        self.engine.stop(timeout=0)  # a job in progress is re-queued when the worker starts again


def configure_worker_logging(config: Config) -> None:
    """Log lines on stderr start with the level (the plugin relays them into Orthanc's log)."""
    configure_logging(config, stream_format="%(levelname)s %(name)s: %(message)s",
                      file_format="%(asctime)s %(levelname)s %(name)s: %(message)s", replace_handlers=True,
                      quiet=("pynetdicom", "urllib3", "highdicom", "celery", "kombu"))


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
    configure_worker_logging(settings.config)
    set_parent_death_signal()
    worker = OrthancWorker(settings)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    worker.run()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
