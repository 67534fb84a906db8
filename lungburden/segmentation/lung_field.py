"""Anatomy rules for the lung field of real CT, applied after the network (labels >= 1 = lung field).

A network trained on synthetic chest phantoms takes every air-filled space of a real scan for
lung: the trachea and main bronchi, air in the skin folds of the armpit and under the table,
and stomach or bowel gas below the diaphragm. These are not lung parenchyma and enter the
burden's denominator (paper section 2.2: the burden is opacity over the lung field). Dense
dependent consolidation and effusion against the chest wall, on the other hand, are inside the
pleural space but the network often leaves them out of the field. :func:`refine_lung_field`
applies, in order:

1. :func:`outside_air_mask`: air connected in 3-D to the edge of the image (room air, the
   armpit folds, the air under the table) is never lung.
2. :func:`airway_mask`: the trachea, found as an air tube surrounded by soft tissue near the
   midline of the most cranial slices, is followed caudally slice by slice into the main
   bronchi; the cut (where the airway stops and lung begins) is made at the first slice where a
   branch's air cross-section grows more than ``leak_ratio`` times or beyond ``max_area_cm2``
   (the lumen has merged with lung air), or ``max_below_carina_mm`` below the carina (the main
   bronchi are 2-5 cm long; lobar bronchi inside the lung stay lung field). The airway and a
   thin rim (its wall) are removed from the field.
3. :func:`select_lung_components`: the lungs are the one or two largest 3-D components of the
   field; other components are kept only if they are comparable in size, not gas (median HU
   above ``gas_hu``) and reach above the middle of the largest lung (stomach and bowel gas lie
   under the lung bases and are never connected to the lungs).
4. :func:`fill_pleural_space`: per slice and per lung, a closing and hole filling of the lung
   outline adds the dense tissue bounded by lung (dependent consolidation, effusion against
   the chest wall, dense lesions enclosed by lung) to the field as opacity.

All steps are numpy/scipy; the 3-D labellings run on a grid subsampled 2x in-plane and the
per-slice steps on crops around the lungs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungburden import labels as L

#: Room air and bowel gas are about -1000 HU; aerated lung about -850 (lung kernels reach
#: -950 only in a minority of voxels).
GAS_HU = -950.0
#: Air for the outside-air and airway tests (the lumen and the room, not lung parenchyma).
AIR_HU = -400.0


@dataclass(frozen=True)
class LungFieldRules:
    """Parameters of :func:`refine_lung_field` (lengths in mm, areas in cm²)."""

    #: Drop field voxels in air connected to the image edge (step 1).
    outside_air: bool = True
    #: Remove the trachea and main bronchi (step 2).
    airway: bool = True
    #: The airway lumen: in-plane smoothed HU below this.
    lumen_hu: float = -900.0
    #: A trachea candidate: this area range in the most cranial slices.
    trachea_area_cm2: tuple[float, float] = (0.7, 6.0)
    #: The airway stops where a branch's cross-section grows more than this factor ...
    leak_ratio: float = 2.2
    #: ... or beyond this area.
    max_area_cm2: float = 7.0
    #: ... or this far below the carina (the first slice where the airway splits in two).
    max_below_carina_mm: float = 25.0
    #: Rim around the lumen removed with it (the airway wall).
    wall_mm: float = 2.0
    #: Keep only the lung components (step 3).
    components: bool = True
    #: Other components are kept from this share of the largest one up.
    min_component_share: float = 0.1
    #: Components with a median HU at or below this are gas, not lung.
    gas_hu: float = GAS_HU
    #: Per-lung closing radius of the pleural-space fill (step 4; 0 turns it off).
    pleural_fill_mm: float = 6.0
    #: Holes enclosed by one lung are filled up to this area (a dome of the liver, spleen or
    #: stomach ringed by the lung base is larger).
    max_hole_cm2: float = 6.0
    #: Tissue added by the fill above this HU is opacity; below it, aerated lung.
    fill_opacity_hu: float = -500.0


def refine_lung_field(labels: np.ndarray, hu: np.ndarray, affine: np.ndarray,
                      rules: LungFieldRules = LungFieldRules()) -> np.ndarray:
    """Apply the lung-field rules of the module docstring to a label map, in place; returns
    ``labels``. ``affine``: index ``(slice, row, col)`` → LPS mm (gives voxel size and which end
    of the series is cranial)."""
    if not labels.size or not (labels >= L.LUNG).any():
        return labels
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    excluded = outside_air_mask(hu) if rules.outside_air else np.zeros(hu.shape, bool)
    if rules.airway:
        airway = airway_mask(hu, affine, rules)
        if airway is not None:
            excluded |= airway
    labels[excluded] = L.BACKGROUND
    if rules.components:
        select_lung_components(labels, hu, affine, rules)
    if rules.pleural_fill_mm > 0:
        fill_pleural_space(labels, hu, float(spacing[1]), rules, excluded)
    return labels


def _coarse_to_full(coarse: np.ndarray, shape: tuple[int, ...], step: int) -> np.ndarray:
    """A mask on the ``step``-subsampled in-plane grid broadcast back to the full grid."""
    full = np.repeat(np.repeat(coarse, step, axis=1), step, axis=2)
    return full[:, :shape[1], :shape[2]]


def outside_air_mask(hu: np.ndarray, step: int = 2, air_hu: float = AIR_HU, gas_hu: float = GAS_HU) -> np.ndarray:
    """Air (HU < ``air_hu``) whose 3-D component (6-connected, on the ``step``-subsampled grid)
    touches the in-plane image edge and is mostly gas (median HU <= ``gas_hu``): the room, the
    armpit folds and the air under the table. A lung cut by the field of view touches the edge
    too but is not mostly below ``gas_hu``, so it stays."""
    coarse = np.asarray(hu[:, ::step, ::step])
    air = coarse < air_hu
    components, count = ndimage.label(air)
    if not count:
        return np.zeros(hu.shape, bool)
    edge = np.unique(np.concatenate([components[:, 0].ravel(), components[:, -1].ravel(),
                                     components[:, :, 0].ravel(), components[:, :, -1].ravel()]))
    edge = edge[edge > 0]
    outside = np.zeros(count + 1, bool)
    if edge.size:
        outside[edge[_gas_share(coarse, components, count, gas_hu)[edge] >= 0.5]] = True
    return _coarse_to_full(outside[components], hu.shape, step) & (np.asarray(hu) < air_hu)


def _gas_share(hu: np.ndarray, components: np.ndarray, count: int, gas_hu: float = GAS_HU) -> np.ndarray:
    """Per component (index 0 = background), the share of its voxels at or below ``gas_hu``
    (>= 0.5: median HU at or below ``gas_hu``)."""
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    gas = np.bincount(components.ravel(), weights=(hu <= gas_hu).ravel(), minlength=count + 1)
    return gas / np.maximum(sizes, 1)


def _cranial_order(affine: np.ndarray, n: int) -> np.ndarray:
    """Slice indices from the most cranial to the most caudal (LPS: +z is superior)."""
    return np.arange(n) if float(np.asarray(affine)[2, 0]) <= 0 else np.arange(n)[::-1]


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _find_trachea(hu: np.ndarray, order: np.ndarray, pixel_cm2: float, pixel_mm: float,
                  rules: LungFieldRules) -> tuple[int, np.ndarray] | None:
    """The most cranial slice (position in ``order``) with a trachea candidate, and its lumen: a
    2-D air component of the allowed area, roundish, within the middle third of the body's
    width, whose surrounding rim is soft tissue (median HU > -500; a bulla or the lung itself
    is surrounded by aerated lung)."""
    search = order[: max(3, int(np.ceil(0.4 * len(order))))]
    rim = _disk(max(2, int(round(3.0 / pixel_mm))))
    for pos, k in enumerate(search):
        body = ndimage.binary_fill_holes(hu[k] > -500)
        if body.sum() < 50:
            continue
        cols = np.flatnonzero(body.any(axis=0))
        left, right = cols[0], cols[-1]
        third = (right - left) / 3.0
        lumen = ndimage.uniform_filter(hu[k], 3) < rules.lumen_hu
        lumen &= body
        comps, count = ndimage.label(lumen)
        if not count:
            continue
        areas = np.bincount(comps.ravel())[1:] * pixel_cm2
        boxes = ndimage.find_objects(comps)
        best: tuple[float, np.ndarray] | None = None
        for i in np.flatnonzero((areas >= rules.trachea_area_cm2[0]) & (areas <= rules.trachea_area_cm2[1])):
            box = boxes[i]
            height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
            if max(height, width) > 2.5 * min(height, width):
                continue
            centre = 0.5 * (box[1].start + box[1].stop)
            if not left + third <= centre <= right - third:
                continue
            member = comps == i + 1
            shell = ndimage.binary_dilation(member, rim) & ~member
            if np.median(hu[k][shell]) <= -500:
                continue
            score = abs(centre - 0.5 * (left + right))
            if best is None or score < best[0]:
                best = (score, member)
        if best is not None:
            return pos, best[1]
    return None


def airway_mask(hu: np.ndarray, affine: np.ndarray, rules: LungFieldRules = LungFieldRules()) -> np.ndarray | None:
    """The trachea and main bronchi with their wall (module docstring, step 2), or None when no
    trachea is found in the cranial 40 % of the series."""
    affine = np.asarray(affine, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    pixel_mm = float(np.sqrt(spacing[1] * spacing[2]))
    pixel_cm2 = float(spacing[1] * spacing[2]) / 100.0
    order = _cranial_order(affine, hu.shape[0])
    found = _find_trachea(hu, order, pixel_cm2, pixel_mm, rules)
    if found is None:
        return None
    start, lumen = found
    out = np.zeros(hu.shape, bool)
    out[order[start]] = lumen
    branches = [lumen]
    carina_slice: int | None = None
    reach = int(round(20.0 / pixel_mm))
    grow = _disk(max(1, int(round(2.0 / pixel_mm))))
    for pos in range(start + 1, len(order)):
        k = order[pos]
        if carina_slice is not None and (pos - carina_slice) * spacing[0] > rules.max_below_carina_mm:
            break
        union = np.logical_or.reduce(branches)
        rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
        r0, r1 = max(rows[0] - reach, 0), min(rows[-1] + reach + 1, hu.shape[1])
        c0, c1 = max(cols[0] - reach, 0), min(cols[-1] + reach + 1, hu.shape[2])
        air = ndimage.uniform_filter(hu[k, r0:r1, c0:c1], 3) < rules.lumen_hu
        comps, count = ndimage.label(air)
        next_branches: list[np.ndarray] = []
        for branch in branches:
            near = ndimage.binary_dilation(branch[r0:r1, c0:c1], grow)
            for i in np.unique(comps[near & air]):
                member = comps == i
                area = member.sum() * pixel_cm2
                if area > rules.max_area_cm2 or area > rules.leak_ratio * max(branch.sum() * pixel_cm2, 0.3):
                    continue  # merged with lung air: the airway ends here on this branch
                full = np.zeros(hu.shape[1:], bool)
                full[r0:r1, c0:c1] = member
                if not any((full & b).any() for b in next_branches):
                    next_branches.append(full)
        if not next_branches:
            break
        if carina_slice is None and len(next_branches) >= 2:
            carina_slice = pos
        branches = next_branches[:2] if carina_slice is not None else [np.logical_or.reduce(next_branches)]
        for b in branches:
            out[k] |= b
    wall = _disk(max(1, int(round(rules.wall_mm / pixel_mm))))
    for k in np.flatnonzero(out.any(axis=(1, 2))):
        out[k] = ndimage.binary_dilation(out[k], wall)
    return out


def select_lung_components(labels: np.ndarray, hu: np.ndarray, affine: np.ndarray,
                           rules: LungFieldRules = LungFieldRules(), step: int = 2) -> np.ndarray:
    """Keep the lung components of the field (module docstring, step 3), in place; returns
    ``labels``. Components are 6-connected on the ``step``-subsampled grid; field voxels away
    from the kept components become background."""
    field = labels[:, ::step, ::step] >= L.LUNG
    components, count = ndimage.label(field)
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    gas = _gas_share(np.asarray(hu)[:, ::step, ::step], components, count, rules.gas_hu)[1:] >= 0.5
    largest = int(np.argmax(sizes))
    order = _cranial_order(affine, labels.shape[0])
    rank = np.empty(labels.shape[0], int)
    rank[order] = np.arange(labels.shape[0])  # 0 = most cranial
    zs = [np.flatnonzero(s) for s in np.moveaxis(
        np.stack([np.bincount(components[k].ravel(), minlength=count + 1)[1:] > 0
                  for k in range(labels.shape[0])]), 0, 1)]
    mid = np.median(rank[zs[largest]])
    keep = np.zeros(count + 1, bool)
    keep[largest + 1] = True
    for i in range(count):
        if i == largest:
            continue
        keep[i + 1] = (sizes[i] >= rules.min_component_share * sizes[largest] and not gas[i]
                       and rank[zs[i]].min() <= mid)
    # A full-grid voxel stays if its coarse cell or an in-plane neighbour is in a kept component
    # (the coarse grid misses the edge voxels of a component).
    kept = ndimage.binary_dilation(keep[components], structure=np.ones((1, 3, 3), bool))
    labels[~_coarse_to_full(kept, labels.shape, step)] = L.BACKGROUND
    return labels


def fill_pleural_space(labels: np.ndarray, hu: np.ndarray, pixel_mm: float,
                       rules: LungFieldRules = LungFieldRules(), excluded: np.ndarray | None = None,
                       step: int = 2) -> np.ndarray:
    """Per slice and per lung (2-D component of the field over 2 cm²), close the lateral half
    of the outline with a disk of ``pleural_fill_mm`` and fill its holes; added voxels above
    ``fill_opacity_hu`` become opacity (GGO, or high opacity above -100 HU), others aerated
    lung. In place; returns ``labels``. Lungs are closed one at a time and only on their
    lateral side, so the mediastinum, the hila and the heart border are never filled.
    ``excluded``: voxels never added (outside air, airway). The closing runs on the
    ``step``-subsampled grid, the labelling of added voxels on the full grid."""
    coarse_mm = pixel_mm * step
    radius = max(1, int(round(rules.pleural_fill_mm / coarse_mm)))
    disk = _disk(radius)
    min_px = 200.0 / coarse_mm ** 2
    pad = radius + 1
    rows, cols = labels.shape[1:]
    for k in np.flatnonzero((labels >= L.LUNG).any(axis=(1, 2))):
        field = labels[k, ::step, ::step] >= L.LUNG
        comps, count = ndimage.label(field)
        if not count:
            continue
        sizes = np.bincount(comps.ravel())[1:]
        add = np.zeros(field.shape, bool)
        for i, box in enumerate(ndimage.find_objects(comps)):
            if sizes[i] < min_px or box is None:
                continue
            r0, r1 = max(box[0].start - pad, 0), min(box[0].stop + pad, field.shape[0])
            c0, c1 = max(box[1].start - pad, 0), min(box[1].stop + pad, field.shape[1])
            member = comps[r0:r1, c0:c1] == i + 1
            padded = np.pad(member, pad)
            closed = ndimage.binary_erosion(ndimage.binary_dilation(padded, disk), disk)[pad:-pad, pad:-pad]
            holes = ndimage.binary_fill_holes(member) & ~member
            if holes.any():  # enclosed lesions, not a diaphragm dome ringed by the lung base
                parts, nparts = ndimage.label(holes)
                small = np.bincount(parts.ravel())[1:] * coarse_mm ** 2 <= rules.max_hole_cm2 * 100.0
                holes = np.concatenate([[False], small])[parts]
            # The lateral half of the lung only: medial concavities are the hilum, the heart
            # border and the mediastinum, not pleural space.
            centre = 0.5 * (box[1].start + box[1].stop)
            x = np.arange(c0, c1)
            lateral = x < centre if centre < 0.5 * field.shape[1] else x > centre
            add[r0:r1, c0:c1] |= (closed & lateral[None, :]) | holes
        # Dense tissue is added only as blobs (3 coarse pixels thick, 0.5 cm²): the
        # partial-volume rim along the chest wall is not consolidation.
        dense = add & ~field & (hu[k, ::step, ::step] > rules.fill_opacity_hu)
        dense = ndimage.binary_opening(dense, _disk(1))
        blobs, nblobs = ndimage.label(dense)
        if nblobs:
            big = np.bincount(blobs.ravel())[1:] * coarse_mm ** 2 >= 50.0
            dense = np.concatenate([[False], big])[blobs]
        add &= dense | (hu[k, ::step, ::step] <= rules.fill_opacity_hu)
        if not add.any():
            continue
        full = np.repeat(np.repeat(add, step, axis=0), step, axis=1)[:rows, :cols]
        sub = labels[k]
        added = full & (sub == L.BACKGROUND)
        if excluded is not None:
            added &= ~excluded[k]
        h = hu[k]
        sub[added & (h <= rules.fill_opacity_hu)] = L.LUNG
        sub[added & (h > rules.fill_opacity_hu) & (h <= -100)] = L.GGO
        sub[added & (h > -100)] = L.HIGH_OPACITY
    return labels
