"""Where the priors are: the PACS searched, read and written by DICOMweb (PS3.18).

A :class:`PriorSource` answers the three questions of :class:`~lungburden.followup.priors.PriorFinder`:
which earlier CT studies has this Patient ID (:meth:`~PriorSource.find_studies`), which SR
instances does a study hold (:meth:`~PriorSource.sr_instances`), and what are the numbers of a
study analysed now (:meth:`~PriorSource.analyse`: choose the CT series with the node's rules,
retrieve, run the one pipeline, store the results back). :class:`DicomwebPriors` does it with
QIDO-RS, WADO-RS and STOW-RS; :class:`lungburden.followup.dimse.DimsePriors` with C-FIND, C-GET and
C-STORE. Identifiers come back as pydicom datasets either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Protocol

from pydicom.dataset import Dataset

from lungburden.archive.search import ArchiveQuery, list_study
from lungburden.archive.tasks import SeriesTask, analyse_series
from lungburden.config.schema import FollowupConfig, SelectionConfig
from lungburden.jobs.exporters import dicomweb_client

#: The study-level attributes a search returns for the patient checks and the ordering.
STUDY_KEYS = ("PatientID", "IssuerOfPatientID", "PatientBirthDate", "StudyDate", "StudyTime")


class PriorUnavailable(Exception):
    """This prior study cannot be used (the message says why)."""


@dataclass(frozen=True)
class AnalysedPrior:
    """The numbers of a prior analysed now: its CT series, result.json and the SR made of it."""

    series_instance_uid: str
    result: dict
    sr_sop_instance_uid: str | None


class PriorSource(Protocol):
    """A PACS that holds priors (module docstring)."""

    def find_studies(self, patient_id: str, start: date, end: date) -> list[Dataset]:
        """CT studies with exactly this Patient ID dated ``start``..``end`` (:data:`STUDY_KEYS` and
        StudyInstanceUID filled)."""
        ...

    def sr_instances(self, study_uid: str) -> Iterator[Dataset]:
        """Every SR instance of the study, whole."""
        ...

    def analyse(self, study_uid: str) -> AnalysedPrior | None:
        """Choose, retrieve, analyse (and store) the study's CT series; None when none is
        analysable; :class:`PriorUnavailable` when the analysis fails."""
        ...

    def close(self) -> None:
        """End the connections of this search."""
        ...


def text_of(ds: Dataset, keyword: str) -> str:
    """An attribute as stripped text ("" when absent): the identifiers compared and logged."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


class DicomwebPriors:
    """:class:`PriorSource` over DICOMweb at ``config.url``."""

    def __init__(self, config: FollowupConfig, selection: SelectionConfig, model: str | None,
                 weights: str | None):
        self.config, self.selection, self.model, self.weights = config, selection, model, weights
        self.client = dicomweb_client(str(config.url), config.username, config.password,
                                      timeout=config.timeout_seconds)

    def close(self) -> None:
        """Nothing to end: each DICOMweb request is its own."""

    def find_studies(self, patient_id: str, start: date, end: date) -> list[Dataset]:
        """QIDO-RS ``/studies`` (PS3.18 10.6)."""
        found = self.client.search_for_studies(search_filters={
            "PatientID": patient_id, "ModalitiesInStudy": "CT", "StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}",
        }, fields=list(STUDY_KEYS))
        return [Dataset.from_json(item) for item in found]

    def sr_instances(self, study_uid: str) -> Iterator[Dataset]:
        """QIDO-RS of the study's SR series and their instances, WADO-RS of each."""
        for series in self.client.search_for_series(study_uid, search_filters={"Modality": "SR"}):
            series_uid = text_of(Dataset.from_json(series), "SeriesInstanceUID")
            for inst in self.client.search_for_instances(study_uid, series_uid):
                sop_uid = text_of(Dataset.from_json(inst), "SOPInstanceUID")
                yield self.client.retrieve_instance(study_uid, series_uid, sop_uid)

    def analyse(self, study_uid: str) -> AnalysedPrior | None:
        """The node's series choice on WADO-RS metadata, then archive mode's unit of work
        (:func:`lungburden.archive.tasks.analyse_series`: WADO-RS, the one pipeline, STOW-RS)."""
        rules = self.selection.to_rules()
        listing = list_study(self.client, study_uid, ArchiveQuery(modality="CT"), rules,
                             self.selection.prefer_one_reconstruction)
        chosen = [e for e in listing.entries if e.selected]
        if not chosen:
            return None
        entry = chosen[0]
        task = SeriesTask(url=str(self.config.url), study_instance_uid=study_uid,
                          series_instance_uid=entry.series_instance_uid, model=self.model, weights=self.weights,
                          outputs=("seg", "sr"), store=self.config.store_results, min_slices=rules.min_slices,
                          timeout_s=self.config.timeout_seconds)
        outcome = analyse_series(task, self.config.username, self.config.password)
        if outcome.status != "done" or outcome.result is None:
            raise PriorUnavailable(f"analysis of series {entry.series_instance_uid} failed: {outcome.reason}")
        return AnalysedPrior(entry.series_instance_uid, outcome.result, outcome.result.get("sr_sop_instance_uid"))
