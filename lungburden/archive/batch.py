"""``lungburden batch``: quantify the chest CT series of an archive, on a local pool or on Celery workers.

The coordinator searches the archive (:mod:`lungburden.archive.search`), decides for each series
considered whether it is analysed, and hands each one to an engine as a
:class:`~lungburden.archive.tasks.SeriesTask`:

- ``local``: a process pool on this machine (no broker);
- ``celery``: one Celery task per series through the broker, run by ``lungburden worker`` on any
  number of machines; outcomes come back through the result backend.

At most ``max_in_flight`` series are handed out at once, whatever the number of workers: the
per-archive concurrency limit that keeps the PACS from being overloaded by retrieves and stores.

Resumable: a series whose row in the table is ``done`` with the SR of the same series version
and model version is not analysed again, and (when storing back) neither is a series whose
SR for that version is already in the archive (the SR's Series Instance UID is deterministic,
:func:`~lungburden.archive.tasks.expected_result_uids`). Series that failed for a transient
reason are tried again; those whose input the pipeline refused only with ``retry_failed``.

With priors (``priors_url``, :mod:`lungburden.followup`), each task searches the patient's prior
studies and reads or analyses them on its worker. The coordinator then hands out the studies
oldest first and one series of a patient at a time (patients by Patient ID and issuer, held in
memory only): a patient's earlier study in the same run is finished, and with ``store`` its SR
stored, before a later study looks for it, so the later one reads its numbers and every study's
results are the same whatever the number of workers. The results table gets the prior columns
(:data:`~lungburden.archive.table.PRIOR_COLUMNS`).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lungburden.archive.search import ArchiveQuery, SeriesEntry, list_study, search_studies
from lungburden.archive.table import ResultsTable, prior_columns
from lungburden.archive.tasks import (
    DEFAULT_QUEUE,
    TASK_NAME,
    SeriesOutcome,
    SeriesTask,
    expected_result_uids,
    model_name,
    segmenter_for,
    worker_name,
)
from lungburden.archive.worker import run_series
from lungburden.config.schema import FollowupConfig
from lungburden.dicom_io.selection import SelectionRules
from lungburden.followup.priors import PatientKey
from lungburden.jobs.exporters import dicomweb_client

log = logging.getLogger(__name__)

ENGINES = ("local", "celery")


@dataclass(frozen=True)
class BatchOptions:
    """One batch run: the archive, what to consider, how to analyse, where the table goes."""

    url: str
    table: Path
    query: ArchiveQuery = ArchiveQuery()
    rules: SelectionRules = SelectionRules()
    prefer_one_reconstruction: bool = True
    model: str | None = None
    weights: str | None = None
    outputs: tuple[str, ...] = ("seg", "sr")
    store: bool = True
    engine: str = "local"
    #: Processes of the local pool.
    workers: int = 2
    broker: str | None = None
    backend: str | None = None
    queue: str = DEFAULT_QUEUE
    #: Series handed out at once (default: ``workers`` for the local pool, 8 for Celery).
    max_in_flight: int | None = None
    attempts: int = 4
    timeout_s: float = 120.0
    username: str | None = None
    password: str | None = None
    #: Analyse again series whose input the pipeline refused in an earlier run.
    retry_failed: bool = False
    #: Progress bar (None: when stderr is a terminal).
    progress_bar: bool | None = None
    #: DICOMweb base URL where each series' priors are searched (None: no priors; usually ``url``),
    #: how far back, how many, and whether analysed priors' results are stored there (only with
    #: ``store``).
    priors_url: str | None = None
    lookback_days: int = FollowupConfig.lookback_days
    max_priors: int = FollowupConfig.max_priors
    store_priors: bool = FollowupConfig.store_results


@dataclass
class BatchSummary:
    """Counts of the run (``already_done``: found done in the table or the archive, not redone)."""

    considered: int = 0
    submitted: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    already_done: int = 0
    wall_s: float = 0.0
    #: Per analysed series: seconds from hand-out to outcome minus the task's own time.
    engine_overhead_s: list[float] = field(default_factory=list)
    task_s: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("engine_overhead_s", "task_s")}
        for name in ("engine_overhead_s", "task_s"):
            values = getattr(self, name)
            out[f"{name}_median"] = round(statistics.median(values), 3) if values else None
        return out


# -- engines -------------------------------------------------------------------------------------

class LocalEngine:
    """A process pool on this machine (spawn; the segmenter is loaded once per process)."""

    def __init__(self, workers: int, username: str | None, password: str | None):
        self.pool = ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn"))
        self.username, self.password = username, password
        self.pending: dict[Future, SeriesTask] = {}

    def submit(self, task: SeriesTask) -> None:
        self.pending[self.pool.submit(run_series, task, self.username, self.password)] = task

    def collect(self, timeout: float) -> list[SeriesOutcome]:
        if not self.pending:
            return []
        finished, _ = wait(list(self.pending), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for future in finished:
            task = self.pending.pop(future)
            try:
                out.append(future.result())
            except Exception as exc:  # noqa: BLE001 - a dead pool process
                out.append(SeriesOutcome(task.study_instance_uid, task.series_instance_uid, "failed",
                                         f"worker process failed: {type(exc).__name__}: {exc}"[:500]))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class CeleryEngine:
    """One Celery task per series on the broker's queue; outcomes from the result backend."""

    def __init__(self, broker: str, backend: str | None, queue: str):
        from lungburden.archive.worker import make_app

        self.app = make_app(broker, backend)
        self.queue = queue
        self.pending: dict[str, tuple[SeriesTask, object]] = {}

    def submit(self, task: SeriesTask) -> None:
        result = self.app.send_task(TASK_NAME, args=[task.to_json()], queue=self.queue)
        self.pending[result.id] = (task, result)

    def collect(self, timeout: float) -> list[SeriesOutcome]:
        deadline = time.monotonic() + timeout
        while True:
            out: list[SeriesOutcome] = []
            for task_id, (task, result) in list(self.pending.items()):
                try:
                    if not result.ready():  # type: ignore[attr-defined]
                        continue
                    value = result.get(propagate=False, timeout=30)  # type: ignore[attr-defined]
                except Exception as exc:  # noqa: BLE001 - broker/backend unavailable: ask again later
                    log.warning("result backend: %s; waiting", type(exc).__name__)
                    time.sleep(1.0)
                    break
                del self.pending[task_id]
                if isinstance(value, dict):
                    out.append(SeriesOutcome.from_json(value))
                else:
                    out.append(SeriesOutcome(task.study_instance_uid, task.series_instance_uid, "failed",
                                             f"task failed: {type(value).__name__}: {value}"[:500]))
                result.forget()  # type: ignore[attr-defined]
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(0.05)

    def close(self) -> None:
        self.app.close()


# -- progress -----------------------------------------------------------------------------------

class Progress:
    """A tqdm bar with counts and ETA on a terminal, else one log line per finished series."""

    def __init__(self, bar: bool | None):
        self.bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="series", dynamic_ncols=True)
        self.start = time.monotonic()
        self.total = self.finished = 0
        self.counts = {"done": 0, "skipped": 0, "failed": 0}

    def found(self, n: int = 1) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def finish(self, row: dict) -> None:
        self.finished += 1
        self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
        if self.bar is not None:
            self.bar.set_postfix(self.counts, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.finished * (self.total - self.finished)
        reason = f": {row['reason']}" if row.get("reason") else ""
        print(f"[{self.finished}/{self.total}] {row['status']} series {row['series_instance_uid']}{reason} "
              f"(done {self.counts['done']}, skipped {self.counts['skipped']}, failed {self.counts['failed']}; "
              f"ETA {eta:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the coordinator ----------------------------------------------------------------------------

def _row(entry: SeriesEntry, status: str, reason: str | None, outcome: SeriesOutcome | None = None) -> dict:
    row: dict = {
        "study_instance_uid": entry.study_instance_uid, "series_instance_uid": entry.series_instance_uid,
        "status": status, "reason": reason, "acquisition_date": entry.acquisition_date, "kernel": entry.kernel,
        "slice_thickness_mm": entry.slice_thickness_mm, "instances": entry.instances,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if outcome is not None:
        row.update(outcome.result or {})
        row.update(prior_columns(outcome.result or {}))
        row.update(status=status, reason=reason, stored=outcome.stored, retryable=outcome.retryable,
                   worker=outcome.worker,
                   seconds=outcome.timings_s.get("total"))
    return row


@dataclass(frozen=True)
class _Work:
    entry: SeriesEntry
    task: SeriesTask | None = None
    row: dict | None = None
    #: The patient (a digest of Patient ID and issuer) whose series run one at a time; None: any time.
    lane: str | None = None


class _Lanes:
    """One series of a patient in flight at a time, the others waiting in the plan's order."""

    def __init__(self) -> None:
        self.busy: set[str] = set()
        self.queued: dict[str, deque[_Work]] = {}
        self.ready: deque[_Work] = deque()

    @property
    def waiting(self) -> int:
        return len(self.ready) + sum(len(q) for q in self.queued.values())

    def admit(self, work: _Work) -> bool:
        """True: hand ``work`` out now; False: it waits for its patient's series in flight."""
        if work.lane is None:
            return True
        if work.lane in self.busy:
            self.queued.setdefault(work.lane, deque()).append(work)
            return False
        self.busy.add(work.lane)
        return True

    def release(self, work: _Work) -> None:
        """``work`` finished: its patient's next series (if any) is ready."""
        if work.lane is None:
            return
        queue = self.queued.get(work.lane)
        if queue:
            self.ready.append(queue.popleft())
            if not queue:
                del self.queued[work.lane]
        else:
            self.busy.discard(work.lane)


#: The QIDO-RS study attributes that order the studies and group them by patient (with priors).
_PATIENT_FIELDS = ("PatientID", "IssuerOfPatientID", "PatientBirthDate", "StudyTime")


def _lane(study) -> str | None:
    """A digest of the study's Patient ID and issuer (None when priors cannot be searched for it)."""
    key = PatientKey.of(study)
    if key.problem() is not None:
        return None
    return hashlib.sha256(f"{key.patient_id}\\{key.issuer}".encode()).hexdigest()


def _chronological(study) -> tuple[str, str, str]:
    return tuple(str(study.get(k, "") or "").strip() for k in ("StudyDate", "StudyTime", "StudyInstanceUID"))


def _plan(options: BatchOptions, table: ResultsTable, summary: BatchSummary) -> Iterator[_Work]:
    """The series considered, study by study: a task to run or a row to record (or nothing).

    With priors, the studies are first all found and then taken oldest first."""
    client = dicomweb_client(options.url, options.username, options.password, timeout=options.timeout_s)
    algorithm = segmenter_for(options.model, options.weights).info
    name = model_name(options.model)
    studies = search_studies(client, options.query, _PATIENT_FIELDS if options.priors_url else ())
    if options.priors_url:
        studies = iter(sorted(studies, key=_chronological))
    for study in studies:
        study_uid = str(study.StudyInstanceUID)
        lane = _lane(study) if options.priors_url else None
        try:
            listing = list_study(client, study_uid, options.query, options.rules, options.prefer_one_reconstruction)
        except Exception as exc:  # noqa: BLE001 - one unreadable study must not stop the archive
            log.warning("study %s: listing failed: %s", study_uid, type(exc).__name__)
            entry = SeriesEntry(study_uid, f"study:{study_uid}")
            yield _Work(entry, row=_row(entry, "failed", f"QIDO-RS/metadata: {type(exc).__name__}: {exc}"[:500]))
            continue
        for entry in listing.entries:
            summary.considered += 1
            previous = table.get(entry.series_instance_uid)
            if not entry.selected:
                if previous is None or (previous["status"], previous["reason"]) != ("skipped", entry.reason):
                    yield _Work(entry, row=_row(entry, "skipped", entry.reason))
                else:
                    summary.skipped += 1
                continue
            uids = expected_result_uids(entry.study_instance_uid, entry.series_instance_uid,
                                        entry.sop_instance_uids, options.model, algorithm)
            if previous is not None and previous["status"] == "done" and \
                    previous.get("sr_sop_instance_uid") == uids["sr_sop"]:
                summary.already_done += 1
                continue
            if previous is not None and previous["status"] == "failed" and previous.get("retryable") is False \
                    and previous.get("instances") == entry.instances and not options.retry_failed:
                summary.failed += 1  # the pipeline refused these instances; the row stands
                continue
            if options.store and uids["sr_series"] in listing.series_in_archive:
                summary.already_done += 1
                reason = (f"results of {name} {algorithm.version} for these instances already in the archive "
                          f"(SR series {uids['sr_series']})")
                if previous is None or previous["reason"] != reason:
                    yield _Work(entry, row=_row(entry, "skipped", reason))
                continue
            yield _Work(entry, task=SeriesTask(
                options.url, entry.study_instance_uid, entry.series_instance_uid, options.model, options.weights,
                tuple(options.outputs), options.store, options.rules.min_slices, options.attempts, options.timeout_s,
                options.priors_url, options.lookback_days, options.max_priors, options.store and options.store_priors),
                lane=lane)


def make_engine(options: BatchOptions) -> LocalEngine | CeleryEngine:
    if options.engine == "local":
        return LocalEngine(options.workers, options.username, options.password)
    if options.engine == "celery":
        if not options.broker:
            raise ValueError("--engine celery needs --broker URL")
        return CeleryEngine(options.broker, options.backend, options.queue)
    raise ValueError(f"unknown engine {options.engine!r}; choose from {', '.join(ENGINES)}")


def run_batch(options: BatchOptions) -> BatchSummary:
    """Search, hand out, collect and record until every series considered has its row."""
    started = time.monotonic()
    table = ResultsTable(options.table)
    summary = BatchSummary()
    engine = make_engine(options)
    limit = options.max_in_flight or (options.workers if options.engine == "local" else 8)
    progress = Progress(options.progress_bar)
    entries: dict[str, tuple[_Work, float]] = {}
    lanes = _Lanes()
    log.info("batch on %s by %s: engine %s, at most %d series at once", options.url, worker_name(),
             options.engine, limit)

    def record(row: dict) -> None:
        table.add(row)
        setattr(summary, row["status"], getattr(summary, row["status"]) + 1)
        progress.finish(row)

    plan = _plan(options, table, summary)
    exhausted = False
    try:
        while True:
            while len(engine.pending) < limit:
                work = lanes.ready.popleft() if lanes.ready else None
                if work is None:
                    if exhausted or lanes.waiting >= 4 * limit:  # read ahead of waiting series, not further
                        break
                    work = next(plan, None)
                    if work is None:
                        exhausted = True
                        break
                    progress.found()
                    if work.row is not None:
                        record(work.row)
                        continue
                    if work.task is None or not lanes.admit(work):
                        continue
                engine.submit(work.task)
                entries[work.entry.series_instance_uid] = (work, time.monotonic())
                summary.submitted += 1
            if exhausted and not engine.pending and not lanes.waiting:
                break
            for outcome in engine.collect(timeout=1.0):
                work, handed_out = entries.pop(outcome.series_instance_uid)
                lanes.release(work)
                total = outcome.timings_s.get("total")
                if total is not None:
                    summary.task_s.append(total)
                    summary.engine_overhead_s.append(max(0.0, time.monotonic() - handed_out - total))
                record(_row(work.entry, outcome.status, outcome.reason, outcome))
    finally:
        table.write()
        progress.close()
        engine.close()
    summary.wall_s = time.monotonic() - started
    log.info("batch finished: %s", summary.to_json())
    return summary
