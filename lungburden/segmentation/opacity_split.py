"""GGO versus high opacity by attenuation, inside the network's lesion mask (paper section 2.2).

The paper's classes are GGO (hazy increased attenuation, vessels preserved) and high opacity
(consolidation and pleural effusion: soft-tissue or fluid attenuation). Commercial software
counts as "high opacity" the opacity above about -200 HU. A network trained on synthetic
phantoms calls most consolidation of real scans GGO, so after the network:

1. the patient's own aerated-lung attenuation is measured (:func:`aerated_reference_hu`: a low
   percentile of the voxels labelled aerated lung; about -870 HU on an inspiratory scan, higher
   on an expiratory or miscalibrated one). Taken over the whole lung field instead, it rises
   with the burden: in a lung two-thirds opaque the 15th percentile is GGO, and GGO within
   ``ggo_delta_hu`` of it would be called aerated lung;
2. a lesion voxel whose in-plane smoothed attenuation is within ``ggo_delta_hu`` of that
   reference is not increased attenuation and becomes aerated lung (GGO is defined relative to
   the surrounding lung, so a uniformly dense lung is not GGO throughout);
3. the remaining lesion is split at ``high_hu`` (smoothed, so single vessel voxels inside GGO
   do not become consolidation): above it high opacity, else GGO;
4. :func:`remove_detached_in_plane`: pneumonia lies in the lung, so an opacity patch of one slice
   borders aerated lung on part of its outline; a patch whose outline is less than
   ``min_lung_contact`` aerated lung (the rest is soft tissue or air outside the field: the
   muscles and vessels of the thoracic inlet, the pericardial fat pad, the mediastinum) is
   not lung disease and becomes background. A patch larger than ``max_detached_cm2`` is kept
   whatever its contact: a lobar consolidation or an effusion can fill a lung's whole cross-section
   at the base, with no aerated lung left in that slice, while the soft tissue the field takes in
   at the inlet, the crus or the heart border is a few cm² per slice.

Pure numpy/scipy on the lesion's bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungburden import labels as L


@dataclass(frozen=True)
class OpacitySplit:
    """Parameters of :func:`split_opacity` (HU)."""

    #: Lesion no more than this above the aerated-lung reference is aerated lung (None: off).
    ggo_delta_hu: float | None = 150.0
    #: Smoothed attenuation above this is high opacity (None: keep the network's split).
    high_hu: float | None = -300.0
    #: In-plane smoothing window (pixels).
    smooth_px: int = 3
    #: Percentile of the lung field's HU taken as the aerated-lung reference.
    reference_percentile: float = 15.0
    #: In-plane opacity patches need this share of their outline on aerated lung (0: off).
    min_lung_contact: float = 0.2
    #: ... unless they are larger than this in-plane area (cm²; None: no limit).
    max_detached_cm2: float | None = 20.0


#: Without enough lung field to measure, the aerated-lung reference of an inspiratory scan.
DEFAULT_REFERENCE_HU = -870.0


def aerated_reference_hu(labels: np.ndarray, hu: np.ndarray, percentile: float = 15.0, step: int = 2) -> float:
    """The ``percentile`` of HU over the voxels labelled aerated lung (label 1), on a
    ``step``-subsampled grid."""
    aerated = labels[:, ::step, ::step] == L.LUNG
    if np.count_nonzero(aerated) < 100:
        return DEFAULT_REFERENCE_HU
    return float(np.percentile(np.asarray(hu)[:, ::step, ::step][aerated], percentile))


def split_opacity(labels: np.ndarray, hu: np.ndarray, split: OpacitySplit = OpacitySplit(),
                  pixel_cm2: float | None = None) -> np.ndarray:
    """Steps 1-4 of the module docstring, in place; returns ``labels``. ``pixel_cm2``: in-plane
    pixel area (without it, step 4 has no size limit)."""
    if split.ggo_delta_hu is None and split.high_hu is None:
        return labels
    lesion = labels >= L.GGO
    axes = [np.flatnonzero(lesion.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
    if not axes[0].size:
        return labels
    box = tuple(slice(int(a[0]), int(a[-1]) + 1) for a in axes)
    sub, sub_lesion = labels[box], lesion[box]
    smooth = ndimage.uniform_filter(np.asarray(hu[box], np.float32), size=(1, split.smooth_px, split.smooth_px))
    if split.ggo_delta_hu is not None:
        reference = aerated_reference_hu(labels, hu, split.reference_percentile)
        faint = sub_lesion & (smooth <= reference + split.ggo_delta_hu)
        sub[faint] = L.LUNG
        sub_lesion &= ~faint
    if split.high_hu is not None:
        dense = smooth > split.high_hu
        sub[sub_lesion & dense] = L.HIGH_OPACITY
        sub[sub_lesion & ~dense] = L.GGO
    if split.min_lung_contact > 0:
        max_px = (split.max_detached_cm2 / pixel_cm2
                  if split.max_detached_cm2 is not None and pixel_cm2 else None)
        remove_detached_in_plane(sub, split.min_lung_contact, max_px)
    return labels


_PLANE8 = np.zeros((3, 3, 3), bool)
_PLANE8[1] = True


def remove_detached_in_plane(labels: np.ndarray, min_lung_contact: float,
                             max_pixels: float | None = None) -> np.ndarray:
    """Step 4 of the module docstring, in place; returns ``labels``. Patches are 8-connected
    per slice; a ring voxel next to several patches counts for the highest-numbered one;
    patches of more than ``max_pixels`` pixels are kept (None: no limit)."""
    opacity = labels >= L.GGO
    components, count = ndimage.label(opacity, structure=_PLANE8)
    if not count:
        return labels
    owner = ndimage.grey_dilation(components, footprint=_PLANE8)
    ring = (owner > 0) & ~opacity
    total = np.bincount(owner[ring], minlength=count + 1)
    lung = np.bincount(owner[ring & (labels == L.LUNG)], minlength=count + 1)
    detached = lung < min_lung_contact * np.maximum(total, 1)
    if max_pixels is not None:
        detached &= np.bincount(components.ravel(), minlength=count + 1) <= max_pixels
    detached[0] = False
    labels[detached[components]] = L.BACKGROUND
    return labels
