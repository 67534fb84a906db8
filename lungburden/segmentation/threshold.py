"""The classical ``threshold`` baseline segmenter: automatic lung field + HU thresholds.

A baseline for comparisons (paper Table 4 compares deep models; this is the classical floor),
not the product model. Steps, on the source grid:

1. body = largest connected component of HU > -500 (per volume), holes filled per slice;
2. aerated lung = HU < -400 inside the body, minus components touching the volume border; the
   two largest 3-D components (or one if the lungs touch) are kept;
3. lung field = aerated lung closed and hole-filled per slice (vessels and dense lesions
   enclosed by lung are included);
4. inside the lung field, after a light in-plane Gaussian smoothing: GGO = (-750, -300] HU and
   high opacity = > -300 HU; components smaller than ``min_lesion_ml`` are dropped.

Known limits: vessels and airway walls above -750 HU count as opacity; effusion outside the
aerated lung's hull is missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungburden import __version__
from lungburden import labels as L
from lungburden.dicom_io.volume import CTVolume
from lungburden.segmentation.base import AlgorithmInfo
from lungburden.segmentation.masks import largest_component


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Largest connected component of HU > -500, holes filled slice by slice."""
    return _fill_holes_per_slice(largest_component(hu > -500))


def lung_field_mask(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Lung field (aerated lung with enclosed vessels and lesions) by thresholding and morphology."""
    air = (hu < -400) & body_mask(hu)
    components, count = ndimage.label(air)
    if count == 0:
        return air
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    border = np.unique(
        np.concatenate([components[:, 0].ravel(), components[:, -1].ravel(),
                        components[:, :, 0].ravel(), components[:, :, -1].ravel()])
    )
    sizes[border] = 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    order = np.argsort(sizes)[::-1]
    keep = [i for i in order[:2] if sizes[i] * voxel_ml > 50.0]
    lung = np.isin(components, keep)
    radius = max(1, int(round(4.0 / spacing[1])))
    structure = np.zeros((1, 2 * radius + 1, 2 * radius + 1), bool)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    structure[0] = yy**2 + xx**2 <= radius**2
    closed = ndimage.binary_closing(lung, structure=structure, iterations=2)
    return _fill_holes_per_slice(closed | lung)


@dataclass
class ThresholdSegmenter:
    """Classical baseline (see module docstring)."""

    ggo_min_hu: float = -750.0
    high_opacity_min_hu: float = -300.0
    min_lesion_ml: float = 0.05
    info: AlgorithmInfo = AlgorithmInfo(
        name="lungburden-threshold",
        version=__version__,
        family="Artificial Intelligence",
        parameters={"ggo_hu": "-750..-300", "high_opacity_hu": ">-300"},
    )

    def segment(self, volume: CTVolume) -> np.ndarray:
        hu = volume.hu
        field = lung_field_mask(hu, volume.spacing)
        smooth = ndimage.gaussian_filter(hu, sigma=(0, 1.0, 1.0))
        labels = np.zeros(hu.shape, np.uint8)
        labels[field] = L.LUNG
        opacity = field & (smooth > self.ggo_min_hu)
        components, count = ndimage.label(opacity)
        if count:
            sizes = np.bincount(components.ravel()) * volume.voxel_volume_ml
            sizes[0] = 0
            opacity &= (sizes >= self.min_lesion_ml)[components]
        labels[opacity & (smooth <= self.high_opacity_min_hu)] = L.GGO
        labels[opacity & (smooth > self.high_opacity_min_hu)] = L.HIGH_OPACITY
        return labels
