"""Find the patient's prior chest CTs in a PACS and get their numbers (DICOMweb or DIMSE).

For the study just analysed:

1. **Who**: the current series' Patient ID (0010,0020), Issuer of Patient ID (0010,0021) and
   Patient's Birth Date. Without a Patient ID, or with one that holds wildcard characters
   (ambiguous in QIDO-RS and C-FIND matching), no search is made and the reason is recorded.
2. **Search** (QIDO-RS, PS3.18 10.6, or Study Root C-FIND, PS3.4 C.4.1): studies with that exact
   Patient ID, ModalitiesInStudy CT, StudyDate within ``lookback_days`` before the current
   study; the current study and studies not strictly earlier (date and time) are left out. Each
   candidate must carry the same Patient ID; the same Issuer of Patient ID when either study
   has one (a prior without an issuer while the current study has one, or the reverse, is
   ambiguous and skipped); and the same birth date where both have one. The most recent
   ``max_priors`` are used.
3. **Numbers**: a lungburden SR in the prior study whose device observer is the current
   algorithm name and version (:func:`lungburden.results.sr_read.read_sr_numbers`), retrieved
   by WADO-RS or C-GET; its patient identifiers are checked again. Otherwise the prior's CT
   series is chosen with the node's selection rules, retrieved, analysed by the one pipeline
   with the node's deterministic UIDs and its results stored back (STOW-RS or C-STORE), so the
   next study of the patient reads its SR instead (:mod:`lungburden.followup.sources`,
   :mod:`lungburden.followup.dimse`). A prior is analysed without priors of its own, and each
   prior study at most once per search.

The node, ``pull`` and the Orthanc plugin build the finder from their configuration
(:func:`node_priors`), ``lungburden analyze --priors-from`` from its options (the same
function), and archive mode from its task (:func:`task_priors`, DICOMweb).

Nothing of the patient is logged: UIDs and counts only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import date, timedelta

from pydicom.dataset import Dataset

from lungburden.archive.tasks import SeriesTask
from lungburden.config.schema import FollowupConfig, SelectionConfig
from lungburden.dicom_io.volume import CTVolume
from lungburden.followup.dimse import DimsePriors
from lungburden.followup.sources import DicomwebPriors, PriorSource, PriorUnavailable, text_of
from lungburden.followup.trend import FROM_ANALYSIS, FROM_SR, FollowUp, PriorResult, parse_da
from lungburden.results.sr_read import read_sr_numbers
from lungburden.segmentation.base import AlgorithmInfo

log = logging.getLogger(__name__)

_WILDCARDS = ("*", "?", "\\")


@dataclass(frozen=True)
class PatientKey:
    """The identifiers that decide whether two studies belong to the same patient."""

    patient_id: str
    issuer: str
    birth_date: str

    @classmethod
    def of(cls, ds: Dataset) -> PatientKey:
        def text(keyword: str) -> str:
            value = ds.get(keyword)
            return "" if value is None else str(value).strip()

        return cls(text("PatientID"), text("IssuerOfPatientID"), text("PatientBirthDate"))

    def problem(self) -> str | None:
        """Why these identifiers cannot be used to search (None: they can)."""
        if not self.patient_id:
            return "the current study has no Patient ID: priors not searched"
        if any(c in self.patient_id for c in _WILDCARDS):
            return "the Patient ID holds wildcard characters (ambiguous in a search): priors not searched"
        return None

    def mismatch(self, other: PatientKey) -> str | None:
        """Why ``other`` is not (certainly) the same patient; None when it is."""
        if other.patient_id != self.patient_id:
            return "another Patient ID"
        if self.issuer != other.issuer:
            if not self.issuer or not other.issuer:
                return "Issuer of Patient ID present on one study only (ambiguous)"
            return "another Issuer of Patient ID"
        if self.birth_date and other.birth_date and self.birth_date != other.birth_date:
            return "same Patient ID with another birth date (ambiguous)"
        return None


@dataclass
class PriorStats:
    """What one search cost (seconds) and did; for result.json timings and the tests."""

    search_s: float = 0.0
    from_sr: int = 0
    analysed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)



class PriorFinder:
    """The priors of a series (:data:`lungburden.pipeline.PriorsFn`) from the PACS of ``config``."""

    def __init__(self, config: FollowupConfig, selection: SelectionConfig | None = None,
                 model: str | None = None, weights: str | None = None, calling_ae_title: str = "LUNGBURDEN"):
        self.config = config
        #: Our AE title towards a DIMSE source without a ``calling_ae_title`` of its own.
        self.calling_ae_title = calling_ae_title
        self.selection = selection or SelectionConfig()
        self.model = model
        self.weights = weights
        self.last = PriorStats()

    def source(self) -> PriorSource:
        """The PACS of the configuration: DICOMweb at ``url`` or a DICOM peer at ``dimse``."""
        if self.config.dimse is not None:
            return DimsePriors(self.config, self.selection, self.model, self.weights, self.calling_ae_title)
        return DicomwebPriors(self.config, self.selection, self.model, self.weights)

    def __call__(self, volume: CTVolume, algorithm: AlgorithmInfo) -> FollowUp:
        header = volume.datasets[0]
        study_date = text_of(header, "StudyDate")
        self.last = PriorStats()
        key = PatientKey.of(header)
        problem = key.problem()
        if problem is None and not study_date:
            problem = "the current study has no Study Date: priors not searched"
        if problem is not None:
            log.info("study %s: %s", volume.study_instance_uid, problem)
            return FollowUp(study_date, note=problem)
        try:
            return self._find(volume, algorithm, key, study_date)
        except Exception as exc:  # noqa: BLE001 - the current result is delivered without priors
            log.warning("study %s: priors not available (%s)", volume.study_instance_uid, type(exc).__name__)
            return FollowUp(study_date, note=f"priors not available: {type(exc).__name__}: {exc}"[:300])

    def _candidates(self, source: PriorSource, volume: CTVolume, key: PatientKey, study_date: str
                    ) -> tuple[list[Dataset], list[str], str | None]:
        """Earlier studies of the patient (most recent first), skipped ones with reasons, or a refusal."""
        current = parse_da(study_date)
        found = source.find_studies(key.patient_id, current - timedelta(days=self.config.lookback_days), current)
        current_time = text_of(volume.datasets[0], "StudyTime")
        studies, skipped, seen = [], [], {volume.study_instance_uid}
        for ds in found:
            uid = text_of(ds, "StudyInstanceUID")
            if uid in seen:
                continue
            seen.add(uid)
            when = (text_of(ds, "StudyDate"), text_of(ds, "StudyTime"))
            if not when[0] or when >= (study_date, current_time):
                continue
            reason = key.mismatch(PatientKey.of(ds))
            if reason == "another Patient ID":
                continue  # the search matched loosely; not this patient
            if reason is not None:
                if "ambiguous" in reason and "birth date" in reason:
                    return [], [], f"prior study {uid}: {reason}: priors not used"
                skipped.append(f"{uid}: {reason}")
                continue
            studies.append(ds)
        studies.sort(key=lambda d: (text_of(d, "StudyDate"), text_of(d, "StudyTime")), reverse=True)
        return studies[: self.config.max_priors], skipped, None

    def _find(self, volume: CTVolume, algorithm: AlgorithmInfo, key: PatientKey, study_date: str) -> FollowUp:
        source = self.source()
        try:
            return self._search(source, volume, algorithm, key, study_date)
        finally:
            source.close()

    def _search(self, source: PriorSource, volume: CTVolume, algorithm: AlgorithmInfo, key: PatientKey,
                study_date: str) -> FollowUp:
        start = time.perf_counter()
        studies, skipped, refusal = self._candidates(source, volume, key, study_date)
        self.last.search_s = time.perf_counter() - start
        if refusal is not None:
            log.info("study %s: %s", volume.study_instance_uid, refusal)
            return FollowUp(study_date, note=refusal)
        current = parse_da(study_date)
        priors: list[PriorResult] = []
        for ds in studies:
            uid = text_of(ds, "StudyInstanceUID")
            began = time.perf_counter()
            try:
                prior = (self._from_sr(source, uid, key, algorithm, current)
                         or self._analyse(source, uid, text_of(ds, "StudyDate"), current))
            except PriorUnavailable as exc:
                skipped.append(f"{uid}: {exc}")
                continue
            self.last.seconds[uid] = time.perf_counter() - began
            if prior is None:
                skipped.append(f"{uid}: no analysable chest CT series")
                continue
            priors.append(prior)
        log.info("study %s: %d priors (%d from SR, %d analysed), %d skipped", volume.study_instance_uid,
                 len(priors), self.last.from_sr, self.last.analysed, len(skipped))
        note = None if priors else "no prior chest CT of this patient in the look-back window"
        return FollowUp(study_date, tuple(priors), note, tuple(skipped))

    def _from_sr(self, source: PriorSource, study_uid: str, key: PatientKey, algorithm: AlgorithmInfo,
                 current: date) -> PriorResult | None:
        """The prior's numbers from a lungburden SR of the same algorithm version, if there is one."""
        wanted = f"{algorithm.name} {algorithm.version}"
        for sr in source.sr_instances(study_uid):
            numbers = read_sr_numbers(sr)
            if numbers is None or numbers.device_model_name != wanted:
                continue
            reason = key.mismatch(PatientKey.of(sr))
            if reason is not None:
                raise PriorUnavailable(f"its lungburden SR names {reason}")
            self.last.from_sr += 1
            return self._prior(study_uid, numbers.source_series_instance_uid or "", text_of(sr, "StudyDate"),
                               current, numbers.values, FROM_SR, text_of(sr, "SOPInstanceUID"))
        return None

    def _analyse(self, source: PriorSource, study_uid: str, study_date: str, current: date) -> PriorResult | None:
        """Choose, retrieve, analyse and store the prior's CT series (archive mode's unit of work)."""
        analysed = source.analyse(study_uid)
        if analysed is None:
            return None
        self.last.analysed += 1
        return self._prior(study_uid, analysed.series_instance_uid, study_date, current, analysed.result,
                           FROM_ANALYSIS, analysed.sr_sop_instance_uid)

    @staticmethod
    def _prior(study_uid: str, series_uid: str, study_date: str, current: date, values: dict, source: str,
               sr_uid: str | None) -> PriorResult:
        def value(name: str) -> float:
            return round(float(values.get(name, 0.0)), 3)

        return PriorResult(
            study_instance_uid=study_uid, series_instance_uid=series_uid, study_date=study_date,
            days_before=(current - parse_da(study_date)).days,
            lung_volume_ml=value("lung_volume_ml"), ggo_volume_ml=value("ggo_volume_ml"),
            high_opacity_volume_ml=value("high_opacity_volume_ml"), opacity_volume_ml=value("opacity_volume_ml"),
            burden_percent=value("burden_percent"), ggo_percent=value("ggo_percent"),
            high_opacity_percent=value("high_opacity_percent"), source=source, sr_sop_instance_uid=sr_uid,
        )


def node_priors(config, model: str | None = None) -> PriorFinder | None:
    """The prior finder of a node/plugin configuration (:class:`~lungburden.config.schema.Config`),
    or None when ``followup.enabled`` is off."""
    if not config.followup.enabled:
        return None
    weights = str(config.processing.weights) if config.processing.weights else None
    return PriorFinder(config.followup, config.selection, model or config.processing.model, weights,
                       config.node.ae_title)


def task_priors(task: SeriesTask, username: str | None = None, password: str | None = None) -> PriorFinder | None:
    """The prior finder an archive task asks for (None without ``task.priors_url``): its source,
    look-back, number and storing, the task's model, weights, timeout and minimum slices."""
    if not task.priors_url:
        return None
    followup = FollowupConfig(enabled=True, url=task.priors_url, username=username, password=password,
                              lookback_days=task.lookback_days, max_priors=task.max_priors,
                              store_results=task.store_priors, timeout_seconds=task.timeout_s)
    return PriorFinder(followup, SelectionConfig(min_slices=task.min_slices), task.model, task.weights)
