"""Synthetic chest CT phantom (lungburden.phantom): anatomy, lesions, truth, DICOM output,
lesion insertion into a real CT. Small phantoms (24 slices, 256x256) keep the file fast."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import ndimage

from lungburden import labels as L
from lungburden.dicom_io.volume import load_files
from lungburden.phantom import (
    KIND_CONSOLIDATION,
    KIND_EFFUSION,
    KIND_GGO,
    PhantomSpec,
    generate_phantom,
    insert_lesions,
    lps_from_ras,
    lung_mask_from_hu,
    phantom_quantities,
    write_phantom_series,
)
from lungburden.quantify import left_lung_mask, quantify

REAL_CROP = SHARED_DATA / "real-ct/totalsegmentator-chest-crops/chest-crop-1.nii.gz"


def small(seed: int = 3, **kw) -> PhantomSpec:
    return PhantomSpec(seed=seed, slices=kw.pop("slices", 24), rows=256, cols=256, **kw)


@pytest.fixture(scope="module")
def sick():
    return generate_phantom(small(seed=11, burden_percent=30.0, contrast=True))


def test_deterministic_per_seed():
    a = generate_phantom(small(seed=5))
    b = generate_phantom(small(seed=5))
    c = generate_phantom(small(seed=6))
    for name in ("hu", "labels", "left_lung", "lesion_kinds", "affine"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.hu.dtype == np.int16 and a.labels.dtype == np.uint8 and a.hu.shape == (24, 256, 256)
    assert not np.array_equal(a.hu, c.hu)


def test_anatomy_varies_with_seed_and_scales_with_fov():
    vols = {s: phantom_quantities(generate_phantom(small(seed=s, burden_percent=0.0))).lung_volume_ml for s in range(4)}
    assert len(set(vols.values())) == 4
    assert max(vols.values()) > 1.15 * min(vols.values())
    # Same seed on a 2x finer matrix: the same anatomy in mm, so nearly the same lung volume.
    coarse = phantom_quantities(generate_phantom(small(seed=2, burden_percent=0.0, slices=16))).lung_volume_ml
    fine = PhantomSpec(seed=2, slices=16, rows=512, cols=512, burden_percent=0.0)
    assert phantom_quantities(generate_phantom(fine)).lung_volume_ml == pytest.approx(coarse, rel=0.03)


def test_geometry_matches_ctvolume_convention(sick):
    aff = sick.affine
    assert aff[2, 0] < 0, "first slice must be the most superior"
    assert aff[1, 1] > 0 and aff[0, 2] > 0, "rows run posterior, columns run to the patient's left"
    assert np.linalg.det(aff[:3, :3]) > 0


def test_lungs_labels_and_sides(sick):
    lab = sick.labels
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    field = lab > 0
    # Lesion kinds exactly where labels 2/3 are.
    assert np.array_equal(lab == L.GGO, sick.lesion_kinds == KIND_GGO)
    assert np.array_equal(lab == L.HIGH_OPACITY, sick.lesion_kinds >= KIND_CONSOLIDATION)
    # Two lungs, one 6-connected component each, separated by the mediastinum in every slice.
    comps, count = ndimage.label(field)
    assert count == 2
    assert np.array_equal(sick.left_lung, left_lung_mask(lab, sick.affine))
    for k in range(lab.shape[0]):
        left_cols = np.flatnonzero(sick.left_lung[k].any(axis=0))
        right_cols = np.flatnonzero((field[k] & ~sick.left_lung[k]).any(axis=0))
        if left_cols.size and right_cols.size:
            assert left_cols.min() > right_cols.max() + 1
    # The lung field lies inside the body: never touches the image border or outside air.
    assert not field[:, 0, :].any() and not field[:, :, 0].any() and not field[:, -1, :].any()
    air = ndimage.label(sick.hu < -900)[0]
    outside = air == air[0, 0, 0]
    assert outside[0, 0, 0] and not (ndimage.binary_dilation(field) & outside).any()
    # Healthy parts look like aerated lung.
    assert np.median(sick.hu[lab == L.LUNG]) < -700


def test_lesion_hu_ranges_noise_free():
    # Thin slices: no partial-volume averaging (see test_thick_slices_average_sub_slices).
    ph = generate_phantom(small(seed=4, slices=72, slice_spacing_mm=1.25, burden_percent=40.0, noise_scale=0.0))
    kinds, hu = ph.lesion_kinds, ph.hu
    ggo = hu[kinds == KIND_GGO]
    assert ggo.size and -700 <= np.median(ggo) <= -350
    assert np.mean((ggo >= -750) & (ggo <= -300)) > 0.85  # the rest: preserved vessels in GGO
    cons = hu[kinds == KIND_CONSOLIDATION]
    assert cons.size and cons.min() >= -100 and cons.max() <= 100
    eff = generate_phantom(small(seed=4, slices=72, slice_spacing_mm=1.25, burden_percent=6.0, noise_scale=0.0,
                                 lesion_kinds=frozenset({"effusion"})))
    vals = eff.hu[eff.lesion_kinds == KIND_EFFUSION]
    assert vals.size and vals.min() >= 0 and vals.max() <= 30
    # Dependent: the effusion lies posterior (larger row index) to the average lung voxel.
    rows = np.nonzero(eff.labels > 0)[1].mean()
    assert np.nonzero(eff.lesion_kinds == KIND_EFFUSION)[1].mean() > rows + 10


def test_thick_slices_average_sub_slices():
    from lungburden.phantom.anatomy import make_grid, sample_anatomy, slice_subsamples, subslice_grid, thick_slices

    # The sub-slices of each output slice are centred on it.
    grid = make_grid(small(seed=5, slices=18), sample_anatomy(np.random.default_rng(0)))
    fine = subslice_grid(grid, 4)
    np.testing.assert_allclose(fine.z.reshape(-1, 4).mean(axis=1), grid.z, atol=1e-3)

    assert [slice_subsamples(t) for t in (0.625, 1.25, 2.0, 2.5, 3.0, 5.0, 10.0)] == [1, 1, 2, 2, 3, 4, 4]
    hu = np.array([-900, -900, 40, 40, -900, -900, -900, 60], dtype=np.float32).reshape(4, 1, 2)
    lab = np.array([1, 1, 0, 0, 1, 2, 2, 3], dtype=np.uint8).reshape(4, 1, 2)
    left = np.array([1, 0, 0, 0, 1, 0, 1, 1], dtype=bool).reshape(4, 1, 2)
    kinds = np.array([0, 0, 0, 0, 0, 1, 1, 2], dtype=np.uint8).reshape(4, 1, 2)
    t_hu, t_lab, t_left, t_kinds = thick_slices(hu, lab, left, kinds, 2)
    # HU: the mean of each pair of sub-slices (partial volume); truth: the majority, a tie going
    # to the central (here: second) sub-slice.
    assert t_hu.ravel().tolist() == [-430.0, -430.0, -900.0, -420.0]
    assert t_lab.ravel().tolist() == [0, 0, 2, 3]
    assert t_left.ravel().tolist() == [False, False, True, True]
    assert t_kinds.ravel().tolist() == [0, 0, 1, 2]
    # A noise-free 5 mm phantom without lesions: the diaphragm and vessels cut by the slab give
    # lung-labelled voxels of intermediate density that 1.25 mm slices do not have.
    thick = generate_phantom(small(seed=5, slices=18, burden_percent=0.0, noise_scale=0.0))
    thin = generate_phantom(small(seed=5, slices=72, slice_spacing_mm=1.25, burden_percent=0.0, noise_scale=0.0))

    def intermediate(ph):
        v = ph.hu[ph.labels == L.LUNG]
        return np.mean((v > -600) & (v < -200))

    assert intermediate(thick) > 1.2 * intermediate(thin)
    assert not (thick.labels >= L.GGO).any()
    # Still two lungs, one component each, after the majority vote.
    assert ndimage.label(thick.labels > 0)[1] == 2


def test_muscle_has_texture_and_fat_planes():
    from lungburden.phantom.anatomy import FAT, MUSCLE

    ph = generate_phantom(small(seed=6, slices=40, slice_spacing_mm=1.25, burden_percent=0.0, noise_scale=0.0))
    body_wall = ph.hu[:, 150:, :]  # posterior half: back muscle, ribs, spine, lung
    soft = body_wall[(body_wall > 0) & (body_wall < 100)]
    # Muscle HU varies around 45 (not one flat value) and thin fat planes run through it.
    assert soft.size > 1000 and np.count_nonzero(soft == int(MUSCLE)) < 0.1 * soft.size
    assert 5.0 < soft.std() < 25.0
    assert np.count_nonzero(ph.hu == int(FAT + 10.0)) > 0.02 * soft.size
    # The fat plane between the deep and the superficial back muscles (-80 HU).
    assert np.count_nonzero(body_wall == -80) > 200


def test_lesion_hu_with_noise_and_peripheral_bilateral(sick):
    q = phantom_quantities(sick)
    assert -750 <= q.ggo_mean_hu <= -300
    assert -100 <= q.high_opacity_mean_hu <= 100
    les = sick.labels >= L.GGO
    assert (les & sick.left_lung).sum() > 0 and (les & ~sick.left_lung).sum() > 0
    # Peripheral predominance: lesions are closer to the lung border than lung voxels on average.
    dist = ndimage.distance_transform_edt(sick.labels > 0, sampling=(5.0, 1.5625, 1.5625))
    assert dist[les].mean() < dist[sick.labels > 0].mean()


@pytest.mark.parametrize("target", [0.0, 3.0, 25.0, 60.0])
def test_burden_target_met(target):
    q = phantom_quantities(generate_phantom(small(seed=8, burden_percent=target)))
    assert q.burden_percent == pytest.approx(target, abs=0.5)


def test_random_burden_in_range():
    for seed in range(6):
        ph = generate_phantom(small(seed=seed, slices=16))
        assert 0.0 <= ph.burden_target_percent <= 60.5
        assert phantom_quantities(ph).burden_percent == pytest.approx(ph.burden_target_percent, abs=0.5)


def dciodvfy_messages(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def test_series_dciodvfy_and_truth_round_trip(sick, tmp_path):
    out = write_phantom_series(sick, tmp_path / "series", sick.spec)
    files = sorted(out.glob("CT*.dcm"))
    assert len(files) == sick.hu.shape[0]
    for f in (files[0], files[len(files) // 2], files[-1]):
        messages = dciodvfy_messages(f)
        errors = [m for m in messages if m.startswith("Error")]
        assert not errors, "\n".join(messages)
    truth = json.loads((out / "truth.json").read_text())
    vol = load_files(files)
    assert np.array_equal(vol.hu, sick.hu.astype(np.float32))
    np.testing.assert_allclose(vol.affine, sick.affine, atol=1e-6)
    img = nib.load(out / "labels.nii.gz")
    labels = np.asarray(img.dataobj)
    assert labels.shape == vol.hu.shape and np.array_equal(labels, sick.labels)
    np.testing.assert_allclose(lps_from_ras(img.affine), vol.affine, atol=1e-4)
    result = quantify(labels, vol.hu, vol.affine).to_dict()
    for key, value in result.items():
        assert truth[key] == value, key
    assert truth["study_instance_uid"] == vol.study_instance_uid
    assert truth["series_instance_uid"] == vol.series_instance_uid
    assert truth["seed"] == 11
    ds = vol.datasets[0]
    assert str(ds.PatientName) == "PHANTOM^SEED11"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.ContrastBolusAgent


def test_uids_deterministic(tmp_path):
    spec = small(seed=2, slices=16, burden_percent=5.0)
    a = write_phantom_series(generate_phantom(spec), tmp_path / "a")
    b = write_phantom_series(generate_phantom(spec), tmp_path / "b")
    ta, tb = (json.loads((d / "truth.json").read_text()) for d in (a, b))
    assert ta == tb
    other = write_phantom_series(generate_phantom(small(seed=3, slices=16, burden_percent=5.0)), tmp_path / "c")
    assert json.loads((other / "truth.json").read_text())["study_instance_uid"] != ta["study_instance_uid"]


@pytest.mark.skipif(not REAL_CROP.exists(), reason=f"real CT crop not found at {REAL_CROP}")
def test_insert_lesions_into_real_ct():
    img = nib.load(REAL_CROP)
    hu = np.asarray(img.dataobj)
    affine = lps_from_ras(img.affine)
    lung = lung_mask_from_hu(hu, affine)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert 500 < lung.sum() * voxel_ml < 6000
    assert np.median(hu[lung]) < -600
    res = insert_lesions(hu, affine, seed=1, burden_percent=20.0, lung_mask=lung)
    assert res.hu.dtype == hu.dtype and res.hu.shape == hu.shape
    lesions = res.lesion_kinds > 0
    assert lesions.any()
    assert not (lesions & ~lung).any()
    assert not ((res.hu != hu) & ~lung).any()
    assert np.array_equal(res.labels > 0, lung)
    burden = 100.0 * (res.labels >= L.GGO).sum() / lung.sum()
    assert burden == pytest.approx(20.0, abs=0.5)
    assert -750 <= res.hu[res.labels == L.GGO].mean() <= -300
    # Same seed, same result.
    again = insert_lesions(hu, affine, seed=1, burden_percent=20.0, lung_mask=lung)
    assert np.array_equal(again.hu, res.hu) and np.array_equal(again.labels, res.labels)


def test_scan_above_the_apices_shows_shoulder_girdle_and_neck():
    """``neck_mm`` reaches the scan above the apices: the extra slices hold no lung, and the
    shoulder girdle (wider body, humeral heads, supraclavicular air) replaces the thorax there."""
    kw = dict(seed=4, slices=60, slice_spacing_mm=5.0, burden_percent=0.0, noise_scale=0.0, fov_mm=520.0)
    base = generate_phantom(small(**kw))
    neck = generate_phantom(small(**kw, neck_mm=70.0))
    # The slab is centred on [lowest diaphragm - 25 mm, apices + neck_mm]: half the extra reach.
    assert neck.affine[2, 3] - base.affine[2, 3] == pytest.approx(25.0)
    lung_rows = np.flatnonzero((neck.labels > 0).reshape(60, -1).any(1))
    assert lung_rows[0] >= 6  # at least 30 mm of body above the first lung slice

    def width(k: int) -> int:  # body width (pixels) through the middle row
        return int(np.ptp(np.flatnonzero(neck.hu[k, 128] > -300)))

    top, chest = lung_rows[0] - 1, lung_rows[0] + 20
    assert width(top) > 1.1 * width(chest)  # shoulders wider than the chest
    assert (neck.hu[top] > 300).sum() > 50  # bone of the shoulder girdle (humeral heads, clavicles)
    def front(k: int, col: int) -> int:  # first body row (anterior surface) of a column
        return int(np.flatnonzero(neck.hu[k, :, col] > -300)[0])

    # Supraclavicular fossae: beside the neck the anterior surface lies > 26 mm deeper than at the
    # midline (the body ellipse alone gives ~16 mm there).
    assert min(front(0, c) - front(0, 128) for c in (74, 182)) > 13
    assert "neck=55.0" in small(seed=4, neck_mm=55.0).key() and "neck" not in small(seed=4).key()


def test_zone_involvement_agrees_with_truth_within_two_points(sick, tmp_path):
    """Zones from the written series (DICOM geometry, automatic left/right split) against the
    phantom's own lungs cut in thirds of their height in mm, and against the same anatomy on
    2.5 mm slices: every zone within 2 points."""
    out = write_phantom_series(sick, tmp_path / "series", sick.spec)
    vol = load_files(sorted(out.glob("CT*.dcm")))
    labels = np.asarray(nib.load(out / "labels.nii.gz").dataobj)
    measured = quantify(labels, vol.hu, vol.affine).zones
    truth = json.loads((out / "truth.json").read_text())["zones"]
    assert truth["total_score"] == measured.total_score and len(truth["zones"]) == 6
    dz = sick.spec.slice_spacing_mm
    z = sick.affine[2, 0] * np.arange(sick.labels.shape[0]) + sick.affine[2, 3]  # slice centres (mm)
    for lung, mask in (("right", (sick.labels > 0) & ~sick.left_lung), ("left", sick.left_lung)):
        present = mask.any(axis=(1, 2))
        top, bottom = z[present].max() + dz / 2, z[present].min() - dz / 2
        cuts = (top - (top - bottom) / 3, top - 2 * (top - bottom) / 3)
        for name, inside in (("upper", z > cuts[0]), ("middle", (z <= cuts[0]) & (z > cuts[1])),
                             ("lower", z <= cuts[1])):
            zone_lung = mask & inside[:, None, None]
            expected = 100.0 * np.count_nonzero(zone_lung & (sick.labels >= L.GGO)) / np.count_nonzero(zone_lung)
            assert measured.zone(lung, name).involvement_percent == pytest.approx(expected, abs=2.0)
    thin_spec = small(seed=11, burden_percent=30.0, contrast=True, slices=48, slice_spacing_mm=2.5)
    thin = phantom_quantities(generate_phantom(thin_spec)).zones
    for a, b in zip(measured.zones, thin.zones, strict=True):
        assert (a.lung, a.zone) == (b.lung, b.zone)
        assert a.involvement_percent == pytest.approx(b.involvement_percent, abs=2.0)
