"""Inference workers: processes that take queued jobs and run the shared pipeline on them.

Workers run in their own processes (``multiprocessing`` spawn), so the SCP keeps accepting
while a series is analysed. A worker claims a job atomically in the job store, keeps its lease
alive with a heartbeat thread, calls :func:`lungburden.pipeline.process_series` and records
the outcome; deliveries are then performed by the exporter
(:class:`~lungburden.jobs.exporters.ExportRunner`). A worker dies with its parent (Linux
``PR_SET_PDEATHSIG``), so after a ``kill -9`` of the node no orphan finishes a job behind the
restarted node's back; the restarted node re-queues the job (see :meth:`JobStore.requeue_lost`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lungburden.config.schema import Config
from lungburden.jobs.logs import audit, configure_audit
from lungburden.jobs.queue import Job, JobStore

if TYPE_CHECKING:
    from lungburden.dicom_io.volume import LoadLimits
    from lungburden.segmentation.base import AlgorithmInfo, Segmenter

log = logging.getLogger(__name__)

#: Keys of result.json copied into the job record (``lungburden jobs``, ``/jobs``): no patient data.
RESULT_KEYS = (
    "study_instance_uid", "series_instance_uid", "model", "model_version", "burden_percent", "quality",
    "lung_volume_ml", "ggo_volume_ml", "high_opacity_volume_ml", "seg_sop_instance_uid",
    "seg_series_instance_uid", "sr_sop_instance_uid", "sr_series_instance_uid", "sc_series_instance_uid",
    "sc_sop_instance_uids", "pdf_series_instance_uid", "pdf_sop_instance_uid", "slices", "refused",
)


def result_summary(result: dict) -> dict:
    """The job record's copy of a result.json (:data:`RESULT_KEYS`; of ``quality`` only the flags)."""
    summary = {k: result[k] for k in RESULT_KEYS if k in result}
    if isinstance(summary.get("quality"), dict):  # the flags; thresholds stay in result.json
        summary["quality"] = {k: summary["quality"].get(k) for k in ("passed", "flags")}
    return summary


#: Makes the prior finder (:data:`lungburden.pipeline.PriorsFn`) of a configuration and model, or
#: None when follow-up is off (:func:`lungburden.followup.priors.node_priors`). Passed in by the
#: engine: the runner does not import the follow-up package (it uses archive mode, which uses this).
PriorsFactory = Callable[[Config, str], object]


class ProcessFn(Protocol):
    """The contract of :func:`lungburden.pipeline.process_series` (what a worker calls per job)."""

    def __call__(self, files: list[Path], out_dir: Path, *, model: str | None, limits: LoadLimits,
                 segmenter: Segmenter, uid_seed: str) -> object: ...


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to kill this process when its parent dies (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def uid_seed(job: Job, model_name: str, algorithm: AlgorithmInfo) -> str:
    """The seed of the deterministic result UIDs of one series version and algorithm (idempotency).

    The algorithm's version and parameters (weights digest, precision, speck size) are part of
    it: a re-analysis with other weights or arithmetic is another SEG/SR, so it gets other UIDs
    (one UID, one object: PS3.3 C.12.1.1.1)."""
    parameters = json.dumps(algorithm.parameters or {}, sort_keys=True)
    return f"{job.series_instance_uid}/{job.instance_set_hash}/{model_name}/{algorithm.version}/{parameters}"


class WorkerStopped(BaseException):
    """Raised inside a worker by SIGTERM while it analyses a series (the job is handed back)."""


class JobRunner:
    """Runs claimed jobs through the pipeline (the segmenter is loaded once per process).

    ``destinations``: the names of the deliveries created for each analysed job (default: the
    configured ``destinations``); the :class:`~lungburden.jobs.exporters.ExportRunner`
    performing them must have an exporter for each name.
    """

    def __init__(self, config: Config, store: JobStore, process_fn: ProcessFn | None = None,
                 destinations: Sequence[str] | None = None, priors_factory: PriorsFactory | None = None):
        self.config = config
        self.store = store
        self._process_fn = process_fn
        #: Makes the prior finder of a model (``followup``); None: no priors.
        self.priors_factory = priors_factory
        self._priors: dict[str, object] = {}
        self._segmenters: dict[str, Segmenter] = {}
        self.destinations: list[str] = (
            [d.name for d in config.destinations] if destinations is None else list(destinations)
        )
        #: The job being analysed (for a clean hand-back on SIGTERM).
        self.current_job: Job | None = None
        #: Checked after a claim: a stopping worker hands the job back at once.
        self.should_stop: Callable[[], bool] = lambda: False

    @property
    def process_fn(self) -> ProcessFn:
        if self._process_fn is None:
            from functools import partial

            from lungburden.pipeline import process_series

            self._process_fn = partial(process_series, outputs=self.config.processing.outputs,
                                       on_quality_failure=self.config.processing.on_quality_failure)
        return self._process_fn

    def segmenter(self, model: str) -> Segmenter:
        """The segmenter ``model``, loaded on the first call (call it early to preload the model)."""
        if model not in self._segmenters:
            from lungburden.segmentation.registry import get_segmenter

            self._segmenters[model] = get_segmenter(model, weights=self.config.processing.weights)
        return self._segmenters[model]

    def priors(self, model: str):
        """The prior finder for ``model`` (made once), or None without ``priors_factory``/followup."""
        if self.priors_factory is None:
            return None
        if model not in self._priors:
            self._priors[model] = self.priors_factory(self.config, model)
        return self._priors[model]

    def preload(self, model: str) -> None:
        """Import the pipeline and load the segmenter ``model`` now rather than for the first job."""
        _ = self.process_fn
        self.segmenter(model)

    def result_dir(self, job: Job) -> Path:
        return self.config.storage_dir / "results" / f"job-{job.id:06d}-v{job.version}"

    def run(self, job: Job) -> None:
        """Process one claimed job; never raises (the outcome is recorded in the store)."""
        from lungburden.dicom_io.volume import SeriesRejected

        lease = self.config.processing.job_lease_seconds
        stop_beat = threading.Event()

        def beat() -> None:
            while not stop_beat.wait(lease / 4):
                try:
                    self.store.heartbeat(job.id, lease)
                except Exception:  # noqa: BLE001
                    log.exception("heartbeat of job %d failed", job.id)

        beater = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        beater.start()
        start = time.perf_counter()
        out_dir = self.result_dir(job)
        try:
            missing = [f for f in job.files if not f.exists()]
            if missing:
                raise SeriesRejected(job.series_instance_uid,
                                     f"{len(missing)} spooled instances are gone (retention clean-up?)")
            shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of an interrupted attempt
            segmenter = self.segmenter(job.model)
            log.info("job %d: analysing series %s version %d (%d instances, model %s)", job.id,
                     job.series_instance_uid, job.version, len(job.files), job.model)
            priors = self.priors(job.model)
            outputs = self.process_fn(list(job.files), out_dir, model=job.model,
                                      limits=self.config.selection.to_limits(), segmenter=segmenter,
                                      uid_seed=uid_seed(job, job.model, segmenter.info),
                                      **({"priors": priors} if priors is not None else {}))
        except SeriesRejected as exc:
            stop_beat.set()
            shutil.rmtree(out_dir, ignore_errors=True)
            log.warning("job %d: %s", job.id, exc)
            self.store.job_failed(job.id, str(exc))
            self._audit(job, "failed", str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a failed job must not kill the worker
            stop_beat.set()
            shutil.rmtree(out_dir, ignore_errors=True)
            log.error("job %d failed: %s\n%s", job.id, exc, traceback.format_exc())
            self.store.job_failed(job.id, f"processing error: {type(exc).__name__}: {exc}")
            self._audit(job, "failed", f"processing error: {type(exc).__name__}")
            return
        finally:
            stop_beat.set()
        result = dict(getattr(outputs, "result", {}) or {})
        summary = result_summary(result)
        refused = result.get("refused")
        if refused:
            log.warning("job %d: %s; delivering an SR that says so", job.id, refused)
        self.store.job_succeeded(job.id, out_dir, summary, self.destinations, reason=refused)
        quality = result.get("quality") or {}
        self._audit(job, "analysed", None, seg_sop_instance_uid=summary.get("seg_sop_instance_uid"),
                    sr_sop_instance_uid=summary.get("sr_sop_instance_uid"),
                    quality_flags=[f.get("code") for f in quality.get("flags", [])], destinations=self.destinations)
        log.info("job %d: series %s analysed in %.1f s (burden %s %%); delivering to %s", job.id,
                 job.series_instance_uid, time.perf_counter() - start, summary.get("burden_percent", "?"),
                 ", ".join(self.destinations) or "no destination")

    @staticmethod
    def _audit(job: Job, outcome: str, reason: str | None, **fields: object) -> None:
        audit("job_" + outcome, job_id=job.id, study_instance_uid=job.study_instance_uid,
              series_instance_uid=job.series_instance_uid, version=job.version, instance_count=job.instance_count,
              model=job.model, outcome=outcome, reason=reason, **fields)

    def run_next(self, job_ids: list[int] | None = None) -> bool:
        job = self.store.claim_job(lease_seconds=self.config.processing.job_lease_seconds, job_ids=job_ids)
        if job is None:
            return False
        if self.should_stop():
            self.store.release_job(job.id, "re-queued: the node was stopped before the analysis")
            return False
        self.current_job = job
        try:
            self.run(job)
        except WorkerStopped:
            self.store.release_job(job.id, "re-queued: the node was stopped during the analysis")
            log.info("job %d handed back to the queue (node stopping)", job.id)
            raise
        finally:
            self.current_job = None
        return True


def worker_main(config: Config, parent_pid: int, index: int, log_level: int,
                destinations: Sequence[str] | None = None, priors_factory: PriorsFactory | None = None) -> None:
    """Entry point of a worker process; SIGTERM stops it (a job in progress is re-queued).

    ``destinations``: as for :class:`JobRunner`."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the node died before PR_SET_PDEATHSIG took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when to stop
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    configure_audit(config)
    store = JobStore.for_storage(config.storage_dir, config.node.db_journal_mode)
    runner = JobRunner(config, store, destinations=destinations, priors_factory=priors_factory)
    stopping = threading.Event()
    runner.should_stop = stopping.is_set

    def on_term(signum: int, frame: object) -> None:
        first = not stopping.is_set()
        stopping.set()
        if first and runner.current_job is not None:
            raise WorkerStopped()  # once: a second SIGTERM must not interrupt the hand-back

    signal.signal(signal.SIGTERM, on_term)
    log.info("worker %d (pid %d) ready", index, os.getpid())
    try:
        while not stopping.is_set():
            if os.getppid() != parent_pid:
                log.warning("worker %d: the node process is gone; exiting", index)
                return
            try:
                if runner.run_next():
                    continue
            except WorkerStopped:
                raise
            except Exception:  # noqa: BLE001 - e.g. database locked for too long
                log.exception("worker %d: error while taking a job", index)
            stopping.wait(0.25)
    except WorkerStopped:
        pass  # the job was handed back by JobRunner.run_next


class WorkerPool:
    """Starts, watches, restarts and stops (SIGTERM, then SIGKILL) the worker processes.

    ``destinations``: the deliveries created for each analysed job (as for :class:`JobRunner`).
    """

    def __init__(self, config: Config, count: int, destinations: Sequence[str] | None = None,
                 priors_factory: PriorsFactory | None = None):
        self.config = config
        self.count = count
        self.priors_factory = priors_factory
        self.destinations = None if destinations is None else list(destinations)
        self._ctx = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.process.BaseProcess | None] = [None] * count
        self.restarts = 0
        self._stopping = False
        self._clean_exits: dict[int, float] = {}

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(
            target=worker_main,
            args=(self.config, os.getpid(), index, logging.getLogger().getEffectiveLevel(), self.destinations,
                  self.priors_factory),
            name=f"lungburden-worker-{index}",
            daemon=True,
        )
        proc.start()
        self.processes[index] = proc

    def start(self) -> None:
        for i in range(self.count):
            self._spawn(i)

    def check(self) -> int:
        """Restart dead workers; returns the number restarted."""
        n = 0
        if self._stopping:
            return 0
        now = time.monotonic()
        for i, proc in enumerate(self.processes):
            if proc is None or not proc.is_alive():
                if proc is not None and proc.exitcode == 0 and now - self._clean_exits.setdefault(i, now) < 1.0:
                    continue  # an orderly exit (SIGTERM to the process group): the node is likely stopping
                self._clean_exits.pop(i, None)
                if proc is not None:
                    log.error("worker %d exited with code %s; restarting it", i, proc.exitcode)
                self._spawn(i)
                n += 1
        self.restarts += n
        return n

    def alive(self) -> int:
        return sum(1 for p in self.processes if p is not None and p.is_alive())

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        running = [p for p in self.processes if p is not None and p.is_alive()]
        for proc in running:
            proc.terminate()  # SIGTERM: idle workers exit, busy ones hand their job back
        deadline = time.monotonic() + timeout
        for proc in running:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in running:
            if proc.is_alive():
                log.warning("worker %s did not stop in time; killing it", proc.name)
                proc.kill()
                proc.join(2)
