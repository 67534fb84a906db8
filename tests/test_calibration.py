"""Decision calibration: logit offsets in the segmenter, the fit, the checkpoint and the command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungburden import labels as L
from lungburden.dicom_io.volume import CTVolume
from lungburden.segmentation.convlstm import ConvLSTMSegmenter
from lungburden.segmentation.networks import build_model, save_checkpoint
from lungburden.segmentation.preprocess import CropBox, PreprocessedSeries
from lungburden.training.calibration import (
    CalibrationCase,
    collect_cases,
    fit_offsets,
    score_offsets,
    write_calibrated_checkpoint,
)

SMALL = dict(input_size=32, width=8, growth=8, dense_layers=2, features=8, levels=2, hidden=8, head_width=8,
             lstm_pool=2, refine=8, context=1)


def _volume(slices: int = 6, size: int = 64) -> CTVolume:
    rng = np.random.default_rng(0)
    _, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    hu = np.full((slices, size, size), -1000.0, np.float32)
    hu[((y - 32) / 28) ** 2 + ((x - 32) / 28) ** 2 < 1] = 40.0
    hu[((y - 32) / 16) ** 2 + ((x - 32) / 20) ** 2 < 1] = -850.0
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    return CTVolume(hu=hu, affine=np.diag([2.0, 0.8, 0.8, 1.0]), datasets=(), series_instance_uid="case:test",
                    study_instance_uid="case:test", frame_of_reference_uid="")


@pytest.fixture()
def segmenter() -> ConvLSTMSegmenter:
    torch.manual_seed(0)
    # An untrained network's opacity is scattered, mostly away from its lung: the detached-opacity
    # filter would leave too little of it to compare the offsets by.
    return ConvLSTMSegmenter(model=build_model("convlstm", **SMALL), threads=1, min_opacity_ml=0.01,
                             max_detached_ml=0.0)


def test_stored_logits_finish_exactly_as_segment(segmenter):
    volume = _volume()
    pre, logits = segmenter.model_grid_logits(volume.hu)
    assert logits.dtype == torch.float16 and logits.shape == (6, L.NUM_CLASSES, 32, 32)
    segmenter.logit_offsets = None
    plain = segmenter.segment(volume)
    # logits pass through float16 on the stored path: equal except at exact near-ties
    again = segmenter.labels_from_logits(pre, volume.hu, logits, volume.voxel_volume_ml, affine=volume.affine)
    assert np.mean(again == plain) > 0.999
    # an offset changes the labels the same way on both paths
    offsets = [0.0, 0.0, 0.4, -0.3]
    calibrated = ConvLSTMSegmenter(model=segmenter.source_model, threads=1, min_opacity_ml=0.01,
                                   max_detached_ml=0.0, logit_offsets=offsets)
    shifted = calibrated.segment(volume)
    assert np.mean(shifted != plain) > 0.001
    stored = segmenter.labels_from_logits(pre, volume.hu, logits, volume.voxel_volume_ml,
                                          offsets=torch.tensor(offsets).view(1, -1, 1, 1), affine=volume.affine)
    assert np.mean(stored == shifted) > 0.999
    # a huge GGO offset calls everything inside the body GGO (before the attenuation rules)
    everything = ConvLSTMSegmenter(model=segmenter.source_model, threads=1, logit_offsets=[0, 0, 100, 0],
                                   max_detached_ml=0.0, lung_field_rules=None, opacity_split=None,
                                   lesion_regions=None)
    inside = everything.segment(volume) > 0
    assert inside.any() and np.all(everything.segment(volume)[inside] == L.GGO)


def test_checkpoint_calibration_is_applied_by_default(tmp_path, segmenter):
    from lungburden.training.calibration import Calibration, CalibrationScore

    save_checkpoint(tmp_path / "raw.pt", segmenter.source_model, {"kind": "test"})
    score = CalibrationScore([0, 0, 0.5, 0], 0.9, 0.9, 0.8, 0.98, 0.97, -1.0)
    calibration = Calibration([0.0, 0.0, 0.5, 0.0], score, score, ["phantom-500"], [0.0, 0.5], 0.002)
    write_calibrated_checkpoint(tmp_path / "raw.pt", tmp_path / "cal.pt", calibration, {"command": "test"})
    cal = ConvLSTMSegmenter(tmp_path / "cal.pt", threads=1)
    assert cal.logit_offsets is not None and cal.logit_offsets.flatten().tolist() == [0.0, 0.0, 0.5, 0.0]
    assert cal.info.parameters["logit_offsets"] == "0 0 0.5 0"
    assert ConvLSTMSegmenter(tmp_path / "raw.pt").logit_offsets is None
    assert ConvLSTMSegmenter(tmp_path / "cal.pt", logit_offsets=[0, 0, 0, 0]).logit_offsets is None
    assert "logit_offsets" not in ConvLSTMSegmenter(tmp_path / "raw.pt").info.parameters
    with pytest.raises(ValueError, match="classes"):
        ConvLSTMSegmenter(tmp_path / "raw.pt", logit_offsets=[0, 1])
    with pytest.raises(ValueError, match="finite"):
        ConvLSTMSegmenter(tmp_path / "raw.pt", logit_offsets=[0, 0, float("nan"), 0])


def _shy_case(size: int = 32, slices: int = 3) -> CalibrationCase:
    """Truth: a lung with a GGO patch and a high-opacity patch; logits that favour the truth except
    that they under-call GGO by 0.7 (GGO voxels read lung), on an identity crop."""
    truth = np.zeros((slices, size, size), np.uint8)
    truth[:, 4:28, 4:28] = L.LUNG
    truth[:, 8:16, 8:16] = L.GGO
    truth[:, 18:24, 18:24] = L.HIGH_OPACITY
    onehot = torch.nn.functional.one_hot(torch.from_numpy(truth).long(), L.NUM_CLASSES).permute(0, 3, 1, 2).float()
    logits = 2.0 * onehot
    logits[:, L.LUNG] += 1.2 * onehot[:, L.GGO]  # GGO voxels: lung 1.2 vs GGO 2.0 - 1.5 = 0.5
    logits[:, L.GGO] -= 1.5 * onehot[:, L.GGO]
    hu = np.choose(truth, [40.0, -800.0, -650.0, 20.0]).astype(np.float32)  # GGO margin step: no change
    hu[:, :2] = -1000.0  # air at the image edge: the body clearing keeps everything else
    pre = PreprocessedSeries(image=torch.zeros(slices, size, size), box=CropBox(0, 0, size),
                             source_shape=truth.shape, body=None)
    return CalibrationCase("shy", pre, logits.half(), hu, truth, 0.01)  # high-opacity patch: 1.08 mL


def test_fit_finds_the_offset_that_undoes_an_under_call(segmenter):
    cases = [_shy_case()]
    segmenter.logit_offsets = None
    before = score_offsets(segmenter, cases, [0, 0, 0, 0])
    assert before.ggo_dice == 0.0 and before.high_opacity_dice == 1.0
    fitted = fit_offsets(segmenter, cases, grid=[-0.5, 0.0, 0.5, 1.0], tolerance=0.0)
    assert fitted.logit_offsets[L.GGO] == 1.0 and fitted.logit_offsets[L.HIGH_OPACITY] == 0.0
    assert fitted.after.lesion_dice == 1.0 and fitted.before.lesion_dice < 0.6
    assert fitted.logit_offsets[:2] == [0.0, 0.0] and len(fitted.tried) >= 6
    with pytest.raises(ValueError, match="cases"):
        fit_offsets(segmenter, [])


def test_fit_keeps_the_spearman_constraint(segmenter, monkeypatch):
    """An offset that raises Dice but lowers a Spearman r beyond the tolerance is not taken."""
    from lungburden.training import calibration as C

    def fake_score(_seg, _cases, offsets):
        ggo = offsets[L.GGO]
        return C.CalibrationScore(list(offsets), 0.8 + 0.05 * ggo, 0.8, 0.8, 0.98 - 0.01 * max(ggo - 0.5, 0),
                                  0.97, -2.0)

    monkeypatch.setattr(C, "score_offsets", fake_score)
    fitted = fit_offsets(segmenter, [_shy_case()], grid=[0.0, 0.5, 1.0], tolerance=0.002)
    assert fitted.logit_offsets[L.GGO] == 0.5  # 1.0 would score higher but drops Spearman by 0.005


def test_collect_cases_and_calibrate_command(tmp_path, segmenter):
    from lungburden.cli import main
    from lungburden.segmentation.networks import load_checkpoint
    from lungburden.training.data import CaseIndex, PhantomSource

    index = CaseIndex([PhantomSource([500], matrix=64, max_slices=8)])
    (case,) = collect_cases(segmenter, index.iter_raw(index.ids()))
    assert case.case_id == "phantom-500" and case.logits.shape[0] == case.truth.shape[0] == case.hu.shape[0]

    save_checkpoint(tmp_path / "raw.pt", segmenter.source_model,
                    {"split": {"train": ["phantom-501"], "val": [], "test": []}})
    common = ["model", "calibrate", "--weights", str(tmp_path / "raw.pt"), "--phantoms", "1", "--phantom-matrix", "64",
              "--phantom-max-slices", "8", "--threads", "1", "--quiet", "--real-ct", str(tmp_path / "none"),
              "--grid", "0,0.5"]
    assert main([*common, "--out", str(tmp_path / "cal.pt")]) == 0
    _, ckpt = load_checkpoint(tmp_path / "cal.pt")
    cal = ckpt["calibration"]
    assert len(cal["logit_offsets"]) == L.NUM_CLASSES and cal["cases"] == ["phantom-500"]
    assert cal["after"]["lesion_dice"] >= cal["before"]["lesion_dice"]
    assert cal["source_weights"] == str(tmp_path / "raw.pt")
    # training cases and the held-out evaluation seeds are refused
    assert main([*common, "--phantom-seed-start", "501", "--out", str(tmp_path / "bad.pt")]) == 2
    assert main([*common, "--phantom-seed-start", "90", "--out", str(tmp_path / "bad.pt")]) == 2
    assert not (tmp_path / "bad.pt").exists()
