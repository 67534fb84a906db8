"""Which series to analyse: documented selection rules, shared by the CLI, the node and the plugin.

A series is analysable when it is an ORIGINAL axial CT with enough slices of a usable thickness
(:func:`check_selection`). When several accepted series are reconstructions of one acquisition
(same study and frame of reference), :func:`select_series` prefers a lung kernel, then thinner
slices, then more slices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lungburden.dicom_io.series import SeriesCandidate, _text

#: Lung (sharp) reconstruction kernels of the main vendors: GE LUNG/BONEPLUS, Siemens B/I/Br 50-89,
#: Philips L/YA-YD/E, Canon/Toshiba FC5x/FC8x, and any name containing "lung".
LUNG_KERNEL_REGEX = r"(?i)lung|^(L|LA|E|Y[A-D]|BONEPLUS|[BI]r?[5-8]\d[fs]?|Br[5-8]\d|FC[58]\d)$"


@dataclass(frozen=True)
class SelectionRules:
    """Rules a series must meet to be analysed (YAML ``selection:`` section)."""

    modalities: tuple[str, ...] = ("CT",)
    #: Every value must appear in ImageType (PS3.3 C.7.6.1.1.2).
    required_image_type: tuple[str, ...] = ("ORIGINAL",)
    #: None of these may appear in ImageType.
    excluded_image_type: tuple[str, ...] = ("LOCALIZER",)
    min_slices: int = 16
    slice_thickness_mm: tuple[float, float] = (0.5, 10.0)
    kernel_regex: str | None = None
    description_regex: str | None = None
    excluded_description_regex: str | None = r"(?i)scout|topogram|localizer|surview|mip|dose"
    #: Applied only when BodyPartExamined is present.
    body_part_regex: str | None = r"(?i)chest|thorax|lung|thx|torso|body|wholebody|trunk"
    lung_kernel_regex: str = LUNG_KERNEL_REGEX


def check_selection(rules: SelectionRules, candidate: SeriesCandidate) -> str | None:
    """``None`` if the series meets the rules, else the reason it does not."""
    h = candidate.first
    modality = str(h.get("Modality", ""))
    if modality not in rules.modalities:
        return f"modality {modality or '?'} is not one of {', '.join(rules.modalities)}"
    image_type = {str(v).upper() for v in h.get("ImageType", [])}
    missing = [v for v in rules.required_image_type if v.upper() not in image_type]
    if missing:
        return f"ImageType {_text(h.get('ImageType'))} lacks {', '.join(missing)}"
    excluded = [v for v in rules.excluded_image_type if v.upper() in image_type]
    if excluded:
        return f"ImageType contains {', '.join(excluded)}"
    if len(candidate.files) < rules.min_slices:
        return f"{len(candidate.files)} instances, fewer than the minimum of {rules.min_slices}"
    thickness = h.get("SliceThickness")
    if thickness not in (None, ""):
        low, high = rules.slice_thickness_mm
        if not low <= float(thickness) <= high:
            return f"slice thickness {float(thickness)} mm outside [{low}, {high}] mm"
    kernel = _text(h.get("ConvolutionKernel"))
    if rules.kernel_regex and not re.search(rules.kernel_regex, kernel):
        return f"convolution kernel {kernel!r} does not match {rules.kernel_regex!r}"
    description = str(h.get("SeriesDescription", ""))
    if rules.description_regex and not re.search(rules.description_regex, description):
        return f"series description {description!r} does not match {rules.description_regex!r}"
    if rules.excluded_description_regex and re.search(rules.excluded_description_regex, description):
        return f"series description {description!r} matches the exclusion {rules.excluded_description_regex!r}"
    body_part = str(h.get("BodyPartExamined", "") or "")
    if body_part and rules.body_part_regex and not re.search(rules.body_part_regex, body_part):
        return f"body part {body_part!r} does not match {rules.body_part_regex!r}"
    return None


def is_lung_kernel(rules: SelectionRules, candidate: SeriesCandidate) -> bool:
    return re.search(rules.lung_kernel_regex, _text(candidate.first.get("ConvolutionKernel")).strip()) is not None


def _preference(rules: SelectionRules, candidate: SeriesCandidate) -> tuple:
    thickness = candidate.first.get("SliceThickness")
    return (
        not is_lung_kernel(rules, candidate),
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
