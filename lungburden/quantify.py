"""Volumes (mL), pneumonia burden (%) and mean attenuation from a label map (paper section 2.7).

Burden = (GGO + high opacity) / (whole lung field incl. lesions) x 100, as in the paper.
The lung field (labels 1-3) is split into right and left lung at the sagittal plane through its
centroid (LPS +x = patient left), by connected components: a component with at least 90 % of its
voxels on one side goes whole to that side; one that straddles the plane (both lungs joined
through the airways, or one merged field) is split by the plane. Volumes use the true voxel
volume of the source grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from lungburden import labels as L


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

    def to_dict(self) -> dict:
        return asdict(self)


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
    )
