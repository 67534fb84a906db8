"""``lungburden serve``: the whole node in one process tree.

Main process: the C-STORE SCP (pynetdicom threads), the HTTP endpoint (health, jobs, STOW-RS),
the series-completion monitor, the exporter thread and a supervisor (restarts dead workers,
re-queues jobs of lost workers, retention clean-up). Worker processes run the pipeline.

Start-up recovery (after a crash or ``kill -9``): temporary spool files are removed, spooled
files unknown to the database are registered, jobs and deliveries of dead processes are
re-queued, and the quiet timer of series that were still receiving is restarted, so that a
sender retrying an interrupted transfer completes the series before it is analysed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from lungburden import __version__
from lungburden.config.schema import Config
from lungburden.dicom_node.http import NodeHttpServer
from lungburden.dicom_node.scp import StorageSCP, storage_sop_classes
from lungburden.jobs.assembly import SeriesAssembler
from lungburden.jobs.exporters import ExportRunner
from lungburden.jobs.queue import JobStore
from lungburden.jobs.runner import WorkerPool
from lungburden.jobs.spool import Intake, Spool, purge_finished, recover

log = logging.getLogger(__name__)


class NodeService:
    """All parts of a running node; :meth:`start` / :meth:`stop`, or :func:`serve` to block."""

    def __init__(self, config: Config, start_workers: bool = True):
        self.config = config
        self.start_workers = start_workers
        self.started_at = time.time()
        storage = config.storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        self.store = JobStore.for_storage(storage, config.node.db_journal_mode)
        self.spool = Spool(storage, config.node.min_free_disk_mb)
        self.intake = Intake(self.spool, self.store, storage_sop_classes(config.node))
        self.scp = StorageSCP(config.node, self.intake)
        self.assembler = SeriesAssembler(config, self.store)
        self.exporter = ExportRunner(config, self.store)
        self.workers = WorkerPool(config, config.node.workers) if start_workers else None
        self.http: NodeHttpServer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- health --------------------------------------------------------------------------------
    def health(self) -> dict:
        free = self.spool.free_mb(max_age=5.0)
        workers_alive = self.workers.alive() if self.workers else 0
        problems = []
        if self.workers and workers_alive < self.config.node.workers:
            problems.append(f"{workers_alive}/{self.config.node.workers} workers alive")
        if free < self.config.node.min_free_disk_mb:
            problems.append(f"spool nearly full ({free:.0f} MiB free): C-STORE refused with 0xA700")
        stats = self.scp.stats
        return {
            "status": "ok" if not problems else "degraded",
            "problems": problems,
            "version": __version__,
            "ae_title": self.config.node.ae_title,
            "dicom_port": self.scp.port,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "workers": {"configured": self.config.node.workers, "alive": workers_alive,
                        "restarts": self.workers.restarts if self.workers else 0},
            "spool_free_mb": round(free, 1),
            "receiving_series": len(self.store.receiving_series()),
            "jobs": self.store.counts(),
            "deliveries": self.store.delivery_counts(),
            "scp": {"associations": stats.associations, "stored": stats.stored, "refused": stats.refused,
                    "bytes_stored": stats.bytes_stored},
            "destinations": [d.name for d in self.config.destinations],
        }

    # -- loops ---------------------------------------------------------------------------------
    def _assembly_loop(self) -> None:
        period = min(1.0, max(0.1, self.config.node.series_quiet_seconds / 4))
        while not self._stop.wait(period):
            try:
                self.assembler.poll()
            except Exception:  # noqa: BLE001 - keep completing other series
                log.exception("series completion failed")

    def _supervisor_loop(self) -> None:
        last_retention = 0.0
        while not self._stop.wait(2.0):
            try:
                if self.workers is not None:
                    self.workers.check()
                requeued = self.store.requeue_lost()
                if requeued:
                    log.warning("re-queued jobs of lost workers: %s", requeued)
                if self.config.node.retention_hours > 0 and time.time() - last_retention > 600:
                    last_retention = time.time()
                    self.purge(time.time() - self.config.node.retention_hours * 3600)
            except Exception:  # noqa: BLE001
                log.exception("supervisor error")

    def purge(self, cutoff: float) -> int:
        """Delete spooled instances (and their results) of finished series older than ``cutoff``."""
        n = purge_finished(self.spool, self.store, cutoff)
        if n:
            log.info("retention: removed the spooled instances of %d finished series", n)
        return n

    # -- life cycle ----------------------------------------------------------------------------
    def recover(self) -> None:
        recover(self.spool, self.store)
        requeued = self.store.requeue_lost(check_pids=True)
        if requeued:
            log.warning("re-queued %d jobs interrupted by a previous stop or crash: %s", len(requeued), requeued)

    def start(self) -> NodeService:
        log.info("lungburden %s node starting (config %s, storage %s)", __version__, self.config.source,
                 self.config.storage_dir)
        self.recover()
        if self.workers is not None:
            self.workers.start()
        self.scp.start()
        if self.config.http.enabled:
            self.http = NodeHttpServer(self.config.http, self.store, self.intake, self.health).start()
        # Series interrupted by the stop restart their quiet time now that senders can reach us again.
        reopened = self.store.touch_receiving()
        if reopened:
            log.info("%d series were still receiving: their quiet time restarts now", reopened)
        for name, target in (("assembly", self._assembly_loop), ("supervisor", self._supervisor_loop),
                             ("exporter", lambda: self.exporter.run(self._stop))):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("node ready: DICOM %s@%s:%d, destinations: %s", self.config.node.ae_title, self.config.node.host,
                 self.scp.port, ", ".join(d.name for d in self.config.destinations) or "none")
        return self

    def stop(self) -> None:
        log.info("node stopping")
        self._stop.set()
        self.scp.stop()
        if self.http is not None:
            self.http.stop()
        if self.workers is not None:
            self.workers.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        log.info("node stopped")


def serve(config: Config) -> int:
    """Run the node until SIGTERM or SIGINT."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d received", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service = NodeService(config).start()
    ready = os.environ.get("LUNGBURDEN_READY_FILE")
    if ready:  # for supervisors and tests: ports actually bound
        Path(ready).write_text(f"{service.scp.port} {service.http.port if service.http else 0}\n")
    try:
        while not stopping.wait(1.0):
            pass
    finally:
        service.stop()
    return 0
