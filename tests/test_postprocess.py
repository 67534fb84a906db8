"""Label finishing steps of the network segmenter (lungburden.segmentation.postprocess)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lungburden import labels as L
from lungburden.segmentation.postprocess import (
    GGOMargins,
    refine_ggo_margins,
    relabel_unlikely_high_opacity,
    remove_detached_opacities,
    remove_high_opacity_above_apex,
    remove_opacity_components,
    remove_small_opacities,
)

#: The GGO / aerated-lung rule alone (the GGO / high-opacity rule has its own test).
LUNG_ONLY = GGOMargins(lung_hu=(-760.0, -500.0), high_hu=None, steps=2)


def _disk(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    rr, cc = np.ogrid[:shape[0], :shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2


def _margin_case() -> tuple[np.ndarray, np.ndarray]:
    """Three slices of aerated lung (-850 HU) with a faint GGO patch (-700 HU, radius 9) that
    the 'network' labelled only out to radius 6, a vessel (-300 HU) and a consolidation with a
    partial-volume rim (-650 HU) labelled high opacity."""
    hu = np.full((3, 60, 60), -850.0, np.float32)
    labels = np.full(hu.shape, L.LUNG, np.uint8)
    labels[:, :, :2] = L.BACKGROUND
    hu[:, :, :2] = 40.0
    hu[:, _disk((60, 60), (20, 20), 9)] = -700.0
    labels[:, _disk((60, 60), (20, 20), 6)] = L.GGO
    hu[:, 20, 29:33] = -300.0  # a vessel leaving the patch
    hu[:, _disk((60, 60), (45, 45), 8)] = -650.0  # consolidation rim ...
    hu[:, _disk((60, 60), (45, 45), 6)] = 20.0  # ... and core
    labels[:, _disk((60, 60), (45, 45), 6)] = L.HIGH_OPACITY
    return hu, labels


def test_ggo_margin_grows_into_faint_ggo_by_at_most_the_steps() -> None:
    hu, labels = _margin_case()
    before = labels.copy()
    out = refine_ggo_margins(labels, hu, LUNG_ONLY)
    assert out is labels
    ggo = out[1] == L.GGO
    grown = ggo & (before[1] != L.GGO)
    assert grown.any()
    # Only lung voxels at faint-GGO HU changed, each within 2 in-plane steps of the old edge.
    assert (before[1][grown] == L.LUNG).all() and (hu[1][grown] == -700.0).all()
    assert ggo[_disk((60, 60), (20, 20), 6.0)].all() and ggo[20, 14 - 2] and not ggo[20, 14 - 3]
    # The vessel (-300 HU) is too dense for faint GGO; the consolidation's rim is not grown.
    assert not ggo[20, 29:33].any()
    assert (out[1][_disk((60, 60), (45, 45), 8) & ~_disk((60, 60), (45, 45), 6)] == L.LUNG).all()
    # Everything outside the GGO range is untouched.
    changed = out != before
    assert (hu[changed] == -700.0).all()
    # Per slice: each slice alone gives the same result (the label writer works in chunks).
    hu2, per_slice = _margin_case()
    for k in range(3):
        refine_ggo_margins(per_slice[k:k + 1], hu2[k:k + 1], LUNG_ONLY)
    np.testing.assert_array_equal(per_slice, out)


def test_ggo_margin_shrinks_over_aerated_lung_and_can_be_disabled() -> None:
    hu = np.full((1, 30, 30), -850.0, np.float32)
    labels = np.full(hu.shape, L.LUNG, np.uint8)
    labels[0, _disk((30, 30), (15, 15), 8)] = L.GGO  # the network's GGO ...
    hu[0, _disk((30, 30), (15, 15), 5)] = -600.0  # ... is faint GGO only out to radius 5
    before = labels.copy()
    assert (refine_ggo_margins(labels.copy(), hu, GGOMargins(steps=0)) == before).all()
    out = refine_ggo_margins(labels, hu, LUNG_ONLY)
    ggo = out[0] == L.GGO
    assert ggo[_disk((30, 30), (15, 15), 5)].all()
    # Two steps of the aerated rim went back to lung; what lies deeper stays GGO.
    assert out[0, 15, 15 + 8] == L.LUNG and out[0, 15, 15 + 7] == L.LUNG and out[0, 15, 15 + 6] == L.GGO
    no_ggo = np.full((2, 5, 5), L.LUNG, np.uint8)
    assert (refine_ggo_margins(no_ggo, np.zeros((2, 5, 5))) == L.LUNG).all()


def test_detached_opacities_are_removed_unless_large() -> None:
    labels = np.zeros((12, 60, 60), np.uint8)
    labels[:, 10:50, 5:28] = L.LUNG  # right lung
    labels[:, 10:50, 32:55] = L.LUNG  # left lung
    labels[3:6, 20:25, 10:15] = L.HIGH_OPACITY  # 75 voxels inside the right lung: kept
    labels[3:6, 0:4, 0:4] = L.HIGH_OPACITY  # 48 voxels in soft tissue, no lung around: removed
    # 8 x 8 x 3 voxels in the chest wall touching the lung along a 4-voxel edge: contact < 10 %.
    labels[0:3, 50:58, 0:8] = L.HIGH_OPACITY
    labels[:, 10:50, 32:55] = L.GGO  # the whole left lung opaque: no lung to touch, but large
    before = labels.copy()
    out = remove_detached_opacities(labels, voxel_ml=0.01, max_ml=5.0, min_contact=0.1)  # 500 voxels
    assert out is labels
    assert (out[3:6, 20:25, 10:15] == L.HIGH_OPACITY).all()
    assert not out[3:6, 0:4, 0:4].any()
    assert not out[0:3, 50:58, 0:8].any()
    assert (out[:, 10:50, 32:55] == L.GGO).all()
    # The same chest-wall block counts as attached at a 1 % contact floor; 0 mL disables.
    again = remove_detached_opacities(before.copy(), voxel_ml=0.01, max_ml=5.0, min_contact=0.01)
    assert (again[0:3, 50:58, 0:8] == L.HIGH_OPACITY).all() and not again[3:6, 0:4, 0:4].any()
    assert (remove_detached_opacities(before.copy(), 0.01, max_ml=0.0) == before).all()


def _noisy_labels(seed: int, speck_rate: float) -> np.ndarray:
    """Lungs with blob-shaped opacities of all sizes, inside and outside the lungs, plus
    scattered one-voxel specks (``speck_rate`` of the voxels)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((24, 64, 64), np.uint8)
    labels[2:22, 8:56, 4:30] = L.LUNG
    labels[2:22, 8:56, 34:60] = L.LUNG
    z, y, x = np.ogrid[:24, :64, :64]
    for _ in range(40):
        c, r = rng.integers(0, 64, 3), rng.uniform(0.8, 6.0)
        blob = ((z - c[0] % 24) / 1.5) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r ** 2
        labels[blob] = rng.choice([L.GGO, L.HIGH_OPACITY])
    specks = rng.random(labels.shape) < speck_rate
    labels[specks] = rng.choice([L.GGO, L.HIGH_OPACITY], size=int(specks.sum()))
    return labels


def _reference_two_steps(labels: np.ndarray, voxel_ml: float, min_ml: float, max_ml: float,
                         contact: float) -> np.ndarray:
    """The speck and detached-opacity rules written plainly (whole-array masks, one labelling per
    step): specks under ``min_ml`` become lung if they touch lung, else background; then
    components under ``max_ml`` with under ``contact`` of their 26-neighbour shell on lung (or
    none) become background."""
    cube = np.ones((3, 3, 3), bool)
    out = labels.copy()
    for step in ("specks", "detached"):
        if (min_ml if step == "specks" else max_ml) <= 0:
            continue
        components, count = ndimage.label(out >= L.GGO, structure=cube)
        changes = []
        for index in range(1, count + 1):
            mask = components == index
            size_ml = mask.sum() * voxel_ml
            shell = ndimage.binary_dilation(mask, structure=cube) & ~mask
            on_lung = int((out[shell] == L.LUNG).sum())
            if step == "specks" and size_ml < min_ml:
                changes.append((mask, L.LUNG if on_lung else L.BACKGROUND))
            elif step == "detached" and size_ml < max_ml and (on_lung == 0 or on_lung < contact * shell.sum()):
                changes.append((mask, L.BACKGROUND))
        for mask, value in changes:
            out[mask] = value
    return out


def test_one_labelling_gives_the_two_steps_in_turn() -> None:
    """remove_opacity_components (the segmenter's path) and its two wrappers against the rules
    written plainly; with few specks (per-speck loop) and many (whole-array passes)."""
    for seed, speck_rate in ((0, 0.0005), (2, 0.01)):
        labels = _noisy_labels(seed, speck_rate)
        for min_ml, max_ml, contact in ((0.05, 1.0, 0.1), (0.2, 5.0, 0.3), (0.0, 1.0, 0.1), (0.05, 0.0, 0.1)):
            expected = _reference_two_steps(labels, 0.001, min_ml, max_ml, contact)
            assert (expected != labels).any()
            one = remove_opacity_components(labels.copy(), 0.001, min_ml, max_ml, contact)
            assert (one == expected).all(), (seed, min_ml, max_ml, contact)
            two = remove_detached_opacities(remove_small_opacities(labels.copy(), 0.001, min_ml), 0.001,
                                            max_ml, contact)
            assert (two == expected).all(), (seed, min_ml, max_ml, contact)


def _axial_affine(cranial_first: bool) -> np.ndarray:
    """5 mm slices of 1 mm pixels; slice index runs feet-ward (the loader's order) or head-ward."""
    affine = np.diag([-5.0 if cranial_first else 5.0, 1.0, 1.0, 1.0])
    affine[:3, :3] = affine[[2, 1, 0]][:3, :3]  # slice axis -> z, rows -> y, columns -> x
    return affine


def test_high_opacity_above_the_apex_is_dropped() -> None:
    labels = np.zeros((8, 40, 40), np.uint8)
    labels[3:, 10:30, 10:30] = L.LUNG  # the apex is slice 3 (4 cm² of lung)
    labels[2, 8:10, 8:10] = L.LUNG  # 0.04 cm² of 'lung' (trachea) above it does not count
    labels[0:3, 12:18, 12:18] = L.HIGH_OPACITY  # thoracic inlet soft tissue called consolidation
    labels[1, 20:22, 20:22] = L.GGO
    labels[5, 15:20, 15:20] = L.HIGH_OPACITY  # a real consolidation below the apex
    before = labels.copy()
    out = remove_high_opacity_above_apex(labels, _axial_affine(cranial_first=True), min_lung_cm2=1.0)
    assert out is labels
    assert not (out[0:3] == L.HIGH_OPACITY).any() and (out[1, 20:22, 20:22] == L.GGO).all()
    assert (out[3:] == before[3:]).all()
    # Slices stored feet first: the same anatomy reversed gives the same result reversed.
    flipped = remove_high_opacity_above_apex(before[::-1].copy(), _axial_affine(cranial_first=False), 1.0)
    np.testing.assert_array_equal(flipped[::-1], out)
    # Disabled, without any apex, or for a non-axial stack: unchanged.
    assert (remove_high_opacity_above_apex(before.copy(), _axial_affine(True), 0.0) == before).all()
    assert (remove_high_opacity_above_apex(before.copy(), _axial_affine(True), 1000.0) == before).all()
    sagittal = np.diag([1.0, 1.0, 1.0, 1.0])  # slice axis along x
    assert (remove_high_opacity_above_apex(before.copy(), sagittal, 1.0) == before).all()


def test_high_opacity_specks_and_fat_take_their_surroundings_label() -> None:
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[:, 5:35, 5:35] = L.LUNG
    labels[1:5, 8:18, 8:18] = L.GGO
    labels[2:3, 12:14, 12:14] = L.HIGH_OPACITY  # 4 voxels in a GGO patch: GGO
    labels[2:3, 25:27, 25:27] = L.HIGH_OPACITY  # 4 voxels in aerated lung: lung
    labels[0:1, 0:2, 0:2] = L.HIGH_OPACITY  # 4 voxels outside: background
    labels[1:5, 26:33, 8:15] = L.HIGH_OPACITY  # 196 voxels: a consolidation, kept
    fat = (slice(1, 5), slice(18, 22), slice(18, 25))  # 112 voxels at -100 HU, in lung, touching GGO
    labels[fat] = L.HIGH_OPACITY
    hu = np.full(labels.shape, 20.0, np.float32)
    hu[fat] = -100.0
    hu[1:5, 18:22, 18] = 30.0  # a soft-tissue rim does not change its median
    before = labels.copy()
    out = relabel_unlikely_high_opacity(labels, hu, voxel_ml=0.01, min_ml=0.5, fat_median_hu=-60.0)  # 50 voxels
    assert out is labels
    assert (out[2, 12:14, 12:14] == L.GGO).all() and (out[2, 25:27, 25:27] == L.LUNG).all()
    assert not out[0, 0:2, 0:2].any() and (out[1:5, 26:33, 8:15] == L.HIGH_OPACITY).all()
    assert before[1, 17, 17] == L.GGO  # a corner of its surface is GGO
    assert (out[fat] == L.LUNG).all()  # most of its surface is lung
    assert np.count_nonzero(out != before) == 12 + 112
    # A consolidation just above the fat median is kept; both tests can be turned off.
    hu[fat] = -55.0
    assert (relabel_unlikely_high_opacity(before.copy(), hu, 0.01, 0.5, -60.0)[fat] == L.HIGH_OPACITY).all()
    hu[fat] = -100.0
    only_fat = relabel_unlikely_high_opacity(before.copy(), hu, 0.01, 0.0, -60.0)
    assert only_fat[2, 12, 12] == L.HIGH_OPACITY and (only_fat[fat] == L.LUNG).all()
    only_specks = relabel_unlikely_high_opacity(before.copy(), hu, 0.01, 0.5, None)
    assert only_specks[2, 12, 12] == L.GGO and (only_specks[fat] == L.HIGH_OPACITY).all()
    assert (relabel_unlikely_high_opacity(before.copy(), hu, 0.01, 0.0, None) == before).all()


def test_ggo_high_opacity_boundary_follows_attenuation() -> None:
    """A consolidation (20 HU) with a hazy rim (-400 HU) inside a GGO patch (-600 HU): the
    network's high opacity covers the rim and misses a dense rim outside it."""
    hu = np.full((1, 40, 40), -850.0, np.float32)
    labels = np.full(hu.shape, L.LUNG, np.uint8)
    hu[0, _disk((40, 40), (20, 20), 15)] = -600.0
    labels[0, _disk((40, 40), (20, 20), 15)] = L.GGO
    hu[0, _disk((40, 40), (20, 20), 8)] = -400.0  # hazy: GGO
    hu[0, _disk((40, 40), (20, 20), 6)] = 20.0  # consolidated ...
    hu[0, 20, 26:31] = 20.0  # ... with a tongue reaching 2 voxels past the network's high opacity
    labels[0, _disk((40, 40), (20, 20), 8)] = L.HIGH_OPACITY
    assert (labels[0, 20, 29:31] == L.GGO).all()
    before = labels.copy()
    out = refine_ggo_margins(labels, hu, GGOMargins(lung_hu=(-760.0, -500.0), high_hu=(-300.0, -100.0), steps=2))
    high = out[0] == L.HIGH_OPACITY
    assert high[_disk((40, 40), (20, 20), 6)].all()
    assert not high[_disk((40, 40), (20, 20), 8) & ~_disk((40, 40), (20, 20), 6) & (hu[0] == -400.0)].any()
    assert high[20, 26:31].all() and not high[20, 31]
    # The GGO / lung boundary is untouched (the patch's own HU is faint GGO, the lung aerated).
    assert ((out == L.LUNG) == (before == L.LUNG)).all()
    # Without the high-opacity rule, only the lung rule acts (here: nothing to do).
    again = refine_ggo_margins(before.copy(), hu, LUNG_ONLY)
    np.testing.assert_array_equal(again, before)


def test_in_plane_dilation_matches_scipy() -> None:
    from scipy import ndimage

    from lungburden.segmentation.masks import PLANE, dilate_in_plane

    mask = np.random.default_rng(0).random((4, 30, 20)) < 0.05
    np.testing.assert_array_equal(dilate_in_plane(mask), ndimage.binary_dilation(mask, structure=PLANE))
