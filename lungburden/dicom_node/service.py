"""``lungburden serve``: the whole node in one process tree.

Main process: the C-STORE SCP (pynetdicom threads) and the HTTP endpoint (health, jobs,
STOW-RS) in front of a :class:`~lungburden.jobs.engine.JobEngine` (series completion, exporter,
housekeeping, start-up recovery). Worker processes run the pipeline.
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
from lungburden.exit_codes import EXIT_OK
from lungburden.jobs.engine import JobEngine
from lungburden.jobs.spool import Intake

log = logging.getLogger(__name__)


class NodeService:
    """A job engine with the node's SCP and HTTP endpoint; :meth:`start` / :meth:`stop`, or :func:`serve`."""

    def __init__(self, config: Config, start_workers: bool = True):
        self.config = config
        self.started_at = time.time()
        self.engine = JobEngine(config, analysis="processes" if start_workers else "none")
        self.store, self.spool = self.engine.store, self.engine.spool
        self.intake = Intake(self.spool, self.store, storage_sop_classes(config.node))
        self.scp = StorageSCP(config.node, self.intake)
        self.http: NodeHttpServer | None = None

    def health(self) -> dict:
        """``/health``: ``ok`` or ``degraded`` with the problems; disk, queue, dead letters, destinations.

        Degraded: workers missing, free disk below ``node.min_free_disk_mb`` (or none at all), dead
        letters waiting for ``lungburden retry``, a destination whose last attempt failed.
        """
        workers = self.engine.workers
        free = self.spool.free_mb(max_age=5.0)
        workers_alive = workers.alive() if workers else 0
        problems = []
        if workers and workers_alive < self.config.node.workers:
            problems.append(f"{workers_alive}/{self.config.node.workers} workers alive")
        if free <= 0:
            problems.append("disk full (0 MiB free): C-STORE refused with 0xA700, results cannot be written")
        elif free < self.config.node.min_free_disk_mb:
            problems.append(f"spool nearly full ({free:.0f} MiB free): C-STORE refused with 0xA700")
        jobs = self.store.counts()
        deliveries = self.store.delivery_counts()
        destinations = self.engine.exporter.destination_states()
        if deliveries["dead"]:
            problems.append(f"{deliveries['dead']} dead-lettered deliveries (`lungburden retry`)")
        for name, state in destinations.items():
            if state["last_error_at"] and (state["last_success_at"] or 0) < state["last_error_at"]:
                problems.append(f"destination {name} failing: {state['last_error']}")
            elif state["busy_since"] and time.time() - state["busy_since"] > self.config.export.timeout_seconds:
                problems.append(f"destination {name} not answering for {time.time() - state['busy_since']:.0f} s")
        stats = self.scp.stats
        return {
            "status": "ok" if not problems else "degraded",
            "problems": problems,
            "version": __version__,
            "ae_title": self.config.node.ae_title,
            "dicom_port": self.scp.port,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "workers": {"configured": self.config.node.workers, "alive": workers_alive,
                        "restarts": workers.restarts if workers else 0},
            "spool_free_mb": round(free, 1),
            "disk": {"free_mb": round(free, 1), "min_free_mb": self.config.node.min_free_disk_mb,
                     "ok": free > 0 and free >= self.config.node.min_free_disk_mb},
            "receiving_series": len(self.store.receiving_series()),
            "queue_depth": jobs["queued"] + jobs["running"],
            "dead_letters": {"deliveries": deliveries["dead"], "jobs": jobs["dead"]},
            "jobs": jobs,
            "deliveries": deliveries,
            "scp": {"associations": stats.associations, "stored": stats.stored, "refused": stats.refused,
                    "bytes_stored": stats.bytes_stored},
            "destinations": [d.name for d in self.config.destinations],
            "destination_state": destinations,
        }

    def start(self) -> NodeService:
        log.info("lungburden %s node starting (config %s, storage %s)", __version__, self.config.source,
                 self.config.storage_dir)
        self.engine.start()
        self.scp.start()
        if self.config.http.enabled:
            self.http = NodeHttpServer(self.config.http, self.store, self.intake, self.health).start()
        log.info("node ready: DICOM %s@%s:%d, destinations: %s", self.config.node.ae_title, self.config.node.host,
                 self.scp.port, ", ".join(d.name for d in self.config.destinations) or "none")
        return self

    def stop(self) -> None:
        log.info("node stopping")
        self.scp.stop()
        if self.http is not None:
            self.http.stop()
        self.engine.stop()
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
    return EXIT_OK
