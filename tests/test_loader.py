"""Series discovery, selection and loading (CTVolume) on the real study, including every rejection."""

from __future__ import annotations

import copy
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ct_builders import write_phantom
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from lungburden.dicom_io.selection import SelectionRules, check_selection, select_series
from lungburden.dicom_io.series import SkippedFile, discover_series
from lungburden.dicom_io.volume import LoadLimits, SeriesRejected, check_series, load_files, load_volume


@pytest.fixture(scope="module")
def real_datasets(real_lung_series: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in real_lung_series]


@pytest.fixture(scope="module")
def real_volume(real_lung_series: list[Path]):
    return load_files(real_lung_series)


def test_real_study_geometry_and_hu(real_volume, real_lung_series):
    v = real_volume
    assert v.shape == (64, 512, 512)
    assert v.spacing == pytest.approx((5.0, 0.841796875, 0.841796875))
    # Slices are ordered along the normal: z changes by exactly one slice gap per index.
    z = [float(ds.ImagePositionPatient[2]) for ds in v.datasets]
    assert np.allclose(np.abs(np.diff(z)), 5.0)
    # The affine reproduces each source slice's ImagePositionPatient.
    for k in (0, 31, 63):
        ipp = v.affine @ np.array([k, 0, 0, 1.0])
        assert np.allclose(ipp[:3], [float(x) for x in v.datasets[k].ImagePositionPatient], atol=1e-3)
    # HU after rescale: air outside the body, soft tissue inside.
    assert v.hu.min() == pytest.approx(-1024.0)
    assert -1100 < np.median(v.hu[:, :20, :20]) < -900
    assert "PixelData" not in v.datasets[0]
    assert v.voxel_volume_ml == pytest.approx(5.0 * 0.841796875**2 / 1000)


def test_slice_order_ignores_file_order_and_instance_number(real_datasets, real_volume):
    shuffled = [copy.deepcopy(ds) for ds in real_datasets]
    random.Random(3).shuffle(shuffled)
    for i, ds in enumerate(shuffled):  # misleading InstanceNumbers must not matter
        ds.InstanceNumber = i + 1
    v = load_volume(shuffled)
    assert np.array_equal(v.hu, real_volume.hu)
    assert [d.SOPInstanceUID for d in v.datasets] == [d.SOPInstanceUID for d in real_volume.datasets]


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory) -> list[Path]:
    return write_phantom(tmp_path_factory.mktemp("phantom"), seed=11, slices=18, size=256, slice_spacing_mm=2.5,
                         contrast=True)


def test_phantom_in_shuffled_file_order(phantom_series):
    files = list(phantom_series)
    random.Random(5).shuffle(files)
    limits = LoadLimits(min_slices=16)
    shuffled, ordered = load_files(files, limits), load_files(phantom_series, limits)
    assert np.array_equal(shuffled.hu, ordered.hu)
    assert shuffled.source_files == ordered.source_files
    assert shuffled.spacing == pytest.approx((2.5, 400 / 256, 400 / 256))


def _transcode(src: list[Path], dst: Path, how: str) -> list[Path]:
    dst.mkdir()
    out = []
    for p in src:
        target = dst / p.name
        if how in ("jpeg-lossless", "jpeg-ls"):
            tool = ["dcmcjpeg", "+e1"] if how == "jpeg-lossless" else ["dcmcjpls"]
            subprocess.run([*tool, str(p), str(target)], check=True, capture_output=True)
        else:
            ds = pydicom.dcmread(p)
            ds.compress(JPEG2000Lossless if how == "jpeg2000" else RLELossless)
            ds.save_as(target)
        out.append(target)
    return out


@pytest.mark.parametrize(
    "how,ts",
    [
        ("jpeg-lossless", "1.2.840.10008.1.2.4.70"),
        ("jpeg-ls", "1.2.840.10008.1.2.4.80"),
        ("jpeg2000", "1.2.840.10008.1.2.4.90"),
        ("rle", "1.2.840.10008.1.2.5"),
    ],
)
@pytest.mark.parametrize("source", ["real", "phantom"])
def test_compressed_transfer_syntaxes_decode_losslessly(real_lung_series, phantom_series, tmp_path, how, ts, source):
    if how.startswith("jpeg-") and shutil.which("dcmcjpeg") is None:
        pytest.fail("DCMTK (dcmcjpeg/dcmcjpls) is required: make test installs it")
    subset = real_lung_series[20:38] if source == "real" else phantom_series
    files = _transcode(subset, tmp_path / how, how)
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    limits = LoadLimits(min_slices=16)
    assert np.array_equal(load_files(files, limits).hu, load_files(subset, limits).hu)


def test_discovery_skips_non_dicom_and_selection_prefers_lung_kernel(real_study):
    skipped: list[SkippedFile] = []
    candidates = discover_series(real_study, skipped)
    assert len(candidates) == 2
    assert {s.path.suffix for s in skipped} == {".xml"}  # the tumour annotations
    assert all("not a DICOM file" in s.reason for s in skipped)
    outcome = select_series(candidates)
    assert str(outcome.best.first.ConvolutionKernel) == "L"
    assert len(outcome.accepted) == 2 and outcome.rejected == []


def test_discovery_survives_garbage_and_truncated_files(real_lung_series, tmp_path):
    (tmp_path / "garbage.dcm").write_bytes(b"\x00\x01garbage" * 100)
    (tmp_path / "notes.txt").write_text("hello")
    data = real_lung_series[0].read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[:300])
    shutil.copy(real_lung_series[1], tmp_path / "good.dcm")
    skipped: list[SkippedFile] = []
    candidates = discover_series(tmp_path, skipped)
    assert [c.files[0].name for c in candidates] == ["good.dcm"]
    assert sorted(s.path.name for s in skipped) == ["garbage.dcm", "notes.txt", "truncated.dcm"]


def _modified(datasets, edit) -> list[pydicom.Dataset]:
    out = [copy.deepcopy(ds) for ds in datasets]
    for i, ds in enumerate(out):
        edit(i, ds)
    return out


def _reject_reason(datasets, limits=LoadLimits()) -> str:
    with pytest.raises(SeriesRejected) as info:
        load_volume(datasets, limits)
    assert datasets[0].SeriesInstanceUID in str(info.value)
    return info.value.reason


def test_reject_non_ct(real_datasets):
    reason = _reject_reason(_modified(real_datasets, lambda i, ds: setattr(ds, "Modality", "MR")))
    assert "not a CT image series" in reason and "Modality=MR" in reason


def test_reject_localizer(real_datasets):
    edit = lambda i, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"])  # noqa: E731
    assert "localizer" in _reject_reason(_modified(real_datasets, edit))


def test_reject_too_few_slices(real_datasets):
    assert "10 slices, fewer than the minimum of 16" in _reject_reason(real_datasets[:10])


def test_reject_mixed_orientation(real_datasets):
    def edit(i, ds):
        if i == 5:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.4358899]

    assert "mixed image orientations" in _reject_reason(_modified(real_datasets, edit))


def test_reject_mixed_in_plane_size(real_datasets):
    def edit(i, ds):
        if i == 7:
            ds.Rows = 256

    assert "mixed in-plane sizes" in _reject_reason(_modified(real_datasets, edit))


def test_reject_non_uniform_spacing(real_volume, real_datasets):
    by_z = sorted(real_datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    gappy = by_z[:30] + by_z[32:]
    assert "non-uniform slice spacing" in _reject_reason(gappy)


def test_reject_gantry_tilt(real_datasets):
    def edit(i, ds):
        ds.GantryDetectorTilt = 15

    assert "gantry tilt" in _reject_reason(_modified(real_datasets, edit))

    def shear(i, ds):  # stacking offsets in y without the attribute
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1] + 0.27 * z, z]

    assert "gantry tilt" in _reject_reason(_modified(real_datasets, shear))


def test_reject_duplicate_positions(real_datasets):
    second_phase = _modified(real_datasets, lambda i, ds: setattr(ds, "SOPInstanceUID", generate_uid()))
    reason = _reject_reason(list(real_datasets) + second_phase)
    assert "64 duplicate slice positions" in reason and "multi-phase" in reason


def test_reject_missing_pixel_data(real_datasets):
    def edit(i, ds):
        if i == 3:
            del ds.PixelData

    assert "has no Pixel Data" in _reject_reason(_modified(real_datasets, edit))


def test_reject_missing_geometry(real_datasets):
    def edit(i, ds):
        if i == 2:
            del ds.ImagePositionPatient

    assert "lacks ImagePositionPatient" in _reject_reason(_modified(real_datasets, edit))


def test_reject_missing_or_mixed_frame_of_reference_and_series(real_datasets):
    def no_frame(i, ds):
        if i == 4:
            del ds.FrameOfReferenceUID

    assert "lacks FrameOfReferenceUID" in _reject_reason(_modified(real_datasets, no_frame))

    def other_frame(i, ds):
        if i == 4:
            ds.FrameOfReferenceUID = generate_uid()

    assert "2 different frames of reference" in _reject_reason(_modified(real_datasets, other_frame))
    mixed = _modified(real_datasets, lambda i, ds: setattr(ds, "SeriesInstanceUID", generate_uid()) if i == 9 else None)
    with pytest.raises(SeriesRejected, match="2 different series"):
        load_volume(mixed)


def test_malformed_rescale_or_lut_is_rejected_not_raised(real_datasets):
    """Whatever pydicom raises on bad modality-LUT data becomes a rejection naming the series."""

    def empty_slope(i, ds):
        ds.RescaleSlope = None

    assert "pixel data or geometry unreadable" in _reject_reason(_modified(real_datasets, empty_slope))

    def lut_without_data(i, ds):
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        ds.ModalityLUTSequence = [item]

    assert "pixel data or geometry unreadable" in _reject_reason(_modified(real_datasets, lut_without_data))


@pytest.mark.parametrize("dtype, slope, intercept, fast", [
    (np.uint16, 1, -1024, True), (np.int16, 1, 0, True), (np.uint16, 2, -2048, True), (np.int16, -3, 100, True),
    (np.uint8, 1, -1000, True), (np.uint16, 1, 1e7, True), (np.uint16, 255, 0, True),
    (np.uint16, 0.5, -1024.25, False), (np.int32, 1, -1024, False), (np.uint16, 3, 2**24, False)])
def test_modality_lut_matches_pydicom(dtype, slope, intercept, fast, monkeypatch):
    """The float32 rescale gives exactly float32(pydicom's float64 result) and is used only where
    that holds (integer pixels and rescale, outputs below 2**24); otherwise pydicom computes."""
    from pydicom.pixels import apply_modality_lut

    from lungburden.dicom_io import volume

    calls = []

    def pydicom_lut(pixels, ds):
        calls.append(1)
        return apply_modality_lut(pixels, ds)

    monkeypatch.setattr(volume, "apply_modality_lut", pydicom_lut)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    pixels = rng.integers(max(info.min, -2**20), min(info.max, 2**20), (64, 64), endpoint=True).astype(dtype)
    pixels[0, :2] = (max(info.min, -2**20), min(info.max, 2**20))
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    out = np.empty(pixels.shape, np.float32)
    volume._modality_lut_into(pixels, ds, out)
    assert np.array_equal(out, apply_modality_lut(pixels, ds).astype(np.float32))
    assert len(calls) == (0 if fast else 1)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = list(range(0, 2560, 10))
    ds.ModalityLUTSequence = [item]  # the LUT takes precedence over the rescale (PS3.3 C.11.1)
    volume._modality_lut_into(pixels, ds, out)
    assert np.array_equal(out, apply_modality_lut(pixels, ds).astype(np.float32))
    assert len(calls) == (1 if fast else 2)


def test_missing_rescale_is_identity(real_datasets):
    def edit(i, ds):
        del ds.RescaleIntercept
        del ds.RescaleSlope

    v = load_volume(_modified(real_datasets, edit))
    assert v.hu.min() == 0.0  # stored values, intercept 0


def test_selection_rules_reasons(real_study):
    candidates = discover_series(real_study)
    lung = next(c for c in candidates if str(c.first.ConvolutionKernel) == "L")
    assert check_selection(SelectionRules(), lung) is None
    assert "fewer than the minimum of 100" in check_selection(SelectionRules(min_slices=100), lung)
    assert "outside [0.5, 3.0]" in check_selection(SelectionRules(slice_thickness_mm=(0.5, 3.0)), lung)
    assert "does not match" in check_selection(SelectionRules(kernel_regex="^B$"), lung)
    assert "modality CT is not one of MR" in check_selection(SelectionRules(modalities=("MR",)), lung)
    assert check_series(lung.headers) is None  # header-only datasets pass the geometric checks
