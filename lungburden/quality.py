"""Quality checks of the input and the result: nothing partial or implausible leaves the node.

:func:`check_input` looks at the loaded series before segmentation, :func:`check_result` at the
label map and the quantities after it; both add :class:`QualityFlag` entries to a
:class:`QualityReport`. A flag either *refuses* the result (the job fails with the reason and
nothing is delivered) or is *recorded* (result.json ``quality`` and the SR's Qualitative
Evaluations) while the result is delivered. Thresholds (:class:`QualityThresholds`) and their basis:

- field of view: a chest CT is reconstructed over 300-500 mm; an adult chest is 250-400 mm wide,
  so images covering less than ``min_fov_mm`` (200 mm) cannot hold it: refused;
- matrix: fewer than ``min_matrix`` (64) rows or columns is too coarse to segment lungs: refused;
- RescaleSlope 0, non-finite values or more than ``max_out_of_range_fraction`` of the voxels
  outside the CT scale [``min_hu``, ``max_hu``] (padding -3024 HU to the extended scale's
  30 000 HU): broken modality LUT, refused;
- HU histogram: a chest CT has air (lungs, air around the body, -1100..-800 HU) and soft tissue
  (-200..200 HU); less than ``min_class_fraction`` (1 %) of either: refused;
- lung volume: adult total lung capacity is about 4-8 L (ERS/GLI reference values), residual
  volume 1-2.5 L and hyperinflated emphysema stays below about 11 L; a lung field below
  ``min_lung_ml`` (500 mL) or above ``max_lung_ml`` (12 L) is not an adult chest: refused
  (the thresholds assume adults; paediatric chests are outside the intended use);
- coverage: a lung cross-section on the first or last slice of at least ``max_edge_share``
  (25 %) of the largest one means the lungs continue beyond the scan (or the series is cut
  short): recorded as ``incomplete_coverage``; the content check's "lungs not fully covered"
  counts too;
- instance count: fewer instances than the series' own ImagesInAcquisition (0020,1002) is
  recorded; together with incomplete coverage the series is refused as partial.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from lungburden.dicom_io.volume import CTVolume, SeriesRejected
from lungburden.quantify import Quantities

Severity = Literal["refuse", "record"]


@dataclass(frozen=True)
class QualityThresholds:
    """The limits of the checks (see the module docstring for their basis)."""

    min_fov_mm: float = 200.0
    min_matrix: int = 64
    min_hu: float = -3100.0
    max_hu: float = 31000.0
    max_out_of_range_fraction: float = 0.01
    air_hu: tuple[float, float] = (-1100.0, -800.0)
    soft_tissue_hu: tuple[float, float] = (-200.0, 200.0)
    min_class_fraction: float = 0.01
    min_lung_ml: float = 500.0
    max_lung_ml: float = 12000.0
    max_edge_share: float = 0.25


@dataclass(frozen=True)
class QualityFlag:
    """One finding of the checks: a stable ``code``, refuse or record, and a sentence."""

    code: str
    severity: Severity
    message: str


@dataclass
class QualityReport:
    """The flags of one series; :attr:`refused` when any flag refuses the result."""

    flags: list[QualityFlag] = field(default_factory=list)
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)

    def add(self, code: str, severity: Severity, message: str) -> None:
        if not any(f.code == code for f in self.flags):
            self.flags.append(QualityFlag(code, severity, message))

    @property
    def refused(self) -> bool:
        return any(f.severity == "refuse" for f in self.flags)

    @property
    def reasons(self) -> list[str]:
        """The messages of the refusing flags."""
        return [f.message for f in self.flags if f.severity == "refuse"]

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.flags]

    def to_dict(self) -> dict:
        """The ``quality`` block of result.json."""
        return {
            "passed": not self.refused,
            "flags": [asdict(f) for f in self.flags],
            "thresholds": asdict(self.thresholds),
        }


class QualityRefused(SeriesRejected):
    """The quality checks refused the result of a series (nothing is delivered)."""

    def __init__(self, series_uid: str, report: QualityReport):
        self.report = report
        super().__init__(series_uid, "quality check: " + "; ".join(report.reasons))


def check_input(volume: CTVolume, report: QualityReport | None = None) -> QualityReport:
    """Field of view, matrix, modality LUT and HU histogram of a loaded series."""
    report = report or QualityReport()
    t = report.thresholds
    rows, cols = volume.shape[1:]
    fov = min(rows * volume.spacing[1], cols * volume.spacing[2])
    if min(rows, cols) < t.min_matrix:
        report.add("matrix_too_small", "refuse",
                   f"images of {rows}x{cols} pixels, fewer than {t.min_matrix} rows or columns")
    if fov < t.min_fov_mm:
        report.add("field_of_view_too_small", "refuse",
                   f"field of view {fov:.0f} mm, smaller than a chest ({t.min_fov_mm:.0f} mm)")
    slopes = {float(ds.RescaleSlope) for ds in volume.datasets if "RescaleSlope" in ds}
    if 0.0 in slopes:
        report.add("rescale_slope_zero", "refuse", "RescaleSlope is 0: every pixel has the same value")
    hu = volume.hu
    step = max(1, hu.size // 2_000_000)  # a sample of at most ~2 M voxels is enough for fractions
    sample = hu.reshape(-1)[::step].astype(np.float64)
    finite = np.isfinite(sample)
    outside = ~finite | (sample < t.min_hu) | (sample > t.max_hu)
    if not finite.all() or outside.mean() > t.max_out_of_range_fraction:
        report.add("hu_out_of_range", "refuse",
                   f"{100 * outside.mean():.0f} % of the voxels outside [{t.min_hu:.0f}, {t.max_hu:.0f}] HU "
                   "(RescaleSlope/RescaleIntercept not those of a CT)")
    values = sample[finite]
    air = np.mean((values >= t.air_hu[0]) & (values <= t.air_hu[1])) if values.size else 0.0
    tissue = np.mean((values >= t.soft_tissue_hu[0]) & (values <= t.soft_tissue_hu[1])) if values.size else 0.0
    if air < t.min_class_fraction:
        report.add("no_air", "refuse", f"no air in the images ({100 * air:.1f} % of voxels in "
                                       f"[{t.air_hu[0]:.0f}, {t.air_hu[1]:.0f}] HU)")
    if tissue < t.min_class_fraction:
        report.add("no_soft_tissue", "refuse", f"no soft tissue in the images ({100 * tissue:.1f} % of voxels in "
                                               f"[{t.soft_tissue_hu[0]:.0f}, {t.soft_tissue_hu[1]:.0f}] HU)")
    counts = {ds.get("ImagesInAcquisition") for ds in volume.datasets}
    if len(counts) == 1 and (expected := next(iter(counts))) not in (None, ""):
        try:
            expected = int(expected)
        except (TypeError, ValueError):
            expected = 0
        if expected > volume.shape[0]:
            report.add("fewer_instances_than_acquisition", "record",
                       f"{volume.shape[0]} instances of the {expected} images of the acquisition "
                       "(ImagesInAcquisition)")
    return report


def check_result(
    volume: CTVolume,
    labels: np.ndarray,
    quantities: Quantities,
    report: QualityReport | None = None,
    content_notes: list[str] | None = None,
) -> QualityReport:
    """Lung volume and craniocaudal coverage of a label map (lung field = labels > 0)."""
    report = report or QualityReport()
    t = report.thresholds
    lung_ml = quantities.lung_volume_ml
    if lung_ml < t.min_lung_ml:
        report.add("lung_volume_too_small", "refuse",
                   f"lung volume {lung_ml:.0f} mL, below {t.min_lung_ml:.0f} mL (not an adult chest, or cut short)")
    elif lung_ml > t.max_lung_ml:
        report.add("lung_volume_too_large", "refuse",
                   f"lung volume {lung_ml:.0f} mL, above {t.max_lung_ml:.0f} mL (not a plausible adult lung)")
    area = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    largest = float(area.max()) if area.size else 0.0
    if largest > 0:
        z = volume.affine[2, 0] * np.arange(labels.shape[0]) + volume.affine[2, 3]
        ends = {"most superior": int(np.argmax(z)), "most inferior": int(np.argmin(z))}
        cut = [f"{name} slice at {100 * area[k] / largest:.0f} %" for name, k in ends.items()
               if area[k] / largest >= t.max_edge_share]
        if cut:
            report.add("incomplete_coverage", "record",
                       f"lung field cut by the {' and the '.join(cut)} of its largest cross-section: "
                       "the lungs are not fully covered, volumes cover part of the lungs")
    if any("lungs not fully covered" in note for note in content_notes or ()):
        report.add("incomplete_coverage", "record",
                   "lungs not fully covered by the scan range: volumes cover part of the lungs")
    if "incomplete_coverage" in report.codes and "fewer_instances_than_acquisition" in report.codes:
        report.add("partial_series", "refuse",
                   "partial series: fewer instances than ImagesInAcquisition and the lung field is cut")
    return report


def enforce(volume: CTVolume, report: QualityReport) -> None:
    """Raise :class:`QualityRefused` when ``report`` refuses the result."""
    if report.refused:
        raise QualityRefused(volume.series_instance_uid, report)


# --- SR content (TID 1500 row 12: Qualitative Evaluations) ---------------------------------------

#: TID 1500 "Qualitative Evaluations" container (UMLS C0034375).
_QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS", "Qualitative Evaluations")
#: Codes of the flags that have a DICOM concept (others go as TEXT only).
_FLAG_CODES = {"incomplete_coverage": ("130576", "DCM", "Anatomy coverage incomplete")}


def add_to_sr(sr, report: QualityReport) -> None:
    """Append the report to a TID 1500 SR as a Qualitative Evaluations container.

    CODE (130550, DCM, "Imaging Series Quality") = 111237 "Usable - meets the quality control
    standard", 111236 "Usable - does not meet the quality control standard" (recorded flags) or
    111235 "Unusable - Quality renders image unusable" (a refused result, CID 7011 / DCM),
    one CODE (111052, DCM, "Quality Finding") per flag with a DICOM concept, and one TEXT
    (121106, DCM, "Comment") per flag.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    rel = hd.sr.RelationshipTypeValues.CONTAINS
    items: list = [hd.sr.CodeContentItem(
        name=Code("130550", "DCM", "Imaging Series Quality"),
        value=(Code("111235", "DCM", "Unusable - Quality renders image unusable") if report.refused
               else Code("111236", "DCM", "Usable - does not meet the quality control standard") if report.flags
               else Code("111237", "DCM", "Usable - meets the quality control standard")),
        relationship_type=rel,
    )]
    for flag in report.flags:
        if flag.code in _FLAG_CODES:
            items.append(hd.sr.CodeContentItem(name=Code("111052", "DCM", "Quality Finding"),
                                               value=Code(*_FLAG_CODES[flag.code]), relationship_type=rel))
        items.append(hd.sr.TextContentItem(name=Code("121106", "DCM", "Comment"),
                                           value=f"{flag.code}: {flag.message}"[:1024], relationship_type=rel))
    container = hd.sr.ContainerContentItem(name=Code(*_QUALITATIVE_EVALUATIONS), relationship_type=rel)
    container.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    sr.ContentSequence.append(container)
