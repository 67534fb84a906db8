"""Volumes (mL), pneumonia burden (%) and mean attenuation from a label map (paper section 2.7).

Burden = (GGO + high opacity) / (whole lung field incl. lesions) x 100, as in the paper.
The lung field (labels 1-3) is split into right and left lung at the sagittal plane through its
centroid (LPS +x = patient left), by connected components: a component with at least 90 % of its
voxels on one side goes whole to that side; one that straddles the plane (both lungs joined
through the airways, or one merged field) is split by the plane. Volumes use the true voxel
volume of the source grid.

Lung zones (:class:`ZoneInvolvement`): each lung is divided into an upper, a middle and a lower
zone of equal height along the patient's head-foot axis (LPS z), from the top of its most
superior voxel to the bottom of its most inferior voxel (voxel centre +- half the voxel extent
along z); a voxel belongs to the zone that holds its centre. These are zones, not the anatomical
lobes. Each zone has its involvement (GGO + high opacity in % of the zone's lung field) and the
CT severity score of that involvement (:func:`zone_score`); the total of the six scores is 0-30.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage

from lungburden import labels as L

#: Zone names from the head down, and the lungs in the order of the outputs.
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
LUNGS: tuple[str, ...] = ("right", "left")
#: Upper bounds (%) of the severity scores 1-4; more than the last bound scores 5 (0 = none).
SCORE_BANDS: tuple[float, ...] = (5.0, 25.0, 50.0, 75.0)


def zone_score(percent: float, opacity_voxels: int = 1) -> int:
    """CT severity score of one zone: 0 none, 1 < 5 %, 2 5-25 %, 3 26-50 %, 4 51-75 %, 5 > 75 %.

    Band edges: 5 % scores 2, 25 % scores 2, 50 % scores 3, 75 % scores 4 (a band holds its
    upper bound). ``opacity_voxels == 0`` scores 0 whatever the percentage.
    """
    if opacity_voxels <= 0 or percent <= 0.0:
        return 0
    if percent < SCORE_BANDS[0]:
        return 1
    for score, bound in enumerate(SCORE_BANDS[1:], start=2):
        if percent <= bound:
            return score
    return 5


@dataclass(frozen=True)
class Zone:
    """One lung zone: its lung field volume, opacity volume, involvement and score."""

    lung: str  # "right" | "left"
    zone: str  # "upper" | "middle" | "lower"
    lung_volume_ml: float
    opacity_volume_ml: float
    involvement_percent: float
    score: int


@dataclass(frozen=True)
class ZoneInvolvement:
    """Involvement per lung zone (six zones, right lung first, each from the head down) and the
    total severity score (0-30). ``rule`` names the zone rule (see the module docstring)."""

    zones: tuple[Zone, ...]
    total_score: int
    rule: str = "equal-height thirds of each lung along the patient axis (zones, not lobes)"

    def zone(self, lung: str, zone: str) -> Zone:
        return next(z for z in self.zones if z.lung == lung and z.zone == zone)

    def to_dict(self) -> dict:
        """JSON form: ``rule``, ``total_score`` and ``zones`` (a list of :class:`Zone` fields)."""
        return {"rule": self.rule, "total_score": self.total_score, "zones": [asdict(z) for z in self.zones]}


def zone_involvement(labels: np.ndarray, affine: np.ndarray, left: np.ndarray) -> ZoneInvolvement:
    """:class:`ZoneInvolvement` of a label map; ``left`` is the patient's left lung (bool mask)."""
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    # Extent of a voxel along z: |dz/d index| summed over the three axes.
    half_extent = 0.5 * float(np.abs(affine[2, :3]).sum())
    field = labels > 0
    zones: list[Zone] = []
    for lung in LUNGS:
        mask = field & (left if lung == "left" else ~left)
        idx = np.nonzero(mask)
        z = affine[2, 0] * idx[0] + affine[2, 1] * idx[1] + affine[2, 2] * idx[2] + affine[2, 3]
        opaque = labels[idx] >= L.GGO
        if z.size:
            top, bottom = float(z.max()) + half_extent, float(z.min()) - half_extent
            position = np.clip(np.floor(3.0 * (top - z) / (top - bottom)), 0, 2).astype(np.intp)
        else:
            position = np.zeros(0, np.intp)
        lung_counts = np.bincount(position, minlength=3)
        opacity_counts = np.bincount(position, weights=opaque, minlength=3).astype(np.int64)
        for index, name in enumerate(ZONES):
            n, o = int(lung_counts[index]), int(opacity_counts[index])
            percent = round(100.0 * o / n, 3) if n else 0.0
            zones.append(Zone(lung, name, round(n * voxel_ml, 3), round(o * voxel_ml, 3), percent,
                              zone_score(percent, o)))
    return ZoneInvolvement(tuple(zones), sum(z.score for z in zones))


@dataclass(frozen=True)
class Quantities:
    """The numbers of ``result.json`` / ``truth.json`` (volumes in mL, burden in %, HU means)."""

    lung_volume_ml: float
    left_lung_volume_ml: float
    right_lung_volume_ml: float
    ggo_volume_ml: float
    high_opacity_volume_ml: float
    opacity_volume_ml: float
    burden_percent: float
    ggo_percent: float
    high_opacity_percent: float
    lung_mean_hu: float | None
    ggo_mean_hu: float | None
    high_opacity_mean_hu: float | None
    #: Involvement per lung zone (None only where a caller builds Quantities without it).
    zones: ZoneInvolvement | None = None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["zones"] = self.zones.to_dict() if self.zones is not None else None
        return out


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 1) if values.size else None


#: A component with more than this fraction of its voxels on each side of the plane is split.
STRADDLE_FRACTION = 0.1


def left_lung_mask(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Boolean mask of the patient's left lung within the lung field (see module docstring)."""
    field = labels > 0
    if not field.any():
        return field
    # LPS x of the lung-field voxels only (a full-volume coordinate array would cost 8 bytes a voxel).
    idx = np.nonzero(field)
    x = affine[0, 0] * idx[0] + affine[0, 1] * idx[1] + affine[0, 2] * idx[2] + affine[0, 3]
    beyond_plane = x > x.mean()
    components, count = ndimage.label(field)
    ids = components[idx]
    sizes = np.bincount(ids, minlength=count + 1)
    fraction_left = np.bincount(ids, weights=beyond_plane, minlength=count + 1) / np.maximum(sizes, 1)
    # Components clearly on one side go whole to that side; a component straddling the plane
    # (lungs joined through the airways, or a single merged field) is split at the plane.
    whole_left = fraction_left >= 1.0 - STRADDLE_FRACTION
    straddling = (fraction_left > STRADDLE_FRACTION) & ~whole_left
    left = np.zeros_like(field)
    left[idx] = whole_left[ids] | (straddling[ids] & beyond_plane)
    return left


def quantify(
    labels: np.ndarray, hu: np.ndarray, affine: np.ndarray, left_mask: np.ndarray | None = None
) -> Quantities:
    """Compute :class:`Quantities` from a label map and the HU volume on the same grid.

    ``left_mask`` (patient's left lung) replaces the automatic split of :func:`left_lung_mask`
    where the truth is known (the phantom).
    """
    if labels.shape != hu.shape:
        raise ValueError(f"label map shape {labels.shape} differs from the volume {hu.shape}")
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=L.NUM_CLASSES)
    lung_voxels = int(counts[L.LUNG] + counts[L.GGO] + counts[L.HIGH_OPACITY])
    left = left_lung_mask(labels, affine) if left_mask is None else left_mask & (labels > 0)
    left_voxels = int(np.count_nonzero(left))
    ggo, high = int(counts[L.GGO]), int(counts[L.HIGH_OPACITY])

    def ml(n: int) -> float:
        return round(n * voxel_ml, 3)

    def pct(n: int) -> float:
        return round(100.0 * n / lung_voxels, 3) if lung_voxels else 0.0

    return Quantities(
        lung_volume_ml=ml(lung_voxels),
        left_lung_volume_ml=ml(left_voxels),
        right_lung_volume_ml=ml(lung_voxels - left_voxels),
        ggo_volume_ml=ml(ggo),
        high_opacity_volume_ml=ml(high),
        opacity_volume_ml=ml(ggo + high),
        burden_percent=pct(ggo + high),
        ggo_percent=pct(ggo),
        high_opacity_percent=pct(high),
        lung_mean_hu=_mean(hu[labels == L.LUNG]),
        ggo_mean_hu=_mean(hu[labels == L.GGO]),
        high_opacity_mean_hu=_mean(hu[labels == L.HIGH_OPACITY]),
        zones=zone_involvement(labels, affine, left),
    )
