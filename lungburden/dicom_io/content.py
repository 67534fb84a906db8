"""Does a loaded series contain the lungs? A cheap check of the image content, not of the headers.

Headers mislead: BodyPartExamined (PS3.3 C.7.3.1) is optional, protocol-dependent and often
names the larger region (ABDOMEN for a chest-abdomen scan). After loading, :func:`find_lungs`
looks for the lungs on a grid of about 4 mm in-plane (every slice):

- the body is the largest soft-tissue region (> -400 HU) of each slice, with its holes filled;
- lung air is air-attenuation (< -400 HU) inside that outline, split at the body's midline into
  the patient's right and left (LPS x of the image geometry, PS3.3 C.7.6.2.1.1);
- a side has a lung when its air covers at least :attr:`LungCriteria.min_area_cm2` per slice
  over at least :attr:`LungCriteria.min_extent_mm` and adds up to
  :attr:`LungCriteria.min_volume_ml` (bowel gas, airways and the table do not).

:func:`check_lungs` rejects a series with lungs on neither side ("contains no lungs"), whatever
its header says, and one whose BodyPartExamined names another region (e.g. ABDOMEN) when its
most superior slice still cuts the lungs near their widest cross-section (lung bases only).
A series with both lungs is analysed whatever its header says; notes (for result.json) record a
lung found on one side only and lungs that continue above the scan range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from lungburden.dicom_io.selection import CHEST_BODY_PART_REGEX, is_chest_body_part
from lungburden.dicom_io.volume import CTVolume, SeriesRejected

#: Attenuation below this is air (lung parenchyma, airways, gas); above it soft tissue and bone.
AIR_HU = -400.0
#: In-plane step of the grid the check works on.
GRID_MM = 4.0


@dataclass(frozen=True)
class LungCriteria:
    """When an air region inside the body counts as a lung (per side of the patient)."""

    min_area_cm2: float = 5.0
    min_extent_mm: float = 30.0
    min_volume_ml: float = 50.0
    #: The lungs continue above the scan range when the most superior slice has at least this share
    #: of their largest cross-section: a note, or "lung bases only" when the header names another region.
    max_top_share: float = 0.6


@dataclass(frozen=True)
class LungContent:
    """What :func:`find_lungs` saw: per-side air volume (on the grid) and extent, and notes for result.json."""

    right_ml: float
    left_ml: float
    right_extent_mm: float
    left_extent_mm: float
    right_found: bool
    left_found: bool
    top_share: float
    notes: list[str] = field(default_factory=list)

    @property
    def sides(self) -> int:
        return int(self.right_found) + int(self.left_found)

    def summary(self) -> str:
        return (f"air inside the body: right {self.right_ml:.0f} mL over {self.right_extent_mm:.0f} mm, "
                f"left {self.left_ml:.0f} mL over {self.left_extent_mm:.0f} mm")

    def to_dict(self) -> dict:
        return {
            "right_air_ml": round(self.right_ml, 1),
            "left_air_ml": round(self.left_ml, 1),
            "right_extent_mm": round(self.right_extent_mm, 1),
            "left_extent_mm": round(self.left_extent_mm, 1),
        }


def _body_outline(tissue: np.ndarray) -> np.ndarray:
    """The largest tissue region of one slice with its holes filled (drops the table and cables)."""
    labels, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        tissue = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(tissue)


def _extent_mm(present: np.ndarray, z_mm: np.ndarray) -> float:
    """Craniocaudal length of the longest run of consecutive slices where ``present`` holds."""
    best, start = 0.0, None
    step = float(np.median(np.abs(np.diff(z_mm)))) if len(z_mm) > 1 else 0.0
    for k, on in enumerate(list(present) + [False]):
        if on and start is None:
            start = k
        elif not on and start is not None:
            best = max(best, abs(float(z_mm[k - 1] - z_mm[start])) + step)
            start = None
    return best


def lung_profile(volume: CTVolume) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(right_cm2, left_cm2, z_mm, cell_cm2)``: lung-air area per slice and side on the grid."""
    affine = volume.affine
    row_mm, col_mm = volume.spacing[1], volume.spacing[2]
    sr, sc = max(1, round(GRID_MM / row_mm)), max(1, round(GRID_MM / col_mm))
    hu = volume.hu[:, ::sr, ::sc]
    rows = np.arange(0, volume.hu.shape[1], sr)
    cols = np.arange(0, volume.hu.shape[2], sc)
    # LPS x (patient left positive) of each grid cell, and z (superior positive) of each slice
    x_plane = affine[0, 1] * rows[:, None] + affine[0, 2] * cols[None, :]
    x_slice = affine[0, 0] * np.arange(hu.shape[0]) + affine[0, 3]
    z_mm = affine[2, 0] * np.arange(hu.shape[0]) + affine[2, 3]
    cell_cm2 = row_mm * sr * col_mm * sc / 100.0
    tissue = hu > AIR_HU
    right = np.zeros(hu.shape[0])
    left = np.zeros(hu.shape[0])
    for k in range(hu.shape[0]):
        if tissue[k].sum() < 16:
            continue
        body = _body_outline(tissue[k])
        air = body & ~tissue[k]
        if not air.any():
            continue
        x = x_plane + x_slice[k]
        midline = float(x[body].mean())
        on_left = x > midline
        left[k] = np.count_nonzero(air & on_left) * cell_cm2
        right[k] = np.count_nonzero(air & ~on_left) * cell_cm2
    return right, left, z_mm, cell_cm2


def find_lungs(volume: CTVolume, criteria: LungCriteria = LungCriteria()) -> LungContent:
    """Look for the lungs in ``volume`` (see the module docstring); never raises."""
    right, left, z_mm, _ = lung_profile(volume)
    slice_mm = volume.spacing[0]
    found, ml, extent = {}, {}, {}
    for side, area in (("right", right), ("left", left)):
        present = area >= criteria.min_area_cm2
        extent[side] = _extent_mm(present, z_mm)
        ml[side] = float(area[present].sum()) * slice_mm / 10.0
        found[side] = extent[side] >= criteria.min_extent_mm and ml[side] >= criteria.min_volume_ml
    both = right + left
    top = int(np.argmax(z_mm))
    top_share = float(both[top] / both.max()) if both.max() > 0 else 0.0
    notes = []
    if found["right"] != found["left"]:
        side, other = ("right", "left") if found["right"] else ("left", "right")
        notes.append(f"lung air found on the patient's {side} only (the {other} lung is absent or opacified)")
    return LungContent(ml["right"], ml["left"], extent["right"], extent["left"], found["right"], found["left"],
                       top_share, notes)


def check_lungs(
    volume: CTVolume, body_part_regex: str | None = CHEST_BODY_PART_REGEX, criteria: LungCriteria = LungCriteria()
) -> LungContent:
    """:func:`find_lungs`, raising :class:`SeriesRejected` for a series without the lungs.

    ``body_part_regex`` tells which BodyPartExamined values name the chest; a series whose header
    names another region is rejected when it holds only the lung bases.
    """
    content = find_lungs(volume, criteria)
    if content.sides == 0:
        raise SeriesRejected(volume.series_instance_uid, f"contains no lungs: {content.summary()}")
    if content.top_share >= criteria.max_top_share:
        body_part = str(volume.datasets[0].get("BodyPartExamined", "") or "").strip() if volume.datasets else ""
        cut = (f"the most superior slice cuts the lungs at {100 * content.top_share:.0f} % of their largest "
               "cross-section")
        if is_chest_body_part(body_part, body_part_regex) is False:
            raise SeriesRejected(
                volume.series_instance_uid,
                f"contains only the lung bases: BodyPartExamined {body_part!r} and {cut}; {content.summary()}",
            )
        content.notes.append(f"lungs not fully covered: {cut}; volumes cover part of the lungs")
    return content


def describe_input(
    volume: CTVolume, content: LungContent | None = None, body_part_regex: str | None = CHEST_BODY_PART_REGEX
) -> dict:
    """The ``input`` block of result.json: ImageType, whether derived, BodyPartExamined, notes."""
    first = volume.datasets[0] if volume.datasets else {}
    values = [str(v) for v in (first.get("ImageType", []) or [])]
    derived = bool(values) and values[0].strip().upper() == "DERIVED"
    body_part = str(first.get("BodyPartExamined", "") or "").strip() or None
    notes = []
    if derived:
        notes.append("derived axial reformat analysed: no original axial series qualified")
    if content is not None and is_chest_body_part(body_part, body_part_regex) is False:
        notes.append(f"BodyPartExamined {body_part!r}: analysed as a chest series, both lungs found in the images"
                     if content.sides == 2 else f"BodyPartExamined {body_part!r}: lungs found in the images")
    if content is not None:
        notes += content.notes
    info: dict = {"image_type": values, "derived": derived, "body_part_examined": body_part}
    if content is not None:
        info["lungs"] = content.to_dict()
    info["notes"] = notes
    return info
