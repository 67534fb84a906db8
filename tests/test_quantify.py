"""Quantification: volumes from the true voxel geometry, burden as in the paper, left/right split."""

from __future__ import annotations

import numpy as np
import pytest

from lungburden import labels as L
from lungburden.quantify import left_lung_mask, quantify


def _axial_affine(slice_mm=1.0, row_mm=1.0, col_mm=1.0, col_sign=1.0) -> np.ndarray:
    """(slice, row, column) -> LPS with columns along x, rows along y, slices along z."""
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = col_sign * col_mm, row_mm, slice_mm, 1.0
    return affine


def _two_lungs(shape=(10, 40, 60)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[:, 10:30, 5:25] = L.LUNG  # image columns 5..24: low x = patient right (LPS)
    labels[:, 10:30, 35:50] = L.LUNG  # columns 35..49: patient left
    return labels


def test_volumes_burden_and_means_exact():
    labels = _two_lungs()
    labels[2:4, 12:16, 6:10] = L.GGO  # 2*4*4 = 32 voxels in the right lung
    labels[5:6, 20:22, 40:45] = L.HIGH_OPACITY  # 1*2*5 = 10 voxels in the left lung
    hu = np.full(labels.shape, -850.0, np.float32)
    hu[labels == L.GGO] = -500.0
    hu[labels == L.HIGH_OPACITY] = 20.0
    affine = _axial_affine(2.5, 0.5, 0.8)  # voxel = 1 mm3 = 0.001 mL
    affine[:3, 3] = [-100, 40, -200]
    q = quantify(labels, hu, affine)
    right, left = 10 * 20 * 20, 10 * 20 * 15
    assert q.lung_volume_ml == pytest.approx((right + left) / 1000)
    assert q.right_lung_volume_ml == pytest.approx(right / 1000)
    assert q.left_lung_volume_ml == pytest.approx(left / 1000)
    assert q.ggo_volume_ml == pytest.approx(0.032)
    assert q.high_opacity_volume_ml == pytest.approx(0.010)
    assert q.opacity_volume_ml == pytest.approx(0.042)
    assert q.burden_percent == pytest.approx(round(100 * 42 / (right + left), 3))
    assert (q.ggo_mean_hu, q.high_opacity_mean_hu, q.lung_mean_hu) == (-500.0, 20.0, -850.0)


def test_left_is_positive_x_even_with_flipped_columns():
    labels = _two_lungs()
    flipped = _axial_affine(col_sign=-1.0)  # column index increases towards patient right
    assert left_lung_mask(labels, _axial_affine())[:, 20, 40].all()
    assert not left_lung_mask(labels, flipped)[:, 20, 40].any()
    assert left_lung_mask(labels, flipped)[:, 20, 10].all()


def test_single_merged_lung_field_split_at_midline():
    labels = np.zeros((4, 10, 20), np.uint8)
    labels[:, 2:8, 2:18] = L.LUNG  # one component
    left = left_lung_mask(labels, _axial_affine())
    assert left.sum() == 4 * 6 * 8 and left[:, 2:8, 10:18].all()


def test_empty_lung_gives_zero_burden_and_no_means():
    q = quantify(np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4), np.float32), np.eye(4))
    assert q.burden_percent == 0.0 and q.lung_volume_ml == 0.0 and q.ggo_mean_hu is None


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        quantify(np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 5), np.float32), np.eye(4))


def test_lungs_joined_by_airway_are_split_at_the_plane():
    labels = _two_lungs()
    labels[:, 18:20, 25:35] = L.LUNG  # a bridge: both lungs are one component
    q = quantify(labels, np.zeros(labels.shape, np.float32), _axial_affine())
    # The plane lies between the lungs, so each lung keeps its own voxels (+ part of the bridge).
    assert 3.0 < q.left_lung_volume_ml < 3.2 and 4.0 < q.right_lung_volume_ml < 4.2


# --------------------------------------------------------------------------- lung zones


def test_zone_score_bands():
    from lungburden.quantify import zone_score

    assert [zone_score(p) for p in (0.0, 0.1, 4.99, 5.0, 25.0, 25.5, 50.0, 50.5, 75.0, 75.1, 100.0)] == [
        0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert zone_score(3.0, opacity_voxels=0) == 0


def test_zones_are_equal_height_thirds_of_each_lung():
    """Each lung's extent along z is cut into thirds; lungs of different heights get their own cuts."""
    labels = np.zeros((30, 40, 60), np.uint8)
    labels[:, 10:30, 5:25] = L.LUNG  # right lung: 30 slices -> zones of 10 slices
    labels[6:30, 10:30, 35:50] = L.LUNG  # left lung: slices 6-29 -> zones of 8 slices
    labels[0:10, 10:20, 5:25] = L.GGO  # right upper zone: half of it
    labels[22:30, 10:30, 35:50] = L.HIGH_OPACITY  # left lower zone: all of it
    labels[13, 10, 35] = L.GGO  # one voxel on the last slice of the left upper zone (slices 6-13)
    affine = _axial_affine(2.0)
    affine[2, 0], affine[2, 3] = -2.0, 100.0  # first slice most superior, as CTVolume
    q = quantify(labels, np.zeros(labels.shape, np.float32), affine)
    zones = {(z.lung, z.zone): z for z in q.zones.zones}
    assert [z.lung_volume_ml for z in q.zones.zones] == pytest.approx(
        [8.0, 8.0, 8.0, 4.8, 4.8, 4.8])  # voxel 0.002 mL: 10 x 20 x 20 and 8 x 20 x 15 voxels
    assert zones["right", "upper"].involvement_percent == 50.0 and zones["right", "upper"].score == 3
    assert zones["right", "middle"].score == 0 and zones["right", "lower"].score == 0
    assert zones["left", "upper"].involvement_percent == pytest.approx(100 / 2400, abs=1e-3)
    assert zones["left", "upper"].score == 1
    assert zones["left", "lower"].involvement_percent == 100.0 and zones["left", "lower"].score == 5
    assert q.zones.total_score == 3 + 1 + 5
    # The same anatomy on a reversed slice order (first slice most inferior) gives the same zones.
    flipped = affine.copy()
    flipped[2, 0], flipped[2, 3] = 2.0, 100.0 - 2.0 * 29
    q2 = quantify(labels[::-1].copy(), np.zeros(labels.shape, np.float32), flipped)
    assert q2.zones == q.zones


def test_empty_lung_has_empty_zones():
    q = quantify(np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4), np.float32), np.eye(4))
    assert q.zones.total_score == 0 and len(q.zones.zones) == 6
    assert all(z.lung_volume_ml == 0.0 and z.score == 0 for z in q.zones.zones)
