"""Lesions as regions, not speckle: in-plane opening and closing of the opacity mask (paper section 2.2).

Readers outline COVID-19 pneumonia as regions: a patch of ground glass or crazy paving is one
GGO region with the vessels and the aerated lobules it encloses, a consolidation one region with
its air bronchograms. A per-voxel classifier marks patchy voxels inside such a region and, in
normal lung, thin bright structures: vessels seen along their length and the partial-volume
rim where the lung field meets the chest wall, the mediastinum or a diaphragm dome cut by the
slice. After the attenuation split (:mod:`.opacity_split`), per slice:

0. where a slice cuts the dome of the liver, spleen or stomach under the lung base, the organ
   appears as soft tissue ringed by lung (a hole of the lung field over ``dome_min_cm2``, median
   above ``dome_tissue_hu``); the opacity within ``dome_rim_mm`` of it is the partial volume of
   the sloping diaphragm in a thick slice, not lung disease, and becomes aerated lung;
1. an in-plane opening with a disk of ``open_mm`` (radius) removes opacity thinner than about
   twice that: vessels, fissures and the interface rims become aerated lung (a pneumonic
   region is wider than a vessel; a thin opacity band along the pleura or the diaphragm is a
   partial-volume effect, not consolidation);
2. an in-plane closing with a disk of ``close_mm`` joins the patches of one region; the gaps
   it fills inside the lung field become opacity, GGO or high opacity by the same smoothed
   attenuation split (``high_hu``) as the rest of the lesion.

Pure numpy/scipy on crops around each slice's opacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungburden import labels as L


@dataclass(frozen=True)
class LesionRegions:
    """Parameters of :func:`refine_lesion_regions` (lengths in mm, HU)."""

    #: Opacity this close to an organ dome ringed by the lung is partial volume (0: off).
    dome_rim_mm: float = 8.0
    #: A hole of the lung field larger than this is an organ dome (smaller ones are filled as
    #: enclosed lesions by the pleural-space fill of :mod:`.lung_field`).
    dome_min_cm2: float = 6.0
    #: ... and its median attenuation is above this (soft tissue, not gas).
    dome_tissue_hu: float = -200.0
    #: Radius of the in-plane opening that removes thin opacity (0: off).
    open_mm: float = 2.0
    #: Radius of the in-plane closing that joins the patches of a region (0: off).
    close_mm: float = 3.0
    #: Voxels added by the closing are high opacity above this smoothed attenuation, else GGO.
    high_hu: float = -300.0
    #: In-plane smoothing window of that split (pixels).
    smooth_px: int = 3


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def refine_lesion_regions(labels: np.ndarray, hu: np.ndarray, affine: np.ndarray,
                          regions: LesionRegions = LesionRegions()) -> np.ndarray:
    """Steps 0-2 of the module docstring, in place; returns ``labels``. ``affine``: index
    ``(slice, row, col)`` → mm (gives the in-plane pixel size)."""
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    pixel_mm = float(np.sqrt(spacing[1] * spacing[2]))
    if regions.dome_rim_mm > 0:
        remove_dome_rims(labels, hu, pixel_mm, regions)
    r_open = int(round(regions.open_mm / pixel_mm)) if regions.open_mm > 0 else 0
    r_close = int(round(regions.close_mm / pixel_mm)) if regions.close_mm > 0 else 0
    if r_open <= 0 and r_close <= 0:
        return labels
    open_disk, close_disk = _disk(r_open), _disk(r_close)
    pad = r_close + 1
    rows, cols = labels.shape[1:]
    for k in np.flatnonzero((labels >= L.GGO).any(axis=(1, 2))):
        sub = labels[k]
        lesion_full = sub >= L.GGO
        rr, cc = np.flatnonzero(lesion_full.any(axis=1)), np.flatnonzero(lesion_full.any(axis=0))
        r0, r1 = max(rr[0] - pad, 0), min(rr[-1] + pad + 1, rows)
        c0, c1 = max(cc[0] - pad, 0), min(cc[-1] + pad + 1, cols)
        crop = sub[r0:r1, c0:c1]
        lesion = lesion_full[r0:r1, c0:c1]
        if r_open > 0:
            opened = ndimage.binary_opening(np.pad(lesion, r_open + 1), open_disk)[r_open + 1:-r_open - 1,
                                                                                 r_open + 1:-r_open - 1]
            crop[lesion & ~opened] = L.LUNG
            lesion = opened
        if r_close > 0 and lesion.any():
            closed = ndimage.binary_closing(np.pad(lesion, pad), close_disk)[pad:-pad, pad:-pad]
            added = closed & ~lesion & (crop == L.LUNG)
            if added.any():
                smooth = ndimage.uniform_filter(np.asarray(hu[k, r0:r1, c0:c1], np.float32), regions.smooth_px)
                crop[added & (smooth > regions.high_hu)] = L.HIGH_OPACITY
                crop[added & (smooth <= regions.high_hu)] = L.GGO
    return labels


def remove_dome_rims(labels: np.ndarray, hu: np.ndarray, pixel_mm: float,
                     regions: LesionRegions = LesionRegions()) -> np.ndarray:
    """Step 0 of the module docstring, in place; returns ``labels``."""
    pixel_cm2 = pixel_mm * pixel_mm / 100.0
    rows, cols = labels.shape[1:]
    for k in np.flatnonzero((labels >= L.GGO).any(axis=(1, 2))):
        field_full = labels[k] >= L.LUNG
        rr, cc = np.flatnonzero(field_full.any(axis=1)), np.flatnonzero(field_full.any(axis=0))
        r0, r1, c0, c1 = rr[0], rr[-1] + 1, cc[0], cc[-1] + 1
        field = field_full[r0:r1, c0:c1]
        holes = ndimage.binary_fill_holes(field) & ~field
        if not holes.any():
            continue
        parts, count = ndimage.label(holes)
        area = np.bincount(parts.ravel(), minlength=count + 1)[1:] * pixel_cm2
        big = np.flatnonzero(area > regions.dome_min_cm2) + 1
        if not big.size:
            continue
        median = np.asarray(ndimage.median(hu[k, r0:r1, c0:c1], parts, big), float)
        dome_ids = big[median > regions.dome_tissue_hu]
        if not dome_ids.size:
            continue
        dome = np.isin(parts, dome_ids)
        near = ndimage.distance_transform_edt(~dome) * pixel_mm <= regions.dome_rim_mm
        crop = labels[k, r0:r1, c0:c1]
        crop[near & (crop >= L.GGO)] = L.LUNG
    return labels
