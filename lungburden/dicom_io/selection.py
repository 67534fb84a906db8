"""Which series to analyse: documented selection rules, shared by the CLI, the node and the plugin.

Rules on the headers (:func:`check_selection`), in this order; the first that fails is the reason
a series is not analysed:

1. Modality is one of ``modalities`` (CT).
2. ImageType (PS3.3 C.7.6.1.1.2; for CT C.8.2.1.1.1) contains none of ``excluded_image_type``
   (LOCALIZER: scout/topogram).
3. The slices are axial: the normal of ImageOrientationPatient (PS3.3 C.7.6.2.1.1) is within
   about 25 degrees of head-feet. Coronal and sagittal reformats are not analysed.
4. ImageType contains every value of ``required_image_type`` (ORIGINAL). A series that lacks
   them but is DERIVED (Value 1) is still accepted, as a *derived axial reformat*, when
   ``accept_derived_axial`` holds and it is a reformat of HU slices: ImageType contains none of
   ``derived_excluded_image_type`` (MIP, MinIP: projections) and the slices are contiguous
   (spacing along the normal at most the slice thickness: no gaps). Typical accepted values:
   ``DERIVED\\SECONDARY\\AXIAL``, ``DERIVED\\SECONDARY\\REFORMATTED\\AVERAGE``,
   ``DERIVED\\PRIMARY\\AXIAL``, ``DERIVED\\SECONDARY\\MPR`` with axial orientation.
5. At least ``min_slices`` instances; SliceThickness within ``slice_thickness_mm``.
6. ConvolutionKernel and SeriesDescription match ``kernel_regex`` / ``description_regex`` when
   set; SeriesDescription does not match ``excluded_description_regex`` (scout, MIP, dose...).

BodyPartExamined (PS3.3 C.7.3.1) never refuses a series: it is optional and often names the
larger region (ABDOMEN for a chest-abdomen scan). Whether a series contains the lungs is decided
on the image content after loading (:mod:`lungburden.dicom_io.content`); the header only ranks
candidates and tells the content check whether lung bases alone are expected.

Preference among accepted series (:func:`select_series` orders them; the first is analysed):

1. an ORIGINAL series before a derived axial reformat: a derived series is analysed only when no
   ORIGINAL axial series qualifies (the CLI tries it after the original ones failed to load; the
   node and the plugin skip it when an original axial series of the same study is accepted, see
   :func:`preferred_original`, and analyse it otherwise);
2. a lung (sharp) kernel before others (``lung_kernel_regex``);
3. BodyPartExamined matching ``body_part_regex`` (chest) before an empty one before any other;
4. thinner slices, then more slices.

Among accepted reconstructions of one acquisition (same frame of reference, else same study) the
node analyses only the first (``prefer_one_reconstruction``). The loader's geometric rules
(:func:`lungburden.dicom_io.volume.check_series`) and the content check follow at load time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lungburden.dicom_io.series import SeriesCandidate, header_text

#: Lung (sharp) reconstruction kernels of the main vendors: GE LUNG/BONEPLUS, Siemens B/I/Br 50-89,
#: Philips L/YA-YD/E, Canon/Toshiba FC5x/FC8x, and any name containing "lung".
LUNG_KERNEL_REGEX = r"(?i)lung|^(L|LA|E|Y[A-D]|BONEPLUS|[BI]r?[5-8]\d[fs]?|Br[5-8]\d|FC[58]\d)$"
#: BodyPartExamined values (PS3.16 CID 4031 and vendor spellings) that name the chest.
CHEST_BODY_PART_REGEX = r"(?i)chest|thorax|lung|thx|torso|body|wholebody|trunk"
#: Largest deviation of |slice normal . head-feet| from 1 for an axial series (about 25 degrees).
AXIAL_TOLERANCE = 0.1


@dataclass(frozen=True)
class SelectionRules:
    """Rules a series must meet to be analysed (YAML ``selection:`` section; see the module docstring)."""

    modalities: tuple[str, ...] = ("CT",)
    #: Every value must appear in ImageType (PS3.3 C.7.6.1.1.2), except for derived axial reformats.
    required_image_type: tuple[str, ...] = ("ORIGINAL",)
    #: None of these may appear in ImageType.
    excluded_image_type: tuple[str, ...] = ("LOCALIZER",)
    min_slices: int = 16
    slice_thickness_mm: tuple[float, float] = (0.5, 10.0)
    kernel_regex: str | None = None
    description_regex: str | None = None
    excluded_description_regex: str | None = r"(?i)scout|topogram|localizer|surview|mip|dose"
    #: BodyPartExamined naming the chest; ranks candidates, never refuses one.
    body_part_regex: str | None = CHEST_BODY_PART_REGEX
    lung_kernel_regex: str = LUNG_KERNEL_REGEX
    #: Accept a DERIVED axial reformat lacking ``required_image_type`` when no original qualifies.
    accept_derived_axial: bool = True
    #: None of these may appear in the ImageType of a derived series (projections, not HU slices).
    derived_excluded_image_type: tuple[str, ...] = ("MIP", "MINIP", "MAXIMUM", "MINIMUM", "PROJECTION IMAGE")
    #: Allowed relative excess of the slice spacing over the slice thickness of a derived series.
    derived_gap_tolerance: float = 0.05


def image_type(candidate: SeriesCandidate) -> list[str]:
    """ImageType of the series' first instance, upper case."""
    return [str(v).strip().upper() for v in candidate.first.get("ImageType", []) or []]


def is_derived(candidate: SeriesCandidate) -> bool:
    """Value 1 of ImageType is DERIVED (PS3.3 C.7.6.1.1.2)."""
    values = image_type(candidate)
    return bool(values) and values[0] == "DERIVED"


def is_chest_body_part(body_part: str | None, regex: str | None = CHEST_BODY_PART_REGEX) -> bool | None:
    """``True``/``False`` whether BodyPartExamined names the chest; ``None`` when it is empty."""
    text = str(body_part or "").strip()
    if not text:
        return None
    return bool(regex and re.search(regex, text))


def _slice_normal(headers: Sequence) -> np.ndarray | None:
    try:
        iop = [float(v) for v in headers[0].ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(iop) != 6:
        return None
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 0 else None


def _axial_reason(candidate: SeriesCandidate) -> str | None:
    normal = _slice_normal(candidate.headers)
    if normal is None:
        return None  # the loader names the missing geometry
    if abs(abs(normal[2]) - 1.0) <= AXIAL_TOLERANCE:
        return None
    plane = "sagittal" if int(np.argmax(np.abs(normal))) == 0 else "coronal"
    if np.abs(normal).max() < 0.9:
        plane = "oblique"
    return f"not an axial series ({plane} slices: slice normal is not head-feet)"


def _gap_reason(rules: SelectionRules, candidate: SeriesCandidate) -> str | None:
    """Why a derived series is not a contiguous stack (gaps between slabs), else ``None``."""
    thickness = candidate.first.get("SliceThickness")
    normal = _slice_normal(candidate.headers)
    if thickness in (None, "") or normal is None or len(candidate.headers) < 2:
        return None
    try:
        along = np.sort([float(np.dot([float(v) for v in h.ImagePositionPatient], normal))
                         for h in candidate.headers])
    except (AttributeError, TypeError, ValueError):
        return None  # the loader names the missing geometry
    gaps = np.diff(along)
    gaps = gaps[gaps > 1e-3]
    if not len(gaps):
        return None
    spacing = float(np.median(gaps))
    if spacing > float(thickness) * (1.0 + rules.derived_gap_tolerance) + 0.01:
        return (f"not contiguous: {float(thickness):g} mm slices every {spacing:g} mm "
                "(gaps between the slices)")
    return None


def _derived_reason(rules: SelectionRules, candidate: SeriesCandidate, missing: list[str]) -> str | None:
    """Why a series lacking ``required_image_type`` is not accepted as a derived axial reformat."""
    values = image_type(candidate)
    lacks = f"ImageType {header_text(candidate.first.get('ImageType'))} lacks {', '.join(missing)}"
    if not rules.accept_derived_axial or not is_derived(candidate):
        return lacks
    projections = [v for v in rules.derived_excluded_image_type if v.upper() in values]
    if projections:
        return f"{lacks}; a derived {', '.join(projections)} series is a projection, not analysed"
    gap = _gap_reason(rules, candidate)
    if gap:
        return f"{lacks}; a derived axial reformat is analysed only when contiguous, this one is {gap}"
    return None


def check_selection(rules: SelectionRules, candidate: SeriesCandidate) -> str | None:
    """``None`` if the series meets the rules, else the reason it does not."""
    h = candidate.first
    modality = str(h.get("Modality", ""))
    if modality not in rules.modalities:
        return f"modality {modality or '?'} is not one of {', '.join(rules.modalities)}"
    values = set(image_type(candidate))
    excluded = [v for v in rules.excluded_image_type if v.upper() in values]
    if excluded:
        return f"ImageType contains {', '.join(excluded)}"
    axial = _axial_reason(candidate)
    if axial:
        return axial
    missing = [v for v in rules.required_image_type if v.upper() not in values]
    if missing:
        reason = _derived_reason(rules, candidate, missing)
        if reason:
            return reason
    if len(candidate.files) < rules.min_slices:
        return f"{len(candidate.files)} instances, fewer than the minimum of {rules.min_slices}"
    thickness = h.get("SliceThickness")
    if thickness not in (None, ""):
        low, high = rules.slice_thickness_mm
        if not low <= float(thickness) <= high:
            return f"slice thickness {float(thickness)} mm outside [{low}, {high}] mm"
    kernel = header_text(h.get("ConvolutionKernel"))
    if rules.kernel_regex and not re.search(rules.kernel_regex, kernel):
        return f"convolution kernel {kernel!r} does not match {rules.kernel_regex!r}"
    description = str(h.get("SeriesDescription", ""))
    if rules.description_regex and not re.search(rules.description_regex, description):
        return f"series description {description!r} does not match {rules.description_regex!r}"
    if rules.excluded_description_regex and re.search(rules.excluded_description_regex, description):
        return f"series description {description!r} matches the exclusion {rules.excluded_description_regex!r}"
    return None


def is_lung_kernel(rules: SelectionRules, candidate: SeriesCandidate) -> bool:
    return re.search(rules.lung_kernel_regex, header_text(candidate.first.get("ConvolutionKernel")).strip()) is not None


def is_original(rules: SelectionRules, candidate: SeriesCandidate) -> bool:
    """Has every value of ``required_image_type`` (an accepted series without them is a derived reformat)."""
    values = set(image_type(candidate))
    return all(v.upper() in values for v in rules.required_image_type) and not is_derived(candidate)


def _preference(rules: SelectionRules, candidate: SeriesCandidate) -> tuple:
    thickness = candidate.first.get("SliceThickness")
    chest = is_chest_body_part(candidate.first.get("BodyPartExamined"), rules.body_part_regex)
    return (
        not is_original(rules, candidate),
        not is_lung_kernel(rules, candidate),
        {True: 0, None: 1, False: 2}[chest],
        float(thickness) if thickness not in (None, "") else 99.0,
        -len(candidate.files),
        candidate.series_instance_uid,
    )


@dataclass(frozen=True)
class SelectionOutcome:
    """The accepted series in order of preference, and the rejected ones with their reasons."""

    accepted: list[SeriesCandidate]
    rejected: list[tuple[SeriesCandidate, str]]

    @property
    def best(self) -> SeriesCandidate | None:
        return self.accepted[0] if self.accepted else None


def select_series(candidates: list[SeriesCandidate], rules: SelectionRules = SelectionRules()) -> SelectionOutcome:
    """Apply :func:`check_selection` to each candidate and order the accepted ones by preference."""
    accepted, rejected = [], []
    for candidate in candidates:
        reason = check_selection(rules, candidate)
        if reason is None:
            accepted.append(candidate)
        else:
            rejected.append((candidate, reason))
    accepted.sort(key=lambda c: _preference(rules, c))
    return SelectionOutcome(accepted, rejected)


def preferred_original(
    rules: SelectionRules, candidate: SeriesCandidate, accepted: Sequence[SeriesCandidate]
) -> SeriesCandidate | None:
    """For an accepted derived reformat: the preferred accepted original series of the same study
    in ``accepted`` (in order of preference), which is analysed instead; else ``None``."""
    if is_original(rules, candidate):
        return None
    for other in accepted:
        if other.study_instance_uid == candidate.study_instance_uid and is_original(rules, other):
            return other
    return None
