"""Enumerate an archive by QIDO-RS (PS3.18 10.6) and choose its series with the node's selection rules.

Studies are searched with StudyDate range matching and ModalitiesInStudy (PS3.4 C.2.2.2), or
taken from a list of Study Instance UIDs; the study and series description filters are regular
expressions applied here (QIDO-RS only matches wildcards). Within a study, the series of the
searched modality are first checked on their QIDO attributes (modality, description, number of
instances), then on their metadata (WADO-RS, PS3.18 10.4.1.1.2: every instance's header without
pixels) with :func:`lungburden.dicom_io.selection.select_series`, exactly as the node selects
received series: the preferred reconstruction per frame of reference, an original axial series
before a derived reformat. Nothing here reads pixels, and nothing is logged but UIDs.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests
from pydicom.dataset import Dataset

from lungburden.dicom_io.selection import SelectionRules, preferred_original, select_series
from lungburden.dicom_io.series import SeriesCandidate, header_text

log = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses worth another try (the server is busy or briefly unavailable).
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """True for a network error, a timeout or an HTTP status that a later try may not repeat."""
    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and exc.response.status_code in TRANSIENT_HTTP
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def with_retries(call: Callable[[], T], what: str, attempts: int = 4, backoff_s: float = 1.0) -> T:
    """``call()``, tried again after ``backoff_s``, 2x, 4x ... seconds while it fails transiently."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s), attempt %d of %d; again in %.0f s", what, type(exc).__name__, attempt,
                        attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ArchiveQuery:
    """Which studies and series of the archive to consider (``lungburden batch`` options)."""

    #: StudyDate range, YYYYMMDD, inclusive; either end may be open.
    study_date_from: str | None = None
    study_date_to: str | None = None
    modality: str = "CT"
    study_description_regex: str | None = None
    series_description_regex: str | None = None
    #: Only these studies (from a file), instead of a search.
    study_uids: tuple[str, ...] = ()
    #: QIDO-RS page size (``limit``/``offset`` paging, PS3.18 8.3.4.4).
    page_size: int = 500

    def date_range(self) -> str | None:
        """The StudyDate range matching value (PS3.4 C.2.2.2.5), e.g. ``20200101-20201231``."""
        if not self.study_date_from and not self.study_date_to:
            return None
        return f"{self.study_date_from or ''}-{self.study_date_to or ''}"


@dataclass(frozen=True)
class SeriesEntry:
    """One series considered: its technical attributes and whether it is selected (or why not)."""

    study_instance_uid: str
    series_instance_uid: str
    acquisition_date: str = ""
    kernel: str = ""
    slice_thickness_mm: float | None = None
    instances: int = 0
    sop_instance_uids: tuple[str, ...] = ()
    selected: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class StudyListing:
    """The considered series of one study and the UIDs of every series the archive holds for it."""

    study_instance_uid: str
    entries: list[SeriesEntry] = field(default_factory=list)
    series_in_archive: frozenset[str] = frozenset()


def read_study_list(path: Path) -> tuple[str, ...]:
    """Study Instance UIDs from a text file: one a line (CSV: the first column); ``#`` comments."""
    uids: list[str] = []
    for line in Path(path).read_text().splitlines():
        value = line.split("#", 1)[0].split(",", 1)[0].strip().strip('"')
        if value and re.fullmatch(r"[0-9.]{1,64}", value):
            uids.append(value)
        elif value and value.lower() not in ("studyinstanceuid", "study_instance_uid"):
            raise ValueError(f"{path}: {value[:70]!r} is not a Study Instance UID")
    return tuple(dict.fromkeys(uids))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else header_text(value)


def _paged(search: Callable[[int, int], list[dict]], page_size: int) -> Iterator[Dataset]:
    offset = 0
    while True:
        page = search(offset, page_size)
        for item in page:
            yield Dataset.from_json(item)
        if len(page) < page_size:
            return
        offset += len(page)


def search_studies(client, query: ArchiveQuery, fields: tuple[str, ...] = ()) -> Iterator[Dataset]:
    """The studies matching ``query`` (QIDO-RS ``/studies``, paged), in the archive's order: each
    its QIDO-RS attributes (Study Instance UID, Study Date, description, modalities, ``fields``)."""
    description = re.compile(query.study_description_regex) if query.study_description_regex else None
    fields = ("StudyDescription", "StudyDate", "ModalitiesInStudy", *fields)
    if query.study_uids:
        for uid in query.study_uids:
            found = with_retries(lambda uid=uid: client.search_for_studies(
                search_filters={"StudyInstanceUID": uid}, fields=list(fields)), f"QIDO-RS study {uid}")
            if not found:
                log.warning("study %s: not found in the archive", uid)
                continue
            ds = Dataset.from_json(found[0])
            if description is None or description.search(_text(ds, "StudyDescription")):
                ds.StudyInstanceUID = uid
                yield ds
        return
    filters: dict[str, str] = {}
    if query.modality:
        filters["ModalitiesInStudy"] = query.modality
    if query.date_range():
        filters["StudyDate"] = query.date_range() or ""

    def page(offset: int, limit: int) -> list[dict]:
        return with_retries(lambda: client.search_for_studies(search_filters=filters, fields=list(fields),
                                                              offset=offset, limit=limit), "QIDO-RS studies")

    for ds in _paged(page, query.page_size):
        if description is not None and not description.search(_text(ds, "StudyDescription")):
            continue
        yield ds


def _metadata_candidate(client, study_uid: str, series_uid: str) -> SeriesCandidate:
    """The series' headers from WADO-RS metadata (bulk data left out) as a selection candidate.

    The candidate's ``files`` name the instances (SOP Instance UIDs); nothing is on disk."""
    items = with_retries(lambda: client.retrieve_series_metadata(study_uid, series_uid),
                         f"WADO-RS metadata of series {series_uid}")
    headers = [Dataset.from_json({tag: value for tag, value in item.items() if "BulkDataURI" not in value})
               for item in items]
    headers.sort(key=lambda h: int(h.get("InstanceNumber", 0) or 0))
    return SeriesCandidate(series_uid, study_uid, [Path(str(h.get("SOPInstanceUID", ""))) for h in headers], headers)


def _entry(candidate: SeriesCandidate, selected: bool, reason: str | None) -> SeriesEntry:
    h = candidate.first
    thickness = h.get("SliceThickness")
    date = _text(h, "AcquisitionDate") or _text(h, "SeriesDate") or _text(h, "StudyDate")
    return SeriesEntry(
        candidate.study_instance_uid, candidate.series_instance_uid, acquisition_date=date,
        kernel=_text(h, "ConvolutionKernel"),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        instances=len(candidate.headers),
        sop_instance_uids=tuple(str(h.SOPInstanceUID) for h in candidate.headers if "SOPInstanceUID" in h),
        selected=selected, reason=reason,
    )


def choose_series(candidates: list[SeriesCandidate], rules: SelectionRules,
                  prefer_one_reconstruction: bool = True) -> list[tuple[SeriesCandidate, str | None]]:
    """Each candidate with ``None`` (analyse it) or the reason it is not analysed.

    The node's rules: :func:`select_series`, then per frame of reference only the preferred
    accepted series (``prefer_one_reconstruction``), and a derived axial reformat only when no
    original axial series of the study is accepted (:func:`preferred_original`)."""
    outcome = select_series(candidates, rules)
    out: list[tuple[SeriesCandidate, str | None]] = [(c, f"selection: {r}") for c, r in outcome.rejected]
    best_per_group: dict[str, SeriesCandidate] = {}
    for cand in outcome.accepted:  # in order of preference
        group = str(cand.first.get("FrameOfReferenceUID", "") or cand.study_instance_uid)
        best = best_per_group.setdefault(group, cand)
        original = preferred_original(rules, cand, outcome.accepted)
        if original is not None:
            out.append((cand, "selection: an original axial series of the same study is preferred to this "
                              f"derived reformat (series {original.series_instance_uid})"))
        elif best is not cand and prefer_one_reconstruction:
            out.append((cand, "selection: another reconstruction of the same acquisition is preferred "
                              f"(series {best.series_instance_uid})"))
        else:
            out.append((cand, None))
    return out


def list_study(client, study_uid: str, query: ArchiveQuery, rules: SelectionRules,
               prefer_one_reconstruction: bool = True) -> StudyListing:
    """QIDO-RS ``/studies/{uid}/series``, then metadata of the remaining series, then the selection."""
    found = with_retries(lambda: client.search_for_series(study_uid, fields=[
        "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances", "SeriesDate"]),
        f"QIDO-RS series of study {study_uid}")
    series = [Dataset.from_json(item) for item in found]
    in_archive = frozenset(str(ds.SeriesInstanceUID) for ds in series if "SeriesInstanceUID" in ds)
    description = re.compile(query.series_description_regex) if query.series_description_regex else None
    entries: list[SeriesEntry] = []
    candidates: list[SeriesCandidate] = []
    for ds in series:
        if query.modality and _text(ds, "Modality") != query.modality:
            continue  # other modalities (the results among them) are not considered
        uid = str(ds.SeriesInstanceUID)
        count = int(ds.get("NumberOfSeriesRelatedInstances", 0) or 0)
        reason = None
        if description is not None and not description.search(_text(ds, "SeriesDescription")):
            reason = f"series description does not match {query.series_description_regex!r}"
        elif count and count < rules.min_slices:
            reason = f"selection: {count} instances, fewer than the minimum of {rules.min_slices}"
        if reason is not None:
            entries.append(SeriesEntry(study_uid, uid, acquisition_date=_text(ds, "SeriesDate"), instances=count,
                                       reason=reason))
            continue
        candidate = _metadata_candidate(client, study_uid, uid)
        if not candidate.headers:
            entries.append(SeriesEntry(study_uid, uid, reason="no instance metadata from WADO-RS"))
            continue
        candidates.append(candidate)
    for candidate, reason in choose_series(candidates, rules, prefer_one_reconstruction):
        entries.append(_entry(candidate, reason is None, reason))
    return StudyListing(study_uid, entries, in_archive)
