"""Analyse one archive series: WADO-RS retrieve, the one pipeline, STOW-RS store; on any engine.

:func:`analyse_series` is the unit of work of ``lungburden batch``. It runs in a process of the
local pool (``--engine local``) or in a Celery worker (``--engine celery``,
:func:`lungburden.archive.worker.make_app`), and is stateless: the pixels come by WADO-RS
(PS3.18 10.4), the results go back by STOW-RS (PS3.18 10.5, the job engine's
:class:`~lungburden.jobs.exporters.DicomwebExporter`) and the outcome (the numbers of
result.json) returns to the coordinator. Nothing stays on the worker. A task with
``priors_url`` also gets the patient's priors (:mod:`lungburden.followup`,
:mod:`lungburden.archive.worker`).

Idempotency: the result UIDs are seeded exactly as the node seeds them
(:func:`lungburden.jobs.runner.uid_seed`: series, hash of its SOP Instance UIDs, model, version
and parameters), so running a series twice (a redelivered task, a second batch, the node having
received the same series) stores the same instances again and never a duplicate.

Credentials for the archive come from the worker's environment (``LUNGBURDEN_DICOMWEB_USERNAME``,
``LUNGBURDEN_DICOMWEB_PASSWORD``), never through the broker.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lungburden.archive.search import is_transient, with_retries
from lungburden.config.schema import DicomwebDestination, FollowupConfig
from lungburden.dicom_io.volume import LoadLimits, SeriesRejected
from lungburden.jobs.exporters import DicomwebExporter, ExportError, dicomweb_client
from lungburden.jobs.queue import Job, instance_set_hash
from lungburden.jobs.runner import uid_seed
from lungburden.pipeline import OUTPUTS, AnalysisOutputs, PriorsFn, process_series, result_uids
from lungburden.segmentation.base import AlgorithmInfo, Segmenter
from lungburden.segmentation.registry import DEFAULT_SEGMENTER, get_segmenter

log = logging.getLogger(__name__)

#: The Celery task's name (what ``lungburden batch --engine celery`` sends).
TASK_NAME = "lungburden.archive.analyse_series"
#: Default Celery queue of archive tasks.
DEFAULT_QUEUE = "lungburden-archive"
#: Environment variables holding the archive's basic-auth credentials on workers.
USERNAME_ENV, PASSWORD_ENV = "LUNGBURDEN_DICOMWEB_USERNAME", "LUNGBURDEN_DICOMWEB_PASSWORD"


@dataclass(frozen=True)
class SeriesTask:
    """What a worker needs to analyse one series (JSON through the broker; no patient data)."""

    url: str
    study_instance_uid: str
    series_instance_uid: str
    model: str | None = None
    weights: str | None = None
    outputs: tuple[str, ...] = ("seg", "sr")
    store: bool = True
    min_slices: int = 16
    #: Tries of each network step (retrieve, store) on transient failures.
    attempts: int = 4
    timeout_s: float = 120.0
    #: DICOMweb base URL where the patient's priors are searched (None: no priors), how far back,
    #: how many, and whether an analysed prior's results are stored there (``followup`` section).
    priors_url: str | None = None
    lookback_days: int = FollowupConfig.lookback_days
    max_priors: int = FollowupConfig.max_priors
    store_priors: bool = FollowupConfig.store_results

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SeriesTask:
        return cls(**{**data, "outputs": tuple(data.get("outputs") or ("seg", "sr"))})


@dataclass(frozen=True)
class SeriesOutcome:
    """What a worker returns for one series: ``done`` with the result document, or ``failed``."""

    study_instance_uid: str
    series_instance_uid: str
    status: str
    reason: str | None = None
    result: dict | None = None
    stored: bool = False
    #: False when trying again cannot help (the pipeline refused the input).
    retryable: bool = True
    worker: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SeriesOutcome:
        return cls(**data)


def model_name(model: str | None) -> str:
    """The model name the node records for a job (its default segmenter when none is named)."""
    return model or DEFAULT_SEGMENTER


def archive_job(study_uid: str, series_uid: str, sop_instance_uids: list[str] | tuple[str, ...], model: str,
                files: tuple[Path, ...] = (), result_dir: Path | None = None) -> Job:
    """The job engine's record of one archive series version (no job store: id 0)."""
    now = time.time()
    return Job(
        id=0, study_instance_uid=study_uid, series_instance_uid=series_uid, version=1,
        instance_set_hash=instance_set_hash(sop_instance_uids), instance_count=len(set(sop_instance_uids)),
        model=model, state="running", reason=None, files=files, result_dir=result_dir, result=None, attempts=0,
        owner=None, last_instance_at=None, created_at=now, updated_at=now, started_at=now, finished_at=None,
        supersedes=None,
    )


def expected_result_uids(study_uid: str, series_uid: str, sop_instance_uids: list[str] | tuple[str, ...],
                         model: str | None, algorithm: AlgorithmInfo) -> dict[str, str]:
    """The UIDs the results of this series version will have (:func:`lungburden.pipeline.result_uids`)."""
    name = model_name(model)
    return result_uids(uid_seed(archive_job(study_uid, series_uid, sop_instance_uids, name), name, algorithm))


_SEGMENTERS: dict[tuple[str | None, str | None], Segmenter] = {}


def segmenter_for(model: str | None, weights: str | None) -> Segmenter:
    """The segmenter of ``model`` with ``weights``, loaded once per process."""
    key = (model, weights)
    if key not in _SEGMENTERS:
        _SEGMENTERS[key] = get_segmenter(model, weights=weights)
    return _SEGMENTERS[key]


def credentials() -> tuple[str | None, str | None]:
    """Basic-auth credentials of the archive from this process's environment."""
    return os.environ.get(USERNAME_ENV) or None, os.environ.get(PASSWORD_ENV) or None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _retrieve(client, task: SeriesTask, folder: Path) -> tuple[list[Path], list[str]]:
    """WADO-RS retrieve of the series into ``folder`` (PS3.10 files); the whole series is tried again
    on a transient failure."""
    def fetch() -> tuple[list[Path], list[str]]:
        for old in folder.glob("*.dcm"):
            old.unlink()
        files, uids = [], []
        for n, ds in enumerate(client.iter_series(task.study_instance_uid, task.series_instance_uid)):
            path = folder / f"{n:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            uids.append(str(ds.SOPInstanceUID))
        return files, uids

    return with_retries(fetch, f"WADO-RS retrieve of series {task.series_instance_uid}", task.attempts)


def _store(task: SeriesTask, job: Job, username: str | None, password: str | None) -> None:
    """STOW-RS of the results into the source study, tried again on failure (idempotent UIDs)."""
    exporter = DicomwebExporter(DicomwebDestination(name="archive", url=task.url, username=username,
                                                    password=password), task.timeout_s)
    for attempt in range(1, task.attempts + 1):
        try:
            exporter.send(job)
            return
        except ExportError as exc:
            if attempt == task.attempts:
                raise
            log.warning("series %s: %s; attempt %d of %d", task.series_instance_uid, exc, attempt, task.attempts)
            time.sleep(2.0 ** (attempt - 1))


def analyse_files(files: list[Path], sop_uids: list[str], study_uid: str, series_uid: str, out_dir: Path,
                  model: str | None = None, weights: str | None = None, outputs: tuple[str, ...] = ("seg", "sr"),
                  min_slices: int = 16, priors: PriorsFn | None = None) -> tuple[Job, AnalysisOutputs]:
    """:func:`lungburden.pipeline.process_series` on the retrieved files of one series, with the
    node's deterministic result UIDs; returns the job record (its ``result_dir`` holds the results
    for an exporter) and the outputs. Raises :class:`SeriesRejected` for input the pipeline refuses."""
    name = model_name(model)
    segmenter = segmenter_for(model, weights)
    job = archive_job(study_uid, series_uid, sop_uids, name, tuple(files), out_dir)
    result = process_series(files, out_dir, model=model, limits=LoadLimits(min_slices=min_slices),
                            segmenter=segmenter, uid_seed=uid_seed(job, name, segmenter.info),
                            outputs=outputs, priors=priors)
    return job, result


def analyse_series(task: SeriesTask, username: str | None = None, password: str | None = None,
                   priors: PriorsFn | None = None) -> SeriesOutcome:
    """Retrieve, analyse with :func:`lungburden.pipeline.process_series` and store one series.

    ``priors``: finds the patient's priors (:func:`lungburden.followup.priors.task_priors` for a
    task with ``priors_url``; the engines pass it, :func:`lungburden.archive.worker.run_series`).
    Input the pipeline refuses (:class:`SeriesRejected`) and errors that remain after the
    retries of transient network failures give a ``failed`` outcome with the reason; nothing
    raises, so one bad series never stops a batch."""
    if username is None and password is None:
        username, password = credentials()
    study, series = task.study_instance_uid, task.series_instance_uid
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def outcome(status: str, reason: str | None = None, result: dict | None = None, stored: bool = False,
                retryable: bool = True):
        timings["total"] = round(time.perf_counter() - start, 3)
        return SeriesOutcome(study, series, status, reason, result, stored, retryable, worker_name(), dict(timings))

    with tempfile.TemporaryDirectory(prefix="lungburden-archive-") as tmp:
        folder, out_dir = Path(tmp) / "series", Path(tmp) / "result"
        folder.mkdir()
        client = dicomweb_client(task.url, username, password, timeout=task.timeout_s)
        try:
            files, sop_uids = _retrieve(client, task, folder)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            kind = "transient failure persisted" if is_transient(exc) else "error"
            log.warning("series %s: retrieve failed (%s: %s)", series, kind, type(exc).__name__)
            return outcome("failed", f"WADO-RS retrieve: {kind}: {type(exc).__name__}: {exc}"[:500])
        timings["retrieve"] = round(time.perf_counter() - start, 3)
        if not files:
            return outcome("failed", "WADO-RS retrieve returned no instance")
        analysed = time.perf_counter()
        try:
            job, outputs = analyse_files(files, sop_uids, study, series, out_dir, task.model, task.weights,
                                         task.outputs, task.min_slices, priors)
        except SeriesRejected as exc:
            log.info("series %s: not analysed: %s", series, exc)
            return outcome("failed", str(exc).removeprefix(f"series {series} ")[:500], retryable=False)
        except Exception as exc:  # noqa: BLE001 - a broken series must not stop the batch
            log.error("series %s: analysis failed: %s\n%s", series, type(exc).__name__, traceback.format_exc())
            return outcome("failed", f"analysis error: {type(exc).__name__}: {exc}"[:500])
        timings["analyse"] = round(time.perf_counter() - analysed, 3)
        if task.store:
            stored_at = time.perf_counter()
            try:
                _store(task, job, username, password)
            except ExportError as exc:
                return outcome("failed", f"STOW-RS: {exc}"[:500], outputs.result)
            timings["store"] = round(time.perf_counter() - stored_at, 3)
        log.info("series %s: done, burden %.2f %%", series, outputs.result["burden_percent"])
        return outcome("done", None, outputs.result, task.store)


__all__ = ["OUTPUTS", "SeriesOutcome", "SeriesTask", "analyse_files", "analyse_series", "expected_result_uids"]
