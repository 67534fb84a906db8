"""``"Engine": "celery"``: the plugin's queued jobs are analysed by archive-mode Celery workers.

The plugin's worker process keeps everything that decides *what* is analysed (Orthanc's events,
the spool, series assembly, the selection rules, the job store and ``/lungburden/jobs``); a
:class:`CeleryDispatcher` thread replaces the analysis:

- each queued job is claimed (state ``running``, reason ``enqueued as Celery task <id>``) and sent
  as one :class:`~lungburden.archive.tasks.SeriesTask` to the broker, the task that
  ``lungburden worker`` runs (:func:`lungburden.archive.tasks.analyse_series`): the worker
  retrieves the series from Orthanc's DICOMweb (WADO-RS), runs the one pipeline and stores the
  results back by STOW-RS, with the node's deterministic UIDs;
- the outcome comes back through the result backend: ``done`` records the numbers (with the
  Celery worker and task id) and creates the deliveries, ``orthanc:store``
  (:class:`~lungburden.orthanc_plugin.forwarding.StoredByWorkers`: bookkeeping, ReplacePrevious)
  and the forwards; ``failed`` fails the job with the worker's reason;
- the broker unreachable: the job goes back to ``queued`` with the reason and the next try
  waits 1, 2, 4 … 60 s. Nothing is lost: the job store is the plugin's.

At least once: a job in flight when the plugin's worker process stops is re-queued when it
starts again and sent once more; the deterministic UIDs make the second result the same instances.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lungburden.archive.tasks import DEFAULT_QUEUE, TASK_NAME, SeriesOutcome, SeriesTask
from lungburden.config.schema import Config
from lungburden.jobs.queue import Job, JobStore
from lungburden.jobs.runner import result_summary

log = logging.getLogger("lungburden.orthanc")

#: Seconds between two looks for queued jobs and outcomes.
POLL_SECONDS = 0.25
#: Longest wait between two tries of an unreachable broker.
MAX_BACKOFF_SECONDS = 60.0
#: Seconds the result backend may take to reconnect before a send is given up (Celery's default
#: retries for minutes while the plugin waits).
BACKEND_RETRY_SECONDS = 5.0


def safe_url(url: str) -> str:
    """``url`` without its user and password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


@dataclass
class InFlight:
    job: Job
    task_id: str
    sent_at: float
    started: bool = False


class CeleryDispatcher:
    """Queued jobs → Celery tasks; outcomes → job states and deliveries (one thread, :meth:`run`)."""

    def __init__(self, config: Config, store: JobStore, broker: str, dicomweb_url: str,
                 destinations: Callable[[], Sequence[str]], result_dir: Callable[[Job], Path],
                 backend: str | None = None, queue: str | None = None, app=None):  # noqa: ANN001 - Celery app
        self.config, self.store = config, store
        self.broker, self.dicomweb_url = broker, dicomweb_url
        self.queue = queue or DEFAULT_QUEUE
        self.destinations, self.result_dir = destinations, result_dir
        if app is None:
            from lungburden.archive.worker import make_app

            app = make_app(broker, backend)
            app.conf.result_backend_transport_options = {"retry_policy": {"timeout": BACKEND_RETRY_SECONDS}}
            # a reconnection error per retry, then "must be restarted" (it need not): one warning
            # of ours per failed try says it instead
            logging.getLogger("celery.backends").setLevel(logging.CRITICAL + 1)
        self.app = app
        self.in_flight: dict[int, InFlight] = {}
        self.retry_at = 0.0
        self.backoff = 1.0
        self.lease = config.processing.job_lease_seconds
        self.beat_at = 0.0

    def task_for(self, job: Job) -> SeriesTask:
        """The archive task of one job: this version's series from Orthanc's DICOMweb, results stored back."""
        processing = self.config.processing
        return SeriesTask(self.dicomweb_url, job.study_instance_uid, job.series_instance_uid, job.model,
                          str(processing.weights) if processing.weights else None, tuple(processing.outputs),
                          store=True, min_slices=self.config.selection.min_slices)

    def _set_reason(self, job_id: int, reason: str) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE jobs SET reason=?, updated_at=? WHERE id=?", (reason, time.time(), job_id))

    def _unreachable(self, exc: Exception) -> str:
        """Back off after a failure of the broker or result backend; returns the reason to record."""
        reason = (f"Celery broker {safe_url(self.broker)} unreachable ({type(exc).__name__}); "
                  f"next try in {self.backoff:.0f} s")
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_SECONDS)
        return reason

    # -- sending ---------------------------------------------------------------------------------
    def send_queued(self) -> int:
        """Send every queued job (until the broker fails: then back off); returns how many were sent."""
        sent = 0
        while time.monotonic() >= self.retry_at:
            job = self.store.claim_job(lease_seconds=self.lease)
            if job is None:
                break
            try:
                result = self.app.send_task(TASK_NAME, args=[self.task_for(job).to_json()], queue=self.queue)
            except Exception as exc:  # noqa: BLE001 - broker or result backend unreachable: try again later
                reason = self._unreachable(exc)
                self.store.release_job(job.id, reason)
                log.warning("series %s (job %d) stays queued: %s", job.series_instance_uid, job.id, reason)
                break
            self.backoff = 1.0
            self.in_flight[job.id] = InFlight(job, result.id, time.time())
            self._set_reason(job.id, f"enqueued as Celery task {result.id} (queue {self.queue})")
            log.info("series %s: job %d enqueued as Celery task %s", job.series_instance_uid, job.id, result.id)
            sent += 1
        return sent

    # -- outcomes --------------------------------------------------------------------------------
    def collect(self) -> int:
        """Record the outcomes that came back; returns how many."""
        done = 0
        for job_id, flight in list(self.in_flight.items()):
            if time.monotonic() < self.retry_at:
                break
            try:
                meta = self.app.backend.get_task_meta(flight.task_id)
            except Exception as exc:  # noqa: BLE001 - result backend unreachable: ask again later
                log.warning("outcomes of %d Celery tasks wait: %s", len(self.in_flight), self._unreachable(exc))
                break
            status = meta.get("status")
            if status == "STARTED" and not flight.started:
                flight.started = True
                info = meta.get("result")
                worker = info.get("hostname", "?") if isinstance(info, dict) else "?"
                self._set_reason(job_id, f"analysing on Celery worker {worker} (task {flight.task_id})")
            if status not in ("SUCCESS", "FAILURE", "REVOKED"):
                continue
            del self.in_flight[job_id]
            self.record(flight, meta.get("result"))
            try:
                self.app.AsyncResult(flight.task_id).forget()
            except Exception:  # noqa: BLE001 - expires with result_expires anyway
                pass
            done += 1
        return done

    def record(self, flight: InFlight, value: object) -> None:
        """One outcome: ``done`` → numbers and deliveries, else the job fails with the reason."""
        job = flight.job
        if not isinstance(value, dict) or "status" not in value:
            outcome = SeriesOutcome(job.study_instance_uid, job.series_instance_uid, "failed",
                                    f"Celery task {flight.task_id} failed: {value}"[:500])
        else:
            outcome = SeriesOutcome.from_json(value)
        if outcome.status != "done" or not outcome.result:
            reason = f"{outcome.reason or 'no result'} (Celery worker {outcome.worker or '?'})"
            self.store.job_failed(job.id, reason)
            log.warning("series %s not analysed (job %d failed): %s", job.series_instance_uid, job.id, reason)
            return
        out_dir = self.result_dir(job)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps(outcome.result, indent=2))
        summary = {**result_summary(outcome.result), "worker": outcome.worker, "celery_task_id": flight.task_id}
        refused = outcome.result.get("refused")
        destinations = list(self.destinations())
        self.store.job_succeeded(job.id, out_dir, summary, destinations, reason=refused)
        log.info("job %d: series %s analysed by Celery worker %s in %.1f s (burden %s %%); delivering to %s",
                 job.id, job.series_instance_uid, outcome.worker, time.time() - flight.sent_at,
                 summary.get("burden_percent", "?"), ", ".join(destinations))

    def heartbeat(self) -> None:
        """Keep the leases of the jobs in flight (else the engine re-queues them as lost)."""
        if time.monotonic() < self.beat_at:
            return
        self.beat_at = time.monotonic() + self.lease / 4
        for job_id in list(self.in_flight):
            self.store.heartbeat(job_id, self.lease)

    def run(self, stopping: threading.Event) -> None:
        """Send, collect and keep leases until ``stopping``; a failure is logged and tried again."""
        while not stopping.is_set():
            try:
                self.collect()
                self.heartbeat()
                self.send_queued()
            except Exception:  # noqa: BLE001 - e.g. database busy: keep dispatching
                log.exception("Celery dispatch failed")
            stopping.wait(POLL_SECONDS)
        self.app.close()


__all__ = ["CeleryDispatcher", "safe_url"]
