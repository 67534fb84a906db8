"""`lungburden analyze` end to end: exit codes, result.json, and SEG/SR validated and read back
independently (dciodvfy, dcmqi), on the real study (both kernels given together)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungburden.cli import main
from lungburden.results.validate import read_seg_with_dcmqi, read_sr_with_dcmqi, result_values, run_dciodvfy

RESULT_KEYS = {
    "study_instance_uid",
    "series_instance_uid",
    "model",
    "lung_volume_ml",
    "left_lung_volume_ml",
    "right_lung_volume_ml",
    "ggo_volume_ml",
    "high_opacity_volume_ml",
    "opacity_volume_ml",
    "burden_percent",
    "seg_sop_instance_uid",
    "sr_sop_instance_uid",
}


def check_outputs(out: Path, workdir: Path) -> dict:
    """Both outputs valid (dciodvfy: zero errors); SR and SEG agree with result.json."""
    result = json.loads((out / "result.json").read_text())
    assert RESULT_KEYS <= set(result)
    for name in ("seg.dcm", "sr.dcm"):
        report = run_dciodvfy(out / name)
        assert report.errors == [], report.output
    seg = pydicom.dcmread(out / "seg.dcm")
    sr = pydicom.dcmread(out / "sr.dcm")
    assert seg.SOPInstanceUID == result["seg_sop_instance_uid"]
    assert sr.SOPInstanceUID == result["sr_sop_instance_uid"]
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == result["study_instance_uid"]
    assert result["series_instance_uid"] not in (seg.SeriesInstanceUID, sr.SeriesInstanceUID)
    # SR numbers (read by dcmqi) equal result.json.
    sr_values = read_sr_with_dcmqi(out / "sr.dcm", workdir / "sr")
    expected = result_values(result)
    for key, value in sr_values.items():
        assert value == pytest.approx(expected[key], abs=1e-3), key
    assert {"lung_volume_ml", "ggo_volume_ml", "high_opacity_volume_ml", "burden_percent"} <= set(sr_values)
    # Volumes computed from the SEG masks (read by dcmqi) equal result.json.
    masks = read_seg_with_dcmqi(out / "seg.dcm", workdir / "seg")
    pixel = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    thickness = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices)
    voxel_ml = pixel[0] * pixel[1] * thickness / 1000.0
    names = {1: "lung_volume_ml", 2: "ggo_volume_ml", 3: "high_opacity_volume_ml"}
    for number, key in names.items():
        assert int(np.count_nonzero(masks[number])) * voxel_ml == pytest.approx(result[key], abs=0.01), key
    return result


@pytest.mark.integration
def test_analyze_real_study_selects_lung_kernel(real_study, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", str(real_study), "--out", str(out), "--model", "threshold"]) == 0
    printed = capsys.readouterr()
    assert "Pneumonia burden" in printed.out and "kernel L" in printed.err
    result = check_outputs(out, tmp_path)
    lung_kernel = pydicom.dcmread(next((real_study / "lung-kernel-L-5mm").glob("*.dcm")), stop_before_pixels=True)
    assert result["series_instance_uid"] == lung_kernel.SeriesInstanceUID
    assert 3000 < result["lung_volume_ml"] < 8000


def test_analyze_bad_input_exit_codes(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.dcm").write_bytes(b"not dicom at all")
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    assert "found no an analysable" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2


def test_analyze_unknown_model(real_study, tmp_path, capsys):
    assert main(["analyze", str(real_study), "--out", str(tmp_path / "o"), "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.integration
def test_phantom_then_analyze(tmp_path, capsys):
    phantom_dir, out = tmp_path / "p", tmp_path / "o"
    assert main(["phantom", str(phantom_dir), "--seed", "7", "--slices", "24"]) == 0
    truth = json.loads((phantom_dir / "truth.json").read_text())
    assert main(["analyze", str(phantom_dir), "--out", str(out), "--model", "threshold"]) == 0
    result = check_outputs(out, tmp_path)
    assert result["series_instance_uid"] == truth["series_instance_uid"]
    # The classical baseline finds the phantom's lungs (it is not expected to match lesions well).
    assert result["lung_volume_ml"] == pytest.approx(truth["lung_volume_ml"], rel=0.15)


def test_phantom_neck_option_moves_the_scan_up(tmp_path):
    import pydicom

    tops = {}
    for neck in (20, 60):
        out = tmp_path / f"n{neck}"
        assert main(["phantom", str(out), "--seed", "7", "--slices", "8", "--neck", str(neck)]) == 0
        tops[neck] = max(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in out.glob("*.dcm"))
    assert tops[60] - tops[20] == pytest.approx(20.0)  # the slab centre moves by half the extra reach


def test_uid_seed_gives_deterministic_result_uids(real_lung_series, tmp_path):
    from lungburden.pipeline import process_series

    first = process_series(real_lung_series, tmp_path / "a", model="threshold", uid_seed="series/v1")
    again = process_series(real_lung_series, tmp_path / "b", model="threshold", uid_seed="series/v1")
    other = process_series(real_lung_series, tmp_path / "c", model="threshold", uid_seed="series/v2")
    keys = ["seg_sop_instance_uid", "seg_series_instance_uid", "sr_sop_instance_uid", "sr_series_instance_uid"]
    assert [first.result[k] for k in keys] == [again.result[k] for k in keys]
    assert all(first.result[k] != other.result[k] for k in keys)
    assert len({first.result[k] for k in keys}) == 4


def test_analyze_with_weights_file_records_it(tmp_path, capsys):
    """``--weights`` selects a checkpoint other than the shipped one; its file name and SHA-256
    reach result.json and the SEG/SR algorithm parameters, and a bad file is refused up front."""
    import hashlib
    import shutil

    from lungburden.segmentation.convlstm import DEFAULT_WEIGHTS

    site = tmp_path / "site-tuned.pt"
    shutil.copyfile(DEFAULT_WEIGHTS, site)
    phantom_dir, out = tmp_path / "p", tmp_path / "o"
    assert main(["phantom", str(phantom_dir), "--seed", "3", "--slices", "16"]) == 0
    assert main(["analyze", str(phantom_dir), "--out", str(out), "--weights", str(site)]) == 0
    result = json.loads((out / "result.json").read_text())
    digest = hashlib.sha256(site.read_bytes()).hexdigest()
    assert result["weights"] == "site-tuned.pt" and result["weights_sha256"] == digest
    seg = pydicom.dcmread(out / "seg.dcm")
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert f"site-tuned.pt sha256:{digest[:16]}" in parameters

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = ["--weights", str(tmp_path / "junk.pt")]
    assert main(["analyze", str(phantom_dir), "--out", str(tmp_path / "o2"), *junk]) == 2
    assert "junk.pt" in capsys.readouterr().err
    missing = ["--weights", str(tmp_path / "none.pt")]
    assert main(["analyze", str(phantom_dir), "--out", str(tmp_path / "o3"), *missing]) == 2
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
