"""Training data sources on tiny fixtures, augmentation alignment, folds, and a tiny training run."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from ct_builders import ct_slice
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lungburden import labels as L
from lungburden.training import data as D

SPACING = (5.0, 5.0, 5.0)

REAL_CT = SHARED_DATA / "real-ct"


# ------------------------------------------------------------------------------------ fixtures


def _chest(n: int = 16, size: int = 64) -> dict[str, np.ndarray]:
    """A tiny chest: air, a soft-tissue body, two -850 HU lungs, a -500 HU GGO blob in the right
    lung and a +20 HU consolidation blob in the left lung (all on a 5 mm grid, source order)."""
    z, y, x = np.mgrid[0:n, 0:size, 0:size].astype(float)
    zc, yc = (n - 1) / 2, size / 2
    body = ((y - yc) / (0.36 * size)) ** 2 + ((x - yc) / (0.45 * size)) ** 2 < 1
    right = ((z - zc) / (0.42 * n)) ** 2 + ((y - yc) / (0.22 * size)) ** 2 + ((x - 0.3 * size) / (0.12 * size)) ** 2 < 1
    left = ((z - zc) / (0.42 * n)) ** 2 + ((y - yc) / (0.22 * size)) ** 2 + ((x - 0.7 * size) / (0.12 * size)) ** 2 < 1
    lung = right | left
    ggo = right & (((z - zc) / 3) ** 2 + ((y - yc) / 5) ** 2 + ((x - 0.3 * size) / 4) ** 2 < 1)
    high = left & (((z - zc) / 2) ** 2 + ((y - yc - 3) / 4) ** 2 + ((x - 0.7 * size) / 3) ** 2 < 1)
    hu = np.full((n, size, size), -1000.0, np.float32)
    hu[body] = 40.0
    hu[lung] = -850.0
    hu[ggo] = -500.0
    hu[high] = 20.0
    return {"hu": hu, "lung": lung, "ggo": ggo, "high": high, "left": left, "right": right}


def _expected_labels(c: dict[str, np.ndarray]) -> np.ndarray:
    out = np.where(c["lung"], L.LUNG, L.BACKGROUND).astype(np.uint8)
    out[c["ggo"]] = L.GGO
    out[c["high"]] = L.HIGH_OPACITY
    return out


AFFINE_LPS = np.array([[0, 0, 5.0, -160.0], [0, 5.0, 0, -160.0], [-5.0, 0, 0, 40.0], [0, 0, 0, 1]])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


# ------------------------------------------------------------------------------------ NIfTI


def test_read_nifti_orientation(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 100, (5, 6, 7)).astype(np.int16)  # (i, j, k) with i→R, j→A, k→S
    nib.save(nib.Nifti1Image(a, np.diag([1.5, 1.5, 2.0, 1.0])), str(tmp_path / "x.nii.gz"))
    arr, affine = D.read_nifti(tmp_path / "x.nii.gz")
    assert arr.shape == (7, 6, 5)  # (slice, row, col)
    np.testing.assert_array_equal(arr, a[::-1, ::-1, ::-1].transpose(2, 1, 0))
    # columns go to patient left (+x LPS), rows posterior (+y), slices to the feet (-z)
    np.testing.assert_allclose(affine[:3, :3], [[0, 0, 1.5], [0, 1.5, 0], [-2.0, 0, 0]])
    D.write_nifti(tmp_path / "y.nii.gz", arr, affine)
    arr2, affine2 = D.read_nifti(tmp_path / "y.nii.gz")
    np.testing.assert_array_equal(arr2, arr)
    np.testing.assert_allclose(affine2, affine)


def test_label_map_parsing_and_errors():
    assert D.parse_label_map("1:ggo, 2:high,3:consolidation") == {1: "ggo", 2: "high", 3: "consolidation"}
    with pytest.raises(ValueError, match="unknown class"):
        D.parse_label_map("1:tumour")
    with pytest.raises(ValueError, match="VALUE:CLASS"):
        D.parse_label_map("ggo")
    hu = np.zeros((1, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"mask values \[4\]"):
        D.apply_label_map(np.array([[[0, 1], [4, 1]]]), {1: "ggo"}, hu)


def test_nifti_medseg_layout_with_lung_masks(tmp_path):
    c = _chest()
    root = tmp_path / "medseg"
    for d in ("rp_im", "rp_msk", "rp_lung_msk"):
        (root / d).mkdir(parents=True)
    D.write_nifti(root / "rp_im" / "1.nii.gz", c["hu"].astype(np.int16), AFFINE_LPS)
    mask = np.zeros(c["hu"].shape, np.uint8)
    mask[c["ggo"]] = 1
    mask[c["high"]] = 2  # consolidation
    D.write_nifti(root / "rp_msk" / "1.nii.gz", mask, AFFINE_LPS)
    D.write_nifti(root / "rp_lung_msk" / "1.nii.gz", (c["left"] * 1 + c["right"] * 2).astype(np.uint8), AFFINE_LPS)
    src = D.NiftiPairSource(root, "medseg")
    assert src.case_ids() == ["medseg-1"]
    case = src.load("medseg-1")
    np.testing.assert_array_equal(case.labels, _expected_labels(c))
    np.testing.assert_allclose(case.affine, AFFINE_LPS)
    np.testing.assert_array_equal(case.hu, c["hu"])


def test_nifti_mosmed_layout_lesion_split_and_derived_lung(tmp_path):
    c = _chest()
    root = tmp_path / "mosmed"
    (root / "studies" / "CT-1").mkdir(parents=True)
    (root / "masks").mkdir()
    D.write_nifti(root / "studies" / "CT-1" / "study_0001.nii.gz", c["hu"].astype(np.int16), AFFINE_LPS)
    D.write_nifti(root / "masks" / "study_0001_mask.nii.gz", (c["ggo"] | c["high"]).astype(np.uint8), AFFINE_LPS)
    (root / "studies" / "CT-1" / "study_0002.nii.gz").write_bytes(b"")  # no mask: not a case
    case = D.NiftiPairSource(root, "mosmed").load("mosmed-study_0001")
    np.testing.assert_array_equal(case.labels == L.GGO, c["ggo"])  # -500 HU → GGO
    np.testing.assert_array_equal(case.labels == L.HIGH_OPACITY, c["high"])  # +20 HU → high
    assert _dice(case.labels > 0, c["lung"]) > 0.9  # lung from lung_field_mask


def test_nifti_covid19ctseg_layout_and_custom_map(tmp_path):
    c = _chest()
    root = tmp_path / "c19"
    for d in ("COVID-19-CT-Seg_20cases", "Infection_Mask", "Lung_Mask"):
        (root / d).mkdir(parents=True)
    D.write_nifti(root / "COVID-19-CT-Seg_20cases" / "coronacases_001.nii.gz", c["hu"].astype(np.int16), AFFINE_LPS)
    D.write_nifti(root / "Infection_Mask" / "coronacases_001.nii.gz", (c["ggo"] | c["high"]).astype(np.uint8),
                  AFFINE_LPS)
    D.write_nifti(root / "Lung_Mask" / "coronacases_001.nii.gz", c["lung"].astype(np.uint8), AFFINE_LPS)
    case = D.NiftiPairSource(root, "covid19ctseg", label_map="1:ggo").load("c19seg-coronacases_001")
    np.testing.assert_array_equal(case.labels == L.GGO, c["ggo"] | c["high"])
    np.testing.assert_array_equal(case.labels > 0, c["lung"])


def test_nifti_generic_rejects_non_hu_images(tmp_path):
    c = _chest()
    root = tmp_path / "gen"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    scaled = ((c["hu"] + 1000) / 1100 * 255).clip(0, 255).astype(np.uint8)
    D.write_nifti(root / "images" / "a.nii.gz", scaled, AFFINE_LPS)
    D.write_nifti(root / "masks" / "a.nii.gz", _expected_labels(c), AFFINE_LPS)
    src = D.NiftiPairSource(root, "generic")
    with pytest.raises(ValueError, match="not Hounsfield"):
        src.load(src.case_ids()[0])


# ------------------------------------------------------------------------------------ DICOM SEG


def _ct_datasets(hu: np.ndarray) -> list[Dataset]:
    """An axial CT series (pydicom datasets, inferior slice first in the list) of ``hu`` (superior first)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    n = hu.shape[0]
    return [ct_slice(hu[n - 1 - k], study_uid=study, series_uid=series, frame_uid=frame, index=k,
                     position=(-160.0, -160.0, 40.0 - 5.0 * (n - 1 - k)),  # slice n-1-k of hu
                     spacing=(5.0, 5.0), thickness=5.0, PatientName="Test^Seg", PatientID="SEG-1")
            for k in range(n)]


def _write_seg(path: Path, cts: list[Dataset], segments: list[tuple[str, object, object, np.ndarray]]) -> None:
    """Write a BINARY SEG of ``segments`` (label, category, type, mask in hu order) over ``cts``."""
    n = len(cts)
    pixels = np.stack([np.stack([m[n - 1 - k] for k in range(n)]) for *_, m in segments], -1).astype(np.uint8)
    algo = hd.AlgorithmIdentificationSequence(name="test", family=codes.DCM.ArtificialIntelligence, version="1")
    descs = [
        hd.seg.SegmentDescription(segment_number=i + 1, segment_label=label, segmented_property_category=cat,
                                  segmented_property_type=typ,
                                  algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                  algorithm_identification=algo)
        for i, (label, cat, typ, _) in enumerate(segments)
    ]
    seg = hd.seg.Segmentation(
        source_images=cts, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1", omit_empty_frames=False,
    )
    seg.save_as(path, enforce_file_format=True)


def test_dicom_ct_and_seg_pairs(tmp_path):
    c = _chest()
    cts = _ct_datasets(c["hu"])
    (tmp_path / "ct").mkdir()
    for k, ds in enumerate(cts):
        ds.save_as(tmp_path / "ct" / f"{k:03d}.dcm", enforce_file_format=True)
    anat, abnormal = codes.SCT.AnatomicalStructure, codes.SCT.MorphologicallyAbnormalStructure
    _write_seg(tmp_path / "seg-full.dcm", cts, [
        ("Lung field", anat, codes.SCT.Lung, c["lung"]),
        ("Ground glass opacity", abnormal, codes.DCM.GroundGlassOpacity, c["ggo"]),
        ("High opacity", abnormal, hd.sr.CodedConcept("95436008", "SCT", "Lung consolidation"), c["high"]),
    ])
    _write_seg(tmp_path / "seg-infection.dcm", cts, [
        ("Infection", abnormal, codes.DCM.AbnormalOpacity, c["ggo"] | c["high"]),
    ])
    src = D.DicomSegSource(tmp_path)
    assert len(src.case_ids()) == 2
    cases = {src.cases[cid][0].name: src.load(cid) for cid in src.case_ids()}
    full = cases["seg-full.dcm"]
    np.testing.assert_array_equal(full.hu, c["hu"])  # the volume is superior first, like hu
    np.testing.assert_array_equal(full.labels, _expected_labels(c))
    assert full.meta["segments"] == ["1:lung", "2:ggo", "3:high"]
    inf = cases["seg-infection.dcm"]  # abnormal opacity → split by HU; lung from lung_field_mask
    np.testing.assert_array_equal(inf.labels == L.GGO, c["ggo"])
    np.testing.assert_array_equal(inf.labels == L.HIGH_OPACITY, c["high"])
    assert _dice(inf.labels > 0, c["lung"]) > 0.9
    # user overrides by label
    src2 = D.DicomSegSource(tmp_path, seg_map="infection:ggo")
    cid = next(k for k, (p, _) in src2.cases.items() if p.name == "seg-infection.dcm")
    np.testing.assert_array_equal(src2.load(cid).labels == L.GGO, c["ggo"] | c["high"])


# ------------------------------------------------------------------------------------ phantoms and real CT


def test_phantom_source_varies_and_is_deterministic():
    src = D.PhantomSource([1000, 1001, 1002, 1003, 1004, 1005], matrix=64, max_slices=16)
    specs = [D.sample_phantom_spec(s, 64, 16) for s in src.seeds]
    assert len({s.slice_spacing_mm for s in specs}) > 1 and len({s.contrast for s in specs}) == 2
    assert all(0.625 <= s.slice_spacing_mm <= 5.0 and 0 <= s.burden_percent <= 80 for s in specs)
    a, b = src.load("phantom-1001"), src.load("phantom-1001")
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.hu.shape == (16, 64, 64) and a.hu.dtype == np.float32 and a.source == "phantom"
    assert abs(a.spacing[0] - specs[1].slice_spacing_mm) < 1e-6
    assert set(np.unique(a.labels)) <= {0, 1, 2, 3} and (a.labels == L.LUNG).any()
    vol = a.to_volume()
    assert vol.shape == a.hu.shape and vol.datasets == ()


@pytest.mark.skipif(not (REAL_CT / "totalsegmentator-chest-crops").is_dir(), reason="no real CT data")
def test_real_ct_with_inserted_lesions():
    src = D.RealCTSource(REAL_CT, variants=1, seed_start=1000, clean=True)
    ids = src.case_ids()
    assert "real-chest-crop-2-clean" in ids and "real-chest-crop-2-s1000" in ids
    assert not any(D.REAL_STUDY in i for i in ids)  # the specificity study is not a training default
    clean, ins = src.load("real-chest-crop-2-clean"), src.load("real-chest-crop-2-s1000")
    assert not (clean.labels >= L.GGO).any()
    lung_ml = np.count_nonzero(clean.labels) * 1.5**3 / 1000
    assert 1000 < lung_ml < 3000  # both lungs' central parts (crop edges padded)
    np.testing.assert_array_equal(ins.labels > 0, clean.labels > 0)  # lesions inside the lung field
    assert (ins.labels == L.GGO).any()
    changed = ins.hu != clean.hu
    assert changed.any() and not (changed & (clean.labels == 0)).any()  # only lung voxels change


# ------------------------------------------------------------------------------------ cache, windows, augmentation


class _ListSource:
    name = "list"

    def __init__(self, cases: list[D.RawCase]):
        self.cases = {c.case_id: c for c in cases}
        self.loads = 0

    def case_ids(self):
        return sorted(self.cases)

    def cache_key(self, case_id):
        return case_id

    def load(self, case_id):
        self.loads += 1
        return self.cases[case_id]


def test_preprocess_cache_and_windows(tmp_path):
    c = _chest()
    raw = D.RawCase("tiny", c["hu"], _expected_labels(c), AFFINE_LPS, source="test")
    src = _ListSource([raw])
    index = D.CaseIndex([src])
    cache = D.CaseCache(tmp_path / "cache", size=32)
    case = cache.get(index, "tiny")
    assert case.image.shape == (16, 32, 32) and case.image.dtype == np.float16
    assert case.labels.shape == (16, 32, 32) and set(np.unique(case.labels)) <= {0, 1, 2, 3}
    assert (case.labels == L.GGO).any() and (case.labels == L.HIGH_OPACITY).any()
    again = cache.get(index, "tiny")
    assert src.loads == 1  # second time from the npz
    np.testing.assert_array_equal(again.labels, case.labels)
    sampler = D.WindowSampler([case])
    picks = sampler.sample(20, np.random.default_rng(0))
    x, y = D.make_batch([case], picks, context=2)
    assert x.shape == (20, 5, 32, 32) and x.dtype == torch.float32 and y.shape == (20, 32, 32)
    # centre channel is the target slice; edges replicate
    x0, _ = D.make_batch([case], [(0, 0)], context=2)
    torch.testing.assert_close(x0[0, 0], x0[0, 2])
    assert len(sampler.evenly(4)) == 4
    ds = D.WindowDataset([case], picks, context=2)
    xi, yi = ds[3]
    torch.testing.assert_close(xi, x[3])
    torch.testing.assert_close(yi, y[3])
    assert len(ds) == 20


def test_augmentation_identical_for_all_slices_and_label():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    blob = (((yy - 30) ** 2 + (xx - 24) ** 2) < 12**2) | ((yy > 40) & (yy < 56) & (xx > 36) & (xx < 58))
    y = blob.long()[None].repeat(6, 1, 1)
    x = blob.float()[None, None].repeat(6, 3, 1, 1)  # three identical slices per window
    xw, yw = D.augment_batch(x, y, g)
    assert xw.shape == x.shape and yw.shape == y.shape and yw.dtype == y.dtype
    torch.testing.assert_close(xw[:, 0], xw[:, 2])  # same transform for every slice of a window
    agree = ((xw[:, 1] > 0.5).long() == yw).float().mean()
    assert agree > 0.99  # label follows the image
    assert not torch.equal(yw[0], y[0])  # something moved


def test_augmentation_parameters_in_range():
    g = torch.Generator().manual_seed(1)
    theta = D.affine_thetas(2000, D.Augmentation(), g)
    lin = theta[:, :, :2]
    scale = 1 / torch.sqrt(torch.det(lin))
    angle = torch.rad2deg(torch.atan2(lin[:, 1, 0], lin[:, 0, 0]))
    assert scale.min() >= 0.9 - 1e-4 and scale.max() <= 1.05 + 1e-4
    assert angle.abs().max() <= 10.0 + 1e-3 and angle.abs().max() > 9.0
    shift_px_at_256 = theta[:, :, 2].abs() * 128
    assert shift_px_at_256.max() <= 10.0 + 1e-3 and shift_px_at_256.max() > 9.0


def test_split_folds_groups_real_variants():
    ids = [f"phantom-{i}" for i in range(1000, 1012)] + [f"real-chest-crop-1-s{i}" for i in range(1000, 1004)]
    folds = D.split_folds(ids, 5, seed=0)
    assert sorted(sum(folds, [])) == sorted(ids)
    assert sum(any(i.startswith("real-") for i in f) for f in folds) == 1
    sizes = sorted(len(f) for f in folds)
    assert sizes[-1] - sizes[0] <= 4


# ------------------------------------------------------------------------------------ training

TINY = ["--size", "32", "--hparam", "context=1", "--hparam", "refine=4", "--hparam", "width=8", "--hparam", "growth=4",
        "--hparam", "dense_layers=2", "--hparam", "features=8", "--hparam", "levels=2", "--hparam", "hidden=4",
        "--hparam", "head_width=4"]


def test_make_splits_disjoint_and_final():
    from lungburden.training.trainer import TrainConfig, make_splits

    ids = [f"phantom-{i}" for i in range(1000, 1010)]
    splits = make_splits(ids, TrainConfig(folds=5))
    assert [s.name for s in splits] == [f"fold-{k}" for k in range(5)]
    assert sorted(sum((s.test for s in splits), [])) == sorted(ids)
    for s in splits:
        assert not set(s.train) & set(s.val) and not set(s.train) & set(s.test) and not set(s.val) & set(s.test)
        assert sorted(s.train + s.val + s.test) == sorted(ids) and s.val
    (final,) = make_splits(ids, TrainConfig(final=True))
    assert final.test == [] and sorted(final.train + final.val) == sorted(ids)


def test_tiny_training_run_writes_checkpoint_that_loads_and_resumes(tmp_path):
    from lungburden.cli import main
    from lungburden.segmentation.networks import load_checkpoint

    out = tmp_path / "run"
    common = ["model", "train", "--out", str(out), "--phantoms", "2", "--phantom-matrix", "64",
              "--phantom-max-slices", "12",
              "--final", "--windows-per-epoch", "8", "--batch", "4", "--micro-batch", "2",
              "--val-windows-per-case", "3", "--cache", str(tmp_path / "cache"), "--threads", "1", "--quiet", *TINY]
    assert main([*common, "--max-epochs", "2", "--real-ct", str(tmp_path / "none")]) == 0
    model, ckpt = load_checkpoint(out / "final" / "best.pt")
    meta = ckpt["metadata"]
    assert ckpt["model"] == "convlstm" and model.context == 1 and model.input_size == 32
    assert meta["epochs"] == 2 and meta["stop_reason"] == "max epochs 2"
    assert sorted(meta["split"]["train"] + meta["split"]["val"]) == ["phantom-1000", "phantom-1001"]
    assert meta["data"]["phantoms"] == 2 and meta["config"]["lr"] == 1e-3 and "git_commit" in meta
    assert len(meta["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in meta["history"])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    # resume to epoch 3, on slabs this time
    assert main([*common, "--max-epochs", "3", "--resume", "--slab", "3", "--real-ct", str(tmp_path / "none")]) == 0
    _, ckpt = load_checkpoint(out / "final" / "last.pt")
    assert ckpt["metadata"]["epochs"] == 3 and len(ckpt["metadata"]["history"]) == 3
    assert ckpt["metadata"]["history"][:2] == meta["history"]


def test_device_option_and_parallel_case_preparation(tmp_path):
    from lungburden.training.trainer import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    index = D.CaseIndex([D.PhantomSource([1000, 1001, 1002], matrix=64, max_slices=10)])
    cache = D.CaseCache(tmp_path / "cache", size=32)
    parallel = D.load_training_cases(index, index.ids(), cache, progress=False, workers=2)
    serial = D.load_training_cases(index, index.ids(), D.CaseCache(None, size=32), progress=False)
    assert [c.case_id for c in parallel] == index.ids()
    for a, b in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.image, b.image)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # the workers filled the cache


def test_init_fine_tunes_from_a_checkpoint_and_checks_its_model(tmp_path):
    from lungburden.cli import main
    from lungburden.segmentation.networks import build_model, load_checkpoint, save_checkpoint

    hparams = dict(input_size=32, context=1, width=4, growth=4, dense_layers=1, features=4, hidden=4,
                   head_width=4, lstm_pool=1, refine=0, levels=1)
    start = build_model("convlstm", **hparams)
    save_checkpoint(tmp_path / "start.pt", start, {"kind": "test"})
    common = ["model", "train", "--phantoms", "2", "--phantom-matrix", "64", "--phantom-max-slices", "12", "--final",
              "--windows-per-epoch", "4", "--batch", "2", "--micro-batch", "2", "--val-windows-per-case", "2",
              "--cache", str(tmp_path / "cache"), "--threads", "1", "--quiet", "--real-ct", str(tmp_path / "none"),
              "--max-epochs", "1", "--init", str(tmp_path / "start.pt")]
    assert main([*common, "--out", str(tmp_path / "ft"), "--lr", "1e-9", "--stop-lr", "1e-12"]) == 0
    tuned, ckpt = load_checkpoint(tmp_path / "ft" / "final" / "last.pt")
    assert tuned.hparams == start.hparams and ckpt["metadata"]["config"]["init"] == str(tmp_path / "start.pt")
    assert ckpt["metadata"]["epochs"] == 1
    # A tiny learning rate leaves the weights next to the initial ones (a fresh model would differ).
    first = "encoder.stem.0.weight"
    torch.testing.assert_close(tuned.state_dict()[first], start.state_dict()[first], atol=1e-5, rtol=0)
    assert main([*common, "--out", str(tmp_path / "bad"), "--hparam", "hidden=8"]) != 0
    assert main([*common, "--out", str(tmp_path / "bad2"), "--model", "unet2d"]) != 0


def _case_with(high_share: float, n: int = 4, size: int = 8) -> D.TrainingCase:
    """A case whose lung (all of every slice) is ``high_share`` high opacity, the rest lung."""
    labels = np.full((n, size, size), L.LUNG, np.uint8)
    labels.reshape(-1)[: round(high_share * labels.size)] = L.HIGH_OPACITY
    return D.TrainingCase(f"high-{high_share}", np.zeros((n, size, size), np.float16), labels, {})


def test_high_opacity_boost_draws_high_opacity_cases_more_often():
    cases = [_case_with(0.0), _case_with(0.5)]
    # K = 0: every case alike, drawn exactly as before the option existed (same random stream).
    uniform = D.WindowSampler(cases).sample(4000, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    assert [ci for ci, _ in uniform[:50]] == rng.integers(0, 2, size=4000).tolist()[:50]
    assert abs(np.mean([ci for ci, _ in uniform]) - 0.5) < 0.03
    # K = 10: weights 1 and 1 + 10 * 0.5 = 6, so the white lung is drawn 6 times in 7.
    boosted = D.WindowSampler(cases, high_opacity_boost=10).sample(4000, np.random.default_rng(3))
    assert abs(np.mean([ci for ci, _ in boosted]) - 6 / 7) < 0.03
    with pytest.raises(ValueError, match="boost"):
        D.WindowSampler(cases, high_opacity_boost=-1)


def test_training_precision_autocasts_the_network_only(tmp_path, monkeypatch):
    from lungburden.cli import main
    from lungburden.segmentation.convlstm import native_bfloat16
    from lungburden.segmentation.networks import load_checkpoint
    from lungburden.training.trainer import training_precision

    cpu = torch.device("cpu")
    assert training_precision("float32", cpu) == "float32"
    assert training_precision("bfloat16", cpu) == "bfloat16"
    assert training_precision("auto", cpu) == ("bfloat16" if native_bfloat16() else "float32")
    with pytest.raises(ValueError, match="precision"):
        training_precision("half", cpu)
    seen: list[bool] = []

    def record(module, args, output):
        if type(module).__name__ == "ConvLSTMSegNet":
            seen.append(torch.is_autocast_enabled("cpu"))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for precision in ("bfloat16", "float32"):
            seen.clear()
            out = tmp_path / precision
            assert main(["model", "train", "--out", str(out), "--phantoms", "2", "--phantom-matrix", "64",
                         "--phantom-max-slices", "12", "--final", "--windows-per-epoch", "4", "--batch", "2",
                         "--micro-batch", "2", "--val-windows-per-case", "2", "--cache", str(tmp_path / "cache"),
                         "--threads", "1", "--quiet", "--real-ct", str(tmp_path / "none"), "--max-epochs", "1",
                         "--precision", precision, "--high-opacity-boost", "2", *TINY]) == 0
            # training and validation forward passes, all (and only) under autocast for bfloat16
            assert seen and all(s == (precision == "bfloat16") for s in seen)
            model, ckpt = load_checkpoint(out / "final" / "best.pt")
            assert ckpt["metadata"]["precision"] == precision
            assert ckpt["metadata"]["config"]["high_opacity_boost"] == 2
            assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
            assert np.isfinite(ckpt["metadata"]["history"][0]["train_loss"])
    finally:
        handle.remove()


def test_ema_decay_validates_and_saves_the_weight_average(tmp_path):
    from lungburden.cli import main
    from lungburden.segmentation.networks import load_checkpoint
    from lungburden.training.trainer import weight_average

    common = ["model", "train", "--out", str(tmp_path / "run"), "--phantoms", "2", "--phantom-matrix", "64",
              "--phantom-max-slices", "12", "--final", "--windows-per-epoch", "8", "--batch", "2",
              "--micro-batch", "2", "--val-windows-per-case", "2", "--cache", str(tmp_path / "cache"),
              "--threads", "1", "--quiet", "--real-ct", str(tmp_path / "none"), "--lr", "1e-2",
              "--optimizer", "adam", "--ema-decay", "0.999999", *TINY]
    assert main([*common, "--max-epochs", "1"]) == 0
    state = torch.load(tmp_path / "run" / "final" / "state.pt", weights_only=False)
    raw, average = state["model_state"], state["average_state"]
    saved, ckpt = load_checkpoint(tmp_path / "run" / "final" / "last.pt")
    assert ckpt["metadata"]["config"]["ema_decay"] == 0.999999
    first = "encoder.stem.0.weight"
    # A decay next to 1 keeps the average at the initial weights while the raw ones moved (4 Adam
    # steps at lr 1e-2); the checkpoint holds the average, BatchNorm statistics included.
    torch.testing.assert_close(saved.state_dict()[first], average[f"module.{first}"])
    assert (raw[first] - average[f"module.{first}"]).abs().max() > 1e-3
    bn = next(k for k in raw if k.endswith("running_mean"))
    torch.testing.assert_close(saved.state_dict()[bn], average[f"module.{bn}"])
    # ... recomputed for the averaged weights (a copy made at the start would still hold 0 / 1)
    assert saved.state_dict()[bn].abs().max() > 0 and not torch.equal(saved.state_dict()[bn], raw[bn])
    # resume carries the average on
    assert main([*common, "--max-epochs", "2", "--resume"]) == 0
    _, ckpt = load_checkpoint(tmp_path / "run" / "final" / "last.pt")
    assert ckpt["metadata"]["epochs"] == 2
    with pytest.raises(ValueError, match="decay"):
        weight_average(torch.nn.Linear(2, 2), 1.5)
    assert weight_average(torch.nn.Linear(2, 2), 0) is None


def test_refresh_batchnorm_recomputes_the_statistics_of_the_average():
    from lungburden.training.trainer import refresh_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3, momentum=0.1))
    model[1].running_mean.fill_(5.0)
    inputs = [torch.randn(4, 1, 6, 6) + k for k in range(3)]
    refresh_batchnorm(model, iter(inputs), slab=False, device=torch.device("cpu"))
    with torch.no_grad():
        means = torch.stack([model[0](x).mean(dim=(0, 2, 3)) for x in inputs])
    # the plain mean of the three batches' means, not a momentum blend with the old 5.0
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    assert model[1].momentum == 0.1 and model.training
