"""Series completion and selection: turn quiet series into jobs (or skipped entries with a reason).

Completion rule: a series is complete when neither it nor any other series of its study has
received an instance for ``node.series_quiet_seconds`` (reconstructions of one acquisition sent
together are then compared with each other). Its instance set (the SOP Instance UIDs spooled
for it) is then one *version* of the series.

Late-instance policy (``processing.late_instance_policy``, docs/node.md):

- ``reprocess`` (default): an instance arriving after the series completed re-opens it; at the
  next completion a new job version is created for the enlarged instance set. A version that has
  not started yet is superseded (never processed); a version already processed stays delivered
  and the new version's SEG + SR (new UIDs, higher version) supersede it. Re-sending the same
  instances creates no new version (same instance-set hash).
- ``ignore``: late instances stay in the spool and are recorded as a ``skipped`` job whose reason
  says that they were ignored by policy; the earlier results stand.

Selection: :func:`lungburden.dicom_io.selection.select_series` with the YAML rules. Rejected
series become ``skipped`` jobs with the rule's reason. With ``selection.prefer_one_reconstruction``
only the preferred accepted series per frame of reference is queued (lung kernel first); the
others are skipped naming the preferred one. A derived axial reformat is queued only when no
original axial series of its study is accepted (now or analysed earlier), else skipped naming it
(:func:`lungburden.dicom_io.selection.preferred_original`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lungburden.config.schema import Config
from lungburden.dicom_io.selection import is_original, preferred_original, select_series
from lungburden.dicom_io.series import SeriesCandidate, discover_series
from lungburden.jobs.queue import Job, JobStore, SeriesState
from lungburden.segmentation.registry import DEFAULT_SEGMENTER

log = logging.getLogger(__name__)

_ACTIVE = ("queued", "running", "exporting", "done", "dead")


@dataclass(frozen=True)
class CompletedSeries:
    """A series version handed to selection: its files and SOP Instance UIDs."""

    state: SeriesState
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]


def job_model(config: Config) -> str:
    return config.processing.model or DEFAULT_SEGMENTER


class SeriesAssembler:
    """Closes quiet series, applies the selection rules and enqueues jobs (one instance per node)."""

    def __init__(self, config: Config, store: JobStore):
        self.config = config
        self.store = store
        self.rules = config.selection.to_rules()
        self.model = job_model(config)

    def poll(self, now: float | None = None) -> list[Job]:
        """Complete every quiet series; returns the jobs created (queued or skipped)."""
        quiet = self.store.quiet_series(self.config.node.series_quiet_seconds, now)
        by_study: dict[str, list[SeriesState]] = {}
        for s in quiet:
            by_study.setdefault(s.study_instance_uid, []).append(s)
        jobs: list[Job] = []
        for states in by_study.values():
            jobs += self.complete(states)
        return jobs

    def complete(self, states: list[SeriesState], force: bool = True) -> list[Job]:
        """Close the given series of one study and turn them into jobs."""
        completed: list[CompletedSeries] = []
        for s in states:
            if force and not self.store.mark_series_complete(s.series_instance_uid, s.last_received):
                continue  # an instance arrived meanwhile: stays open
            records = [r for r in self.store.instances(s.series_instance_uid) if r.path.exists()]
            if not records:
                continue
            completed.append(CompletedSeries(s, tuple(r.path for r in records),
                                             tuple(r.sop_instance_uid for r in records)))
        if not completed:
            return []
        return self._select_and_enqueue(completed)

    def _select_and_enqueue(self, completed: list[CompletedSeries]) -> list[Job]:
        by_uid = {c.state.series_instance_uid: c for c in completed}
        candidates = [c for c in discover_series([f for c in completed for f in c.files])
                      if c.series_instance_uid in by_uid]
        jobs: list[Job] = []
        policy = self.config.processing.late_instance_policy
        fresh: list[SeriesCandidate] = []
        for cand in candidates:
            c = by_uid[cand.series_instance_uid]
            previous = self.store.jobs(series_instance_uid=cand.series_instance_uid)
            processed = [j for j in previous if j.state in _ACTIVE]
            if processed and policy == "ignore":
                known = {j.instance_count for j in processed}
                jobs.append(self._add(c, "skipped", f"{len(c.sop_instance_uids)} instances after processing "
                                                    f"started (versions {sorted(known)}): ignored by "
                                                    "late_instance_policy=ignore"))
                continue
            fresh.append(cand)
        outcome = select_series(fresh, self.rules)
        for cand, reason in outcome.rejected:
            log.info("%s not selected: %s", cand.describe(), reason)
            jobs.append(self._add(by_uid[cand.series_instance_uid], "skipped", f"selection: {reason}"))
        chosen = list(outcome.accepted)
        prefer_one = self.config.selection.prefer_one_reconstruction
        derived = any(not is_original(self.rules, c) for c in outcome.accepted)
        if (prefer_one or derived) and outcome.accepted:
            analysed = self._analysed_siblings(outcome.accepted[0].study_instance_uid, set(by_uid))
            ranked = select_series(list(outcome.accepted) + analysed, self.rules).accepted
            chosen = []
            best_per_group: dict[str, SeriesCandidate] = {}
            for cand in ranked:  # in order of preference
                group = str(cand.first.get("FrameOfReferenceUID", "") or cand.study_instance_uid)
                best = best_per_group.setdefault(group, cand)
                if cand.series_instance_uid not in by_uid:
                    continue  # analysed earlier
                # a derived axial reformat only when no original axial series of the study qualifies
                original = preferred_original(self.rules, cand, ranked)
                if original is None and (best is cand or not prefer_one):
                    chosen.append(cand)
                    continue
                done = "" if (original or best).series_instance_uid in by_uid else "already analysed "
                reason = (f"selection: an original axial series of the same study is preferred to this derived "
                          f"reformat ({done}{original.describe()})" if original is not None else
                          f"selection: another reconstruction of the same acquisition is preferred "
                          f"({done}{best.describe()})")
                log.info("%s not selected: %s", cand.describe(), reason)
                jobs.append(self._add(by_uid[cand.series_instance_uid], "skipped", reason))
        for cand in chosen:
            jobs.append(self._add(by_uid[cand.series_instance_uid], "queued", None))
        return [j for j in jobs if j is not None]

    def _analysed_siblings(self, study_uid: str, exclude: set[str]) -> list[SeriesCandidate]:
        """Series of the study analysed earlier (their latest active job), for the preference rule."""
        out: list[SeriesCandidate] = []
        for s in self.store.study_series(study_uid):
            if s.series_instance_uid in exclude:
                continue
            active = [j for j in self.store.jobs(series_instance_uid=s.series_instance_uid) if j.state in _ACTIVE]
            if not active:
                continue
            files = [f for f in active[0].files if f.exists()]
            out += [c for c in discover_series(files) if c.series_instance_uid == s.series_instance_uid]
        return out

    def _add(self, c: CompletedSeries, state: str, reason: str | None) -> Job:
        job, created = self.store.add_job(
            c.state.study_instance_uid, c.state.series_instance_uid, c.files, c.sop_instance_uids, self.model,
            state=state, reason=reason, last_instance_at=c.state.last_received,
        )
        if not created:
            log.info("series %s: the same %d instances were received again; version %d (job %d, %s) stands",
                     c.state.series_instance_uid, job.instance_count, job.version, job.id, job.state)
        elif state == "queued":
            log.info("series %s complete (%d instances): job %d version %d queued%s", c.state.series_instance_uid,
                     job.instance_count, job.id, job.version,
                     f", supersedes job {job.supersedes}" if job.supersedes else "")
        else:
            log.info("series %s: job %d %s: %s", c.state.series_instance_uid, job.id, state, reason)
        return job


def complete_now(config: Config, store: JobStore, series_uids: list[str]) -> list[Job]:
    """Complete named series immediately (no quiet time), e.g. after a WADO-RS pull."""
    states = [s for uid in series_uids if (s := store.series(uid)) is not None]
    by_study: dict[str, list[SeriesState]] = {}
    for s in states:
        by_study.setdefault(s.study_instance_uid, []).append(s)
    assembler = SeriesAssembler(config, store)
    jobs: list[Job] = []
    for group in by_study.values():
        for s in group:
            store.mark_series_complete(s.series_instance_uid, time.time() + 1)
        jobs += assembler.complete(group, force=False)
    return jobs
