"""Lung-field anatomy rules and the attenuation split of the opacity, on small synthetic chests."""

from __future__ import annotations

import numpy as np

from lungburden import labels as L
from lungburden.segmentation.lesion_regions import LesionRegions, refine_lesion_regions
from lungburden.segmentation.lung_field import (
    LungFieldRules,
    airway_mask,
    fill_pleural_space,
    outside_air_mask,
    refine_lung_field,
)
from lungburden.segmentation.opacity_split import OpacitySplit, split_opacity

SLICES, SIZE = 30, 128
#: index (slice, row, col) → LPS mm: 5 mm slices head to feet, 1 mm pixels.
AFFINE = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [-5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def _ellipse(rows: int, cols: int, r0: float, c0: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[:rows, :cols]
    return ((y - r0) / ry) ** 2 + ((x - c0) / rx) ** 2 <= 1.0


def chest() -> tuple[np.ndarray, np.ndarray]:
    """A body in room air with two lungs (slices 8-24) and a trachea (slices 0-12) that splits
    into two bronchi reaching the lungs; labels as a network that calls all air in the body
    lung would give them."""
    hu = np.full((SLICES, SIZE, SIZE), -1000.0, np.float32)
    body = _ellipse(SIZE, SIZE, 64, 64, 50, 60)
    hu[:, body] = 40.0
    left, right = _ellipse(SIZE, SIZE, 64, 36, 32, 20), _ellipse(SIZE, SIZE, 64, 92, 32, 20)
    for k in range(8, 25):
        hu[k][left | right] = -850.0
    trachea = _ellipse(SIZE, SIZE, 40, 64, 7, 7)
    for k in range(0, 11):
        hu[k][trachea] = -1000.0
    for k in range(11, 14):  # main bronchi towards each lung
        shift = 8 * (k - 10)
        hu[k][_ellipse(SIZE, SIZE, 42, 64 - shift, 5, 5)] = -1000.0
        hu[k][_ellipse(SIZE, SIZE, 42, 64 + shift, 5, 5)] = -1000.0
    labels = np.where((hu < -500) & body[None], L.LUNG, L.BACKGROUND).astype(np.uint8)
    return hu, labels


def test_trachea_connected_to_lungs_is_removed() -> None:
    hu, labels = chest()
    trachea = _ellipse(SIZE, SIZE, 40, 64, 7, 7)
    assert labels[5][trachea].all()  # the network's field holds the trachea
    airway = airway_mask(hu, AFFINE)
    assert airway is not None and airway[:11][:, trachea].all()
    refine_lung_field(labels, hu, AFFINE)
    assert not (labels[:11][:, trachea] >= L.LUNG).any()
    lungs = _ellipse(SIZE, SIZE, 64, 36, 32, 20) | _ellipse(SIZE, SIZE, 64, 92, 32, 20)
    assert (labels[16][lungs] == L.LUNG).mean() > 0.95  # the lungs stay


def test_gas_pocket_below_the_lungs_is_removed() -> None:
    hu, labels = chest()
    bowel = _ellipse(SIZE, SIZE, 70, 70, 12, 15)
    for k in range(26, 30):
        hu[k][bowel] = -1000.0
        labels[k][bowel] = L.LUNG
    refine_lung_field(labels, hu, AFFINE, LungFieldRules(airway=False))
    assert not (labels[26:] >= L.LUNG).any()
    assert (labels[16] == L.LUNG).sum() > 1000


def test_outside_air_fold_is_removed() -> None:
    hu, labels = chest()
    fold = np.zeros((SIZE, SIZE), bool)
    fold[60:64, 0:10] = True  # air reaching into the body from the edge of the image
    hu[:, fold] = -1000.0
    labels[:, fold] = L.LUNG
    assert outside_air_mask(hu)[:, fold].all()
    refine_lung_field(labels, hu, AFFINE)
    assert not (labels[:, fold] >= L.LUNG).any()


def test_dense_patch_against_the_chest_wall_is_included() -> None:
    hu, labels = chest()
    lung = _ellipse(SIZE, SIZE, 64, 36, 32, 20)
    patch = np.zeros((SIZE, SIZE), bool)
    patch[60:70, :30] = True
    patch &= lung  # a dense pocket at the chest wall, narrower than the closing disk
    for k in range(8, 25):
        hu[k][patch] = 30.0
        labels[k][patch] = L.BACKGROUND  # left out of the field by the network
    fill_pleural_space(labels, hu, 1.0, LungFieldRules())
    assert (labels[16][patch] >= L.GGO).mean() > 0.4  # the part inside the closed lung outline (0 without the fill)
    mediastinum = _ellipse(SIZE, SIZE, 64, 64, 20, 6)
    assert not (labels[16][mediastinum] >= L.LUNG).any()  # never bridged between the lungs


def test_split_relative_to_aerated_lung() -> None:
    hu, labels = chest()
    faint = _ellipse(SIZE, SIZE, 60, 30, 6, 6)
    dense = _ellipse(SIZE, SIZE, 60, 96, 6, 6)
    for k in range(8, 25):
        hu[k][faint], labels[k][faint] = -820.0, L.GGO  # hardly above the aerated lung
        hu[k][dense], labels[k][dense] = 20.0, L.GGO  # consolidation called GGO
    split_opacity(labels, hu, OpacitySplit())
    assert (labels[16][faint] == L.LUNG).all()
    assert (labels[16][dense] == L.HIGH_OPACITY).mean() > 0.8  # its smoothed rim is GGO


def test_heavily_involved_lung_keeps_its_ggo() -> None:
    """The aerated reference comes from the voxels labelled aerated lung: in a lung that is mostly
    GGO, a percentile of the whole field would be GGO and the GGO would be called aerated lung."""
    hu, labels = chest()
    field = labels >= L.LUNG
    ggo = field.copy()
    ggo[:, :, 52:76] = False  # a medial strip of each lung stays aerated
    hu[ggo], labels[ggo] = -650.0, L.GGO
    assert np.count_nonzero(labels == L.GGO) > 0.85 * np.count_nonzero(field)
    split_opacity(labels, hu, OpacitySplit(min_lung_contact=0.0))  # the reference step alone
    assert (labels[ggo] == L.GGO).mean() > 0.95


def test_opacity_without_lung_around_is_dropped() -> None:
    hu, labels = chest()
    muscle = _ellipse(SIZE, SIZE, 20, 64, 4, 8)  # soft tissue outside the lungs
    labels[16][muscle] = L.HIGH_OPACITY
    split_opacity(labels, hu, OpacitySplit())
    assert not (labels[16][muscle] >= L.GGO).any()


def test_large_consolidation_filling_a_lung_section_is_kept() -> None:
    hu, labels = chest()
    lung = _ellipse(SIZE, SIZE, 64, 36, 32, 20)  # ~20 cm² at 1 mm pixels
    hu[16][lung], labels[16][lung] = 20.0, L.HIGH_OPACITY  # the whole section consolidated
    muscle = _ellipse(SIZE, SIZE, 20, 64, 4, 8)
    labels[16][muscle] = L.HIGH_OPACITY
    split_opacity(labels, hu, OpacitySplit(max_detached_cm2=15.0), pixel_cm2=0.01)
    assert (labels[16][lung] == L.HIGH_OPACITY).mean() > 0.9  # removed without the size limit
    assert not (labels[16][muscle] >= L.GGO).any()  # small detached tissue still goes


def test_thin_opacity_is_removed_by_the_opening() -> None:
    hu, labels = chest()
    vessel = np.zeros((SIZE, SIZE), bool)
    vessel[50:80, 35:37] = True  # a 2 mm wide vessel along its length in the left lung
    rim = _ellipse(SIZE, SIZE, 64, 92, 32, 20) & ~_ellipse(SIZE, SIZE, 64, 92, 30, 18)  # pleural rim
    region = _ellipse(SIZE, SIZE, 64, 92, 8, 8)  # a pneumonic region 16 mm across
    for k in range(8, 25):
        for m in (vessel, rim, region):
            hu[k][m], labels[k][m] = -300.0, L.GGO
    refine_lesion_regions(labels, hu, AFFINE, LesionRegions(open_mm=2.0, close_mm=0.0))
    assert not (labels[16][vessel | rim] >= L.GGO).any()
    assert (labels[16][vessel | rim] == L.LUNG).all()  # still lung field
    assert (labels[16][region] == L.GGO).mean() > 0.95


def test_closing_joins_patches_into_a_region() -> None:
    hu, labels = chest()
    region = _ellipse(SIZE, SIZE, 64, 36, 10, 10)
    patches = region.copy()
    patches[:, ::4] = False  # crazy paving: opacity with aerated lines inside one region
    for k in range(8, 25):
        hu[k][region] = -500.0
        labels[k][patches] = L.GGO
    refine_lesion_regions(labels, hu, AFFINE, LesionRegions(open_mm=0.0, close_mm=3.0))
    assert (labels[16][region] == L.GGO).mean() > 0.95  # 0.75 without the closing
    assert not (labels[16][_ellipse(SIZE, SIZE, 64, 92, 30, 18)] >= L.GGO).any()  # nothing added elsewhere


def test_opacity_ringing_an_organ_dome_is_removed() -> None:
    hu, labels = chest()
    dome = _ellipse(SIZE, SIZE, 64, 92, 16, 12)  # the spleen's dome ringed by the lung base (6 cm²)
    ring = _ellipse(SIZE, SIZE, 64, 92, 20, 16) & ~dome  # partial-volume GGO around it
    lesion = _ellipse(SIZE, SIZE, 64, 36, 6, 6)  # a GGO region elsewhere in the lung
    k = 24
    hu[k][dome], labels[k][dome] = 50.0, L.BACKGROUND
    hu[k][ring | lesion], labels[k][ring | lesion] = -500.0, L.GGO
    refine_lesion_regions(labels, hu, AFFINE, LesionRegions(dome_min_cm2=4.0, open_mm=0.0, close_mm=0.0))
    assert (labels[k][ring] == L.LUNG).all()  # GGO without the dome rule
    assert (labels[k][lesion] == L.GGO).all()
    assert not (labels[k][dome] >= L.LUNG).any()
