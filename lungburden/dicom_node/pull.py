"""``lungburden pull``: retrieve a study or series by WADO-RS (PS3.18 10.4) and process it.

The retrieved instances go through the same intake and spool as C-STORE and STOW-RS; the
series are completed at once (no quiet time: the retrieval is complete), selected, queued and,
unless ``wait`` is false, processed and delivered in this process (claims are atomic, so a
running ``lungburden serve`` on the same storage may take some of the work: nothing is done twice).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pydicom.dataset import Dataset

from lungburden.dicom_node.scp import storage_sop_classes
from lungburden.jobs.assembly import complete_now
from lungburden.jobs.engine import JobEngine
from lungburden.jobs.exporters import dicomweb_client
from lungburden.jobs.queue import TERMINAL_STATES, Job
from lungburden.jobs.spool import Intake

log = logging.getLogger(__name__)


@dataclass
class PullReport:
    retrieved: int = 0
    stored: int = 0
    skipped_sop_classes: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def retrieve(
    engine: JobEngine,
    url: str,
    study_uid: str,
    series_uid: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> PullReport:
    """Retrieve by WADO-RS into the engine's spool and enqueue the complete series (selection applied)."""
    config = engine.config
    client = dicomweb_client(url, username, password, timeout=config.export.timeout_seconds)
    intake = Intake(engine.spool, engine.store, storage_sop_classes(config.node))
    report = PullReport()
    source = f"wado:{urlsplit(url).hostname}"
    instances = (client.iter_series(study_uid, series_uid) if series_uid else client.iter_study(study_uid))
    series_uids: list[str] = []
    for ds in instances:
        report.retrieved += 1
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in intake.sop_classes:
            name = getattr(ds.get("SOPClassUID"), "name", sop_class)
            report.skipped_sop_classes[name] = report.skipped_sop_classes.get(name, 0) + 1
            continue
        outcome = intake.accept(_encode(ds), source=source)
        if outcome.ok:
            report.stored += 1
            if outcome.series_instance_uid not in series_uids:
                series_uids.append(outcome.series_instance_uid)
        else:
            report.refused.append(f"{outcome.sop_instance_uid or '?'}: {outcome.reason}")
    for name, n in report.skipped_sop_classes.items():
        log.info("pull: %d instances of %s not retrieved into the spool (not a CT image)", n, name)
    log.info("pull: %d instances retrieved, %d stored in %d series", report.retrieved, report.stored,
             len(series_uids))
    report.jobs = complete_now(config, engine.store, series_uids)
    return report


def process_jobs(engine: JobEngine, job_ids: list[int], timeout: float | None = None) -> list[Job]:
    """Run and deliver the given jobs in this process (the engine's runner and exporter, no
    threads) until each reaches a terminal state."""
    store, runner, exporter = engine.store, engine.runner, engine.exporter
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        jobs = [j for j in (store.job(i) for i in job_ids) if j is not None]
        if all(j.state in TERMINAL_STATES for j in jobs):
            return jobs
        if deadline is not None and time.monotonic() > deadline:
            log.warning("pull: timed out waiting for jobs %s", [j.id for j in jobs if j.state not in TERMINAL_STATES])
            return jobs
        if runner.run_next(job_ids) or exporter.deliver_one(job_ids):
            continue
        due = store.next_delivery_due()
        time.sleep(0.5 if due is None else min(5.0, max(0.05, due - time.time())))
