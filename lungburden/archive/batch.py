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
"""

from __future__ import annotations

import logging
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lungburden.archive.search import ArchiveQuery, SeriesEntry, list_study, search_studies
from lungburden.archive.table import ResultsTable
from lungburden.archive.tasks import (
    DEFAULT_QUEUE,
    TASK_NAME,
    SeriesOutcome,
    SeriesTask,
    analyse_series,
    expected_result_uids,
    model_name,
    segmenter_for,
    worker_name,
)
from lungburden.dicom_io.selection import SelectionRules
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
        self.pending[self.pool.submit(analyse_series, task, self.username, self.password)] = task

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
        from lungburden.archive.tasks import make_app

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
        row.update(status=status, reason=reason, stored=outcome.stored, retryable=outcome.retryable,
                   worker=outcome.worker,
                   seconds=outcome.timings_s.get("total"))
    return row


@dataclass(frozen=True)
class _Work:
    entry: SeriesEntry
    task: SeriesTask | None = None
    row: dict | None = None


def _plan(options: BatchOptions, table: ResultsTable, summary: BatchSummary) -> Iterator[_Work]:
    """The series considered, study by study: a task to run or a row to record (or nothing)."""
    client = dicomweb_client(options.url, options.username, options.password, timeout=options.timeout_s)
    algorithm = segmenter_for(options.model, options.weights).info
    name = model_name(options.model)
    for study_uid in search_studies(client, options.query):
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
                tuple(options.outputs), options.store, options.rules.min_slices, options.attempts, options.timeout_s))


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
    entries: dict[str, tuple[SeriesEntry, float]] = {}
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
            while not exhausted and len(engine.pending) < limit:
                work = next(plan, None)
                if work is None:
                    exhausted = True
                    break
                progress.found()
                if work.row is not None:
                    record(work.row)
                elif work.task is not None:
                    engine.submit(work.task)
                    entries[work.entry.series_instance_uid] = (work.entry, time.monotonic())
                    summary.submitted += 1
            if exhausted and not engine.pending:
                break
            for outcome in engine.collect(timeout=1.0):
                entry, handed_out = entries.pop(outcome.series_instance_uid)
                total = outcome.timings_s.get("total")
                if total is not None:
                    summary.task_s.append(total)
                    summary.engine_overhead_s.append(max(0.0, time.monotonic() - handed_out - total))
                record(_row(entry, outcome.status, outcome.reason, outcome))
    finally:
        table.write()
        progress.close()
        engine.close()
    summary.wall_s = time.monotonic() - started
    log.info("batch finished: %s", summary.to_json())
    return summary
