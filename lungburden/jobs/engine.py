"""The job engine shared by the node (``lungburden serve``) and the Orthanc plugin's worker.

A :class:`JobEngine` owns the job store, the spool, series assembly, the analysis (worker
processes or one thread), the exporter and the housekeeping; the front doors add what only
they have: the node its C-STORE SCP and HTTP endpoint (:mod:`lungburden.dicom_node.service`),
the plugin its Orthanc events and exporters (:mod:`lungburden.orthanc_plugin.worker`).

Threads of a started engine:

- ``assembly`` (with ``complete_quiet_series``): completes the series that have been quiet for
  ``node.series_quiet_seconds`` and queues their jobs (:class:`~lungburden.jobs.assembly.SeriesAssembler`);
- ``jobs`` (with ``analysis="thread"``): runs the queued jobs in this process; with
  ``analysis="processes"`` a :class:`~lungburden.jobs.runner.WorkerPool` of ``node.workers``
  processes does;
- ``exporter``: performs the due deliveries, one ``exporter-<destination>`` thread per destination
  (:class:`~lungburden.jobs.exporters.ExportRunner`);
- ``housekeeping``: restarts dead worker processes, re-queues the jobs and deliveries whose lease
  expired, applies ``node.retention_hours``, and runs the front door's periodic tasks
  (:meth:`JobEngine.add_periodic`) one after the other.

Start-up recovery (after a crash or ``kill -9``): temporary spool files are removed, spooled
files unknown to the database are registered, jobs and deliveries of dead processes are
re-queued, and the quiet time of series that were still receiving restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from lungburden.config.schema import Config
from lungburden.jobs.assembly import SeriesAssembler
from lungburden.jobs.exporters import Exporter, ExportRunner
from lungburden.jobs.logs import configure_audit
from lungburden.jobs.queue import JobStore
from lungburden.jobs.runner import JobRunner, WorkerPool
from lungburden.jobs.spool import Spool, purge_finished, recover

log = logging.getLogger(__name__)

#: Seconds between two passes of the worker check and the lease re-queue.
SUPERVISION_SECONDS = 2.0
#: Seconds between two retention clean-ups (with ``node.retention_hours`` > 0).
RETENTION_SECONDS = 600.0


@dataclass
class PeriodicTask:
    """A function the housekeeping thread calls every ``seconds``."""

    name: str
    seconds: float
    run: Callable[[], object]
    last: float = 0.0


def node_priors(config: Config, model: str):
    """The prior finder of ``config.followup`` for ``model`` (None when it is off); imported on the
    first job, so that a node without follow-up never loads it."""
    from lungburden.followup.priors import node_priors as make

    return make(config, model)


class JobEngine:
    """Store, spool, assembly, analysis, delivery and housekeeping of one storage folder.

    ``analysis``: who runs the queued jobs once started: ``"processes"`` (a pool of
    ``node.workers`` worker processes), ``"thread"`` (one thread of this process) or ``"none"``
    (nobody; a caller may use :attr:`runner` itself). ``complete_quiet_series``: complete series
    after their quiet time (off where the front door says when a series is complete).
    """

    def __init__(
        self,
        config: Config,
        *,
        analysis: Literal["processes", "thread", "none"] = "processes",
        complete_quiet_series: bool = True,
    ):
        if analysis not in ("processes", "thread", "none"):
            raise ValueError(f"analysis must be processes, thread or none, not {analysis!r}")
        self.config = config
        self.analysis = analysis
        configure_audit(config)
        self.complete_quiet_series = complete_quiet_series
        storage = config.storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        self.store = JobStore.for_storage(storage, config.node.db_journal_mode)
        self.spool = Spool(storage, config.node.min_free_disk_mb)
        self.assembler = SeriesAssembler(config, self.store)
        self.model = self.assembler.model
        self.exporter = ExportRunner(config, self.store)
        self.runner = JobRunner(config, self.store, priors_factory=node_priors)
        self.workers = (WorkerPool(config, config.node.workers, priors_factory=node_priors)
                        if analysis == "processes" else None)
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tasks: list[PeriodicTask] = []
        if self.workers is not None:
            self.add_periodic("worker check", SUPERVISION_SECONDS, self.workers.check)
        self.add_periodic("lease re-queue", SUPERVISION_SECONDS, self.requeue_lost)
        if config.node.retention_hours > 0:
            self.add_periodic("retention", RETENTION_SECONDS, self.apply_retention)

    # -- what the front door adds (before start) ------------------------------------------------
    def add_exporters(self, exporters: Mapping[str, Exporter]) -> None:
        """More destinations by name; every analysed job gets one delivery for each of them, then
        one for each configured destination."""
        self.exporter.add(exporters)
        self.runner.destinations = list(self.exporter.exporters)
        if self.workers is not None:
            self.workers.destinations = list(self.exporter.exporters)

    def add_periodic(self, name: str, seconds: float, task: Callable[[], object]) -> None:
        """Call ``task`` every ``seconds`` on the housekeeping thread (first call right after :meth:`start`)."""
        self._tasks.append(PeriodicTask(name, seconds, task))

    # -- housekeeping --------------------------------------------------------------------------
    def _report_lost(self, job_ids: list[int], what: str) -> None:
        """Log the outcome of :meth:`JobStore.requeue_lost` as the store recorded it: re-queued, or
        failed after too many worker deaths (poison input)."""
        jobs = [j for j in (self.store.job(i) for i in job_ids) if j is not None]
        requeued = [j.id for j in jobs if j.state == "queued"]
        if requeued:
            log.warning("re-queued %d jobs %s: %s", len(requeued), what, requeued)
        for job in jobs:
            if job.state == "failed":
                log.error("job %d (series %s) marked failed: %s", job.id, job.series_instance_uid, job.reason)

    def requeue_lost(self) -> list[int]:
        """Re-queue the jobs and deliveries whose lease expired; returns the job ids (re-queued or failed)."""
        requeued = self.store.requeue_lost()
        if requeued:
            self._report_lost(requeued, "of lost workers")
        return requeued

    def purge(self, cutoff: float) -> int:
        """Delete the spooled instances and result files of finished series older than ``cutoff``
        (their job records stay); returns how many series were purged."""
        n = purge_finished(self.spool, self.store, cutoff)
        if n:
            log.info("retention: removed the spooled instances of %d finished series", n)
        return n

    def apply_retention(self) -> int:
        """:meth:`purge` the series finished more than ``node.retention_hours`` ago."""
        return self.purge(time.time() - self.config.node.retention_hours * 3600)

    def recover(self) -> None:
        """Recovery after a stop or crash: spool clean-up and registration, jobs of dead processes re-queued."""
        recover(self.spool, self.store)
        requeued = self.store.requeue_lost(check_pids=True)
        if requeued:
            self._report_lost(requeued, "interrupted by a previous stop or crash")

    # -- threads -------------------------------------------------------------------------------
    def _housekeeping_loop(self) -> None:
        tick = min((t.seconds for t in self._tasks), default=SUPERVISION_SECONDS)
        while not self.stopping.is_set():
            for task in self._tasks:
                now = time.monotonic()
                if self.stopping.is_set() or (task.last and now - task.last < task.seconds):
                    continue
                task.last = now
                try:
                    task.run()
                except Exception:  # noqa: BLE001 - keep the other tasks running
                    log.exception("%s failed", task.name)
            self.stopping.wait(tick)

    def _assembly_loop(self) -> None:
        period = min(1.0, max(0.1, self.config.node.series_quiet_seconds / 4))
        while not self.stopping.wait(period):
            try:
                self.assembler.poll()
            except Exception:  # noqa: BLE001 - keep completing other series
                log.exception("series completion failed")

    def _job_loop(self) -> None:
        try:  # load the pipeline and the model now rather than for the first series
            self.runner.preload(self.model)
        except Exception as exc:  # noqa: BLE001 - reported again (per job) when a series is processed
            log.error("model %s cannot be loaded: %s: %s", self.model, type(exc).__name__, exc)
        while not self.stopping.is_set():
            try:
                started = time.time()
                if self.runner.run_next():
                    self._report_failures(started)
                    continue
            except Exception:  # noqa: BLE001 - e.g. database busy for too long
                log.exception("error while taking a job")
            self.stopping.wait(0.2)

    def _report_failures(self, since: float) -> None:
        """One warning per failed job, naming the series by UID and the reason."""
        for job in self.store.jobs(states=["failed"], limit=5):
            if (job.finished_at or 0) >= since:
                log.warning("series %s not analysed (job %d failed): %s", job.series_instance_uid, job.id, job.reason)

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> JobEngine:
        """Recover, start the analysis, restart the quiet time of receiving series, start the threads."""
        self.recover()
        if self.workers is not None:
            self.workers.start()
        loops: list[tuple[str, Callable[[], None]]] = [
            ("housekeeping", self._housekeeping_loop), ("exporter", lambda: self.exporter.run(self.stopping))]
        if self.complete_quiet_series:
            # series interrupted by the stop get their whole quiet time again (senders retry)
            reopened = self.store.touch_receiving()
            if reopened:
                log.info("%d series were still receiving: their quiet time restarts now", reopened)
            loops.append(("assembly", self._assembly_loop))
        if self.analysis == "thread":
            loops.append(("jobs", self._job_loop))
        for name, target in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads (waiting up to ``timeout`` seconds for each) and the worker processes."""
        self.stopping.set()
        if self.workers is not None:
            self.workers.stop()
        for thread in self._threads:
            thread.join(timeout)
