"""Label-map finishing steps of the network segmenter, on the source grid (after the argmax).

:func:`remove_small_opacities` drops opacity specks under 0.5 mL. Each step below was measured
on validation phantoms 500-599 before it was adopted (docs/model-development.md, "Label
finishing"):

* :func:`refine_ggo_margins`: the network decides on an 80 × 80 feature grid, upsampled into
  the crop box, so its GGO boundary is smooth at a scale of 2-4 source pixels, while 84 % of its
  missed lesion voxels lie within 2 voxels of a lesion edge. GGO is an
  attenuation finding (paper section 2.2: hazy increased attenuation with vessels preserved), so
  at the margin of the network's GGO the attenuation decides: a voxel the network called aerated
  lung next to its GGO, with HU in the faint-GGO range, becomes GGO; a GGO voxel next to lung at
  aerated-lung HU becomes lung. In-plane 4-neighbour steps, at most ``steps`` voxels from the
  network's boundary, so the network still decides *where* there is GGO; this step only moves
  its edge. Only GGO grows: the partial-volume rim of a consolidation (intermediate HU on thick
  slices) is not GGO, and growing from it added false GGO to consolidation-only cases.
* :func:`remove_detached_opacities`: pneumonia lies in the lung, so an opacity component (GGO
  and high opacity together, 26-connected) is surrounded by aerated lung on part of its surface;
  a small component with (almost) no aerated lung around it is soft tissue the network took for
  consolidation (the neck and shoulder girdle at the lung apices). Large
  components are always kept: a lung that is opaque throughout (a white lung) has no aerated
  lung left to touch.
* :func:`remove_high_opacity_above_apex`: at the top of a scan the network, seeing lung in the
  slices below, calls the soft tissue of the thoracic inlet where the apex is about to appear
  high opacity (70-97 % of the false high opacity of the worst lesion-free validation cases lay
  in the 4 most cranial slices of the lung field). Cranial to the lung apex there is no lung to
  be consolidated, so high opacity there is dropped; the apex is the most cranial slice with at
  least ``min_lung_cm2`` of aerated lung.
* :func:`relabel_unlikely_high_opacity`: a high-opacity component under 0.5 mL (an 8 mm cube) is
  the dense core of a GGO patch or a vessel more often than a consolidation (on validation
  phantoms, 2:1 by volume), and one whose median attenuation is that of fat (at or below -60
  HU: thin rims of extrapleural fat along the chest wall, 1-5 mL each, most of
  the false high opacity left in lesion-free lungs) is not consolidated lung (paper section 2.2:
  consolidation is soft-tissue attenuation). Either takes the label that holds most of its
  surface (background, lung or GGO). Such components otherwise give lesion-free lungs a few mL
  of consolidation and spoil the ranking of patients by high-opacity volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from lungburden import labels as L
from lungburden.segmentation.masks import CUBE, bounding_crop, component_shell, dilate_in_plane


@dataclass(frozen=True)
class GGOMargins:
    """The attenuation rules of :func:`refine_ggo_margins` (HU ranges, lower bound exclusive)."""

    #: Faint GGO against aerated lung: aerated lung is about -850 HU, the faintest GGO -720..-650;
    #: above -500 a voxel next to GGO is a vessel or a consolidation edge, not faint GGO.
    lung_hu: tuple[float, float] = (-760.0, -500.0)
    #: GGO against high opacity: at or below -300 HU a voxel is not consolidated (hazy); above
    #: -100 HU (soft-tissue attenuation) it is. None leaves that boundary to the network.
    high_hu: tuple[float, float] | None = (-300.0, -100.0)
    #: In-plane steps a boundary may move (0 turns the refinement off).
    steps: int = 2


#: Opacity components from this size (mL) up are never removed as detached.
MAX_DETACHED_ML = 100.0
#: Smaller components need at least this share of their surface on aerated lung.
MIN_LUNG_CONTACT = 0.1

#: Aerated lung area (cm²) that makes a slice the lung apex.
APEX_MIN_LUNG_CM2 = 1.0
#: High-opacity components below this size (mL) are relabelled.
MIN_HIGH_OPACITY_ML = 0.5
#: High-opacity components whose median attenuation is at or below this (HU) are relabelled:
#: fat (about -100 HU) or aerated tissue, not consolidation (soft tissue or fluid, -100..+100
#: HU at its edges, mostly above -40; phantom generator and paper section 2.2).
FAT_MEDIAN_HU = -60.0



def refine_ggo_margins(labels: np.ndarray, hu: np.ndarray, margins: GGOMargins = GGOMargins()) -> np.ndarray:
    """Move the boundaries of GGO against aerated lung and against high opacity by attenuation,
    in place (module docstring); returns ``labels``.

    Each of ``margins.steps`` rounds, between voxels 4-neighbour in-plane: lung next to GGO with
    ``lung_hu[0] < HU <= lung_hu[1]`` becomes GGO, GGO next to lung with ``HU <= lung_hu[0]``
    becomes lung; with ``high_hu``, high opacity next to GGO with ``HU <= high_hu[0]`` becomes
    GGO and GGO next to high opacity with ``HU > high_hu[1]`` becomes high opacity. Works per
    slice, so a run of slices (with the matching HU) gets its share of the whole-series result.
    """
    steps = margins.steps
    if steps <= 0:
        return labels
    # The GGO's bounding box grown in-plane by the steps it may move: nothing outside it changes.
    box = bounding_crop(labels == L.GGO, (0, steps, steps))
    if box is None:
        return labels
    sub, sub_hu = labels[box], hu[box]
    low, high = margins.lung_hu
    faint = (sub_hu > low) & (sub_hu <= high)
    aerated = sub_hu <= low
    if margins.high_hu is not None:
        hazy, dense = sub_hu <= margins.high_hu[0], sub_hu > margins.high_hu[1]

    def next_to(label: int) -> np.ndarray:
        return dilate_in_plane(sub == label)

    for _ in range(steps):
        sub[(sub == L.LUNG) & faint & next_to(L.GGO)] = L.GGO
        sub[(sub == L.GGO) & aerated & next_to(L.LUNG)] = L.LUNG
        if margins.high_hu is not None:
            sub[(sub == L.HIGH_OPACITY) & hazy & next_to(L.GGO)] = L.GGO
            sub[(sub == L.GGO) & dense & next_to(L.HIGH_OPACITY)] = L.HIGH_OPACITY
    return labels


def remove_small_opacities(labels: np.ndarray, voxel_ml: float, min_ml: float) -> np.ndarray:
    """Relabel opacity components (GGO and high opacity together, 26-connected in 3-D) smaller
    than ``min_ml`` millilitres, in place; returns ``labels``.

    A speck of a few voxels is network noise, not a reportable finding (a pneumonia focus is
    centimetres across), and a burden report should read exactly 0 in a patient without
    pneumonia. A removed speck that touches aerated lung becomes lung, any other background.
    ``min_ml <= 0`` disables the step. Cost: one 3-D labelling of the opacity's bounding box
    plus ~0.1 ms per speck, or, above ``_SPECK_LOOP_LIMIT`` specks (a map full of noise), a few
    whole-box passes instead (one lung dilation).
    The phantoms' own truth has such pieces too (lesion fragments: a few mL per case, up to
    ~15 % of the opacity at 2 % burden), so evaluated against it the step reads slightly low.
    """
    return remove_opacity_components(labels, voxel_ml, min_ml=min_ml, max_detached_ml=0.0)


def remove_detached_opacities(labels: np.ndarray, voxel_ml: float, max_ml: float = MAX_DETACHED_ML,
                              min_contact: float = MIN_LUNG_CONTACT) -> np.ndarray:
    """Set opacity components under ``max_ml`` whose surface is less than ``min_contact``
    aerated lung (or that touch no lung at all) to background, in place; returns ``labels``.

    The surface is the component's 26-neighbour shell; since the component holds all opacity
    it touches, the shell is lung or background. ``max_ml <= 0`` disables the step.
    """
    return remove_opacity_components(labels, voxel_ml, min_ml=0.0, max_detached_ml=max_ml, min_contact=min_contact)


def remove_opacity_components(labels: np.ndarray, voxel_ml: float, min_ml: float = 0.0,
                              max_detached_ml: float = MAX_DETACHED_ML,
                              min_contact: float = MIN_LUNG_CONTACT) -> np.ndarray:
    """:func:`remove_small_opacities` then :func:`remove_detached_opacities` with one labelling
    of the opacity components, in place; returns ``labels``.

    The result is that of the two steps in turn: relabelling a speck changes no other
    component, and no speck voxel lies in another component's shell (it would be 26-connected
    to it, hence part of it), so the second step's components and shells are the first's.
    """
    if voxel_ml <= 0 or (min_ml <= 0 and max_detached_ml <= 0):
        return labels
    opacity = labels >= L.GGO  # GGO or high opacity
    # Work inside the opacity's bounding box, grown by one voxel for the shells.
    crop = bounding_crop(opacity, (1, 1, 1))
    if crop is None:
        return labels
    sub_labels = labels[crop]
    sub_opacity = opacity[crop]
    comps = np.empty(sub_labels.shape, np.uint16)  # half the memory of int32 ...
    try:
        ndimage.label(sub_opacity, structure=CUBE, output=comps)
    except RuntimeError:  # ... unless there are over 65535 components
        comps, _ = ndimage.label(sub_opacity, structure=CUBE)
    sizes = np.bincount(comps[sub_opacity])  # over the opacity voxels only: 3x faster than all
    is_speck = sizes < min_ml / voxel_ml if min_ml > 0 else np.zeros(sizes.size, bool)
    is_speck[0] = False
    specks = np.flatnonzero(is_speck)
    boxes: list[Any] | None = None  # ndimage.find_objects of comps, once needed
    if specks.size > _SPECK_LOOP_LIMIT:
        _relabel_specks_at_once(sub_labels, comps, specks, sizes.size)
    elif specks.size:
        boxes = ndimage.find_objects(comps)
        for index in specks:
            grown, speck, shell = component_shell(comps, index, boxes[index - 1])
            touches_lung = bool((sub_labels[grown][shell] == L.LUNG).any())
            sub_labels[grown][speck] = L.LUNG if touches_lung else L.BACKGROUND
    if max_detached_ml <= 0:
        return labels
    candidates = np.flatnonzero((sizes * voxel_ml < max_detached_ml) & ~is_speck)
    candidates = candidates[candidates > 0]
    if not candidates.size:
        return labels
    if boxes is None:
        boxes = ndimage.find_objects(comps)
    for index in candidates:
        grown, component, shell = component_shell(comps, index, boxes[index - 1])
        on_lung = np.count_nonzero(sub_labels[grown][shell] == L.LUNG)
        if on_lung == 0 or on_lung < min_contact * np.count_nonzero(shell):
            sub_labels[grown][component] = L.BACKGROUND
    return labels


#: Above this many specks, :func:`remove_small_opacities` relabels them in whole-array passes.
_SPECK_LOOP_LIMIT = 256


def _relabel_specks_at_once(sub_labels: np.ndarray, comps: np.ndarray, specks: np.ndarray, count: int) -> None:
    """The per-speck step of :func:`remove_small_opacities` for many specks: one dilation of the
    lung, one lookup per voxel (constant cost, where the loop costs ~0.1 ms per speck)."""
    is_speck = np.zeros(count, bool)
    is_speck[specks] = True
    voxels = is_speck[comps]
    near_lung = ndimage.binary_dilation(sub_labels == L.LUNG, structure=CUBE)
    touching = np.zeros(count, bool)
    touching[comps[voxels & near_lung]] = True
    sub_labels[voxels] = np.where(touching[comps[voxels]], L.LUNG, L.BACKGROUND).astype(sub_labels.dtype)


def remove_high_opacity_above_apex(labels: np.ndarray, affine: np.ndarray,
                                   min_lung_cm2: float = APEX_MIN_LUNG_CM2) -> np.ndarray:
    """Set high opacity cranial to the lung apex to background, in place; returns ``labels``.

    ``affine``: index ``(slice, row, col, 1)`` → LPS mm (:class:`~lungburden.dicom_io.volume.
    CTVolume`); its slice column says which end of the series is cranial (+z is superior). The
    apex is the most cranial slice with at least ``min_lung_cm2`` of :data:`~lungburden.labels.LUNG`.
    Without an apex (no such slice), for a series whose slices do not advance along z (not
    axial), or with ``min_lung_cm2 <= 0``, nothing changes.
    """
    affine = np.asarray(affine, float)
    step = affine[:3, 0]
    if min_lung_cm2 <= 0 or abs(step[2]) < 0.5 * float(np.linalg.norm(step)) or not len(labels):
        return labels
    pixel_cm2 = float(np.linalg.norm(affine[:3, 1]) * np.linalg.norm(affine[:3, 2])) / 100.0
    lung_cm2 = np.count_nonzero(labels == L.LUNG, axis=(1, 2)) * pixel_cm2
    cranial_first = np.arange(len(labels)) if step[2] < 0 else np.arange(len(labels))[::-1]
    apex = np.flatnonzero(lung_cm2[cranial_first] >= min_lung_cm2)
    if not apex.size:
        return labels
    for k in cranial_first[:apex[0]]:
        labels[k][labels[k] == L.HIGH_OPACITY] = L.BACKGROUND
    return labels


def relabel_unlikely_high_opacity(labels: np.ndarray, hu: np.ndarray, voxel_ml: float,
                                  min_ml: float = MIN_HIGH_OPACITY_ML,
                                  fat_median_hu: float | None = FAT_MEDIAN_HU) -> np.ndarray:
    """Give high-opacity components (26-connected) that are specks (under ``min_ml``) or of fat
    attenuation (median HU at or below ``fat_median_hu``) the label that holds most of their
    26-neighbour shell (background, lung or GGO; background on ties), in place; returns
    ``labels``. ``min_ml <= 0`` / ``fat_median_hu=None`` disable either test.
    """
    if voxel_ml <= 0 or (min_ml <= 0 and fat_median_hu is None):
        return labels
    high = labels == L.HIGH_OPACITY
    crop = bounding_crop(high, (1, 1, 1))
    if crop is None:
        return labels
    sub, sub_high = labels[crop], high[crop]
    components, count = ndimage.label(sub_high, structure=CUBE)
    index = np.arange(1, count + 1)
    member = components[sub_high]  # the component of each high-opacity voxel
    unlikely = np.bincount(member, minlength=count + 1)[1:] * voxel_ml < min_ml
    if fat_median_hu is not None:  # over the high-opacity voxels only (the whole box: 100x slower)
        medians = np.asarray(ndimage.median(np.asarray(hu)[crop][sub_high], member, index), float)
        unlikely |= medians <= fat_median_hu
    relabel_to_surroundings(sub, components, ndimage.find_objects(components), index[unlikely])
    return labels


def relabel_to_surroundings(labels: np.ndarray, components: np.ndarray, boxes: list[Any],
                            indices: np.ndarray) -> None:
    """Give each component in ``indices`` (of the labelled array ``components``, boxes from
    ``ndimage.find_objects``; both on the grid of ``labels``) the label that holds most of its
    26-neighbour shell (background, lung or GGO; background on ties), in place."""
    for i in indices:
        grown, component, shell = component_shell(components, int(i), boxes[i - 1])
        around = np.bincount(labels[grown][shell], minlength=L.HIGH_OPACITY)[:L.HIGH_OPACITY]
        labels[grown][component] = int(np.argmax(around))
