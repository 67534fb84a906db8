"""The learned high-opacity component filter: features, tree ensemble, fit, checkpoint, segmenter, command."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

from lungburden import labels as L
from lungburden.dicom_io.volume import CTVolume
from lungburden.segmentation.component_filter import (
    CHECKPOINT_KEY,
    FEATURE_NAMES,
    MAX_CANDIDATE_ML,
    HighOpacityFilter,
    TreeEnsemble,
    describe_high_opacity,
)
from lungburden.training.second_stage import component_targets, fit_filter, fit_from_cases

AFFINE = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 1]])  # slice 0 cranial


def _stump(feature: str, threshold: float) -> TreeEnsemble:
    """One split: log-odds +5 (reject) where ``feature > threshold``, else -5."""
    return TreeEnsemble(FEATURE_NAMES, 0.0, np.array([0], np.int32),
                        np.array([FEATURE_NAMES.index(feature), 0, 0], np.int32),
                        np.array([threshold, 0, 0], float), np.array([True, False, False]),
                        np.array([1, 0, 0], np.int32), np.array([2, 0, 0], np.int32),
                        np.array([False, True, True]), np.array([0.0, -5.0, 5.0]))


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A lung field (lung, -850 HU) with a GGO patch, a dense tube inside the GGO that runs on into
    the aerated lung (a vessel), and a solid cube in the GGO (a consolidation); both tube and cube
    are labelled high opacity."""
    labels = np.zeros((20, 40, 40), np.uint8)
    hu = np.full(labels.shape, 40.0)
    labels[2:18, 4:36, 4:36] = L.LUNG
    hu[2:18, 4:36, 4:36] = -850.0
    labels[6:14, 10:30, 10:30] = L.GGO
    hu[6:14, 10:30, 10:30] = -600.0
    hu[3:17, 14:16, 14:16] = 60.0  # vessel through the patch, beyond it in aerated lung
    labels[6:14, 14:16, 14:16] = L.HIGH_OPACITY
    labels[8:12, 22:26, 22:26] = L.HIGH_OPACITY  # cube
    hu[8:12, 22:26, 22:26] = 20.0
    return labels, hu


def test_features_describe_size_surroundings_position_and_shape():
    labels, hu = _scene()
    found = describe_high_opacity(labels, hu, AFFINE, voxel_ml=0.002)
    assert found.count == 2 and found.features.shape == (2, len(FEATURE_NAMES))
    f = {name: found.features[:, j] for j, name in enumerate(FEATURE_NAMES)}
    tube, cube = np.argsort(-f["elongation"])  # the tube is the elongated one
    assert found.volumes_ml[tube] == pytest.approx(8 * 4 * 0.002)
    assert found.volumes_ml[cube] == pytest.approx(64 * 0.002)
    assert f["hu_median"][tube] == 60.0 and f["hu_median"][cube] == 20.0
    assert f["slices"][tube] == 8 and f["slices"][cube] == 4
    # the cube is surrounded by GGO; the tube's ends touch dense lung voxels (its vessel)
    assert f["surface_ggo"][cube] == 1.0 and f["near_dense"][cube] == 0.0
    assert f["near_dense_lung"][tube] > 0.0 and f["near_dense_lung"][cube] == 0.0
    assert f["extent_1_mm"][tube] > f["extent_2_mm"][tube]
    # position in the lung field: z from the apex; flipping the slice order mirrors it
    flipped = describe_high_opacity(labels[::-1].copy(), hu[::-1].copy(), AFFINE @ np.diag([-1.0, 1, 1, 1]), 0.002)
    z = FEATURE_NAMES.index("lung_field_z")
    assert sorted(flipped.features[:, z]) == pytest.approx(sorted(found.features[:, z]))
    # y runs anterior -> posterior whatever the row order (a prone scan's rows run anterior)
    prone = describe_high_opacity(labels[:, ::-1].copy(), hu[:, ::-1].copy(), AFFINE @ np.diag([1.0, -1, 1, 1]), 0.002)
    y = FEATURE_NAMES.index("lung_field_y")
    assert sorted(prone.features[:, y]) == pytest.approx(sorted(found.features[:, y]))
    # components from max_ml up are counted, not described
    limited = describe_high_opacity(labels, hu, AFFINE, 0.002, max_ml=0.1)
    assert np.allclose(limited.volumes_ml, found.volumes_ml)
    assert np.isnan(limited.features[cube]).all() and np.allclose(limited.features[tube], found.features[tube])
    truth = labels.copy()
    truth[labels == L.HIGH_OPACITY] = L.GGO
    truth[8:12, 22:26, 22:26] = L.HIGH_OPACITY
    targets = component_targets(found, truth)
    assert targets[tube] == 1 and targets[cube] == 0


def test_no_high_opacity_no_components():
    labels, hu = _scene()
    labels[labels == L.HIGH_OPACITY] = L.GGO
    found = describe_high_opacity(labels, hu, AFFINE, 0.002)
    assert found.count == 0 and found.features.shape == (0, len(FEATURE_NAMES))
    assert HighOpacityFilter(_stump("log_volume_ml", 0.0)).apply(labels, hu, AFFINE, 0.002) == 0


def test_tree_ensemble_equals_sklearn_and_survives_the_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, len(FEATURE_NAMES)))
    y = (x[:, 0] + 0.5 * x[:, 3] * x[:, 7] + 0.3 * rng.normal(size=600) > 0.2).astype(int)
    model = HistGradientBoostingClassifier(max_depth=3, max_iter=30, early_stopping=False, random_state=0)
    model.fit(x, y, sample_weight=rng.uniform(0.5, 2, 600))
    ensemble = TreeEnsemble.from_sklearn(model, FEATURE_NAMES)
    test = rng.normal(size=(200, len(FEATURE_NAMES)))
    test[::7, 0] = np.nan  # missing values take sklearn's learnt side
    assert np.allclose(ensemble.probability(test), model.predict_proba(test)[:, 1])
    torch.save({CHECKPOINT_KEY: HighOpacityFilter(ensemble, 0.6).to_dict()}, tmp_path / "f.pt")
    again = HighOpacityFilter.from_dict(torch.load(tmp_path / "f.pt", weights_only=True)[CHECKPOINT_KEY])
    assert again.threshold == 0.6 and np.allclose(again.ensemble.probability(test), model.predict_proba(test)[:, 1])
    with pytest.raises(ValueError, match="features"):
        ensemble.probability(test[:, :5])


def test_stored_filters_are_checked():
    for garbage in (None, [], {"ensemble": 3}, {"ensemble": {"feature_names": list(FEATURE_NAMES)}}):
        with pytest.raises(ValueError, match="malformed"):
            HighOpacityFilter.from_dict(garbage)  # type: ignore[arg-type]
    # a leaf's feature index is never read
    leafy = HighOpacityFilter(_stump("hu_median", 40.0)).to_dict()
    leafy["ensemble"]["feature"][1] = 10**6
    assert HighOpacityFilter.from_dict(leafy).ensemble.probability(np.zeros((2, len(FEATURE_NAMES)))).shape == (2,)
    stored = HighOpacityFilter(_stump("hu_median", 40.0)).to_dict()
    stored["ensemble"]["feature_names"] = ["volume"] * len(FEATURE_NAMES)
    with pytest.raises(ValueError, match="other component features"):
        HighOpacityFilter.from_dict(stored)
    stored = HighOpacityFilter(_stump("hu_median", 40.0)).to_dict()
    stored["ensemble"]["left"][0] = 0  # a loop
    with pytest.raises(ValueError, match="malformed"):
        HighOpacityFilter.from_dict(stored)
    stored = HighOpacityFilter(_stump("hu_median", 40.0)).to_dict()
    stored["ensemble"]["feature"][0] = len(FEATURE_NAMES)
    with pytest.raises(ValueError, match="malformed"):
        HighOpacityFilter.from_dict(stored)


def test_apply_relabels_rejected_components_to_their_surroundings():
    labels, hu = _scene()
    before = labels.copy()
    rejected = HighOpacityFilter(_stump("hu_median", 40.0)).apply(labels, hu, AFFINE, 0.002)
    assert rejected == 1
    assert np.all(labels[6:14, 14:16, 14:16] == L.GGO)  # the tube, inside GGO, became GGO
    assert np.all(labels[8:12, 22:26, 22:26] == L.HIGH_OPACITY)  # the cube stays
    assert np.array_equal(labels != before, (before == L.HIGH_OPACITY) & (hu == 60.0))
    # large components are kept whatever the trees say (MAX_CANDIDATE_ML)
    labels, hu = _scene()
    everything = HighOpacityFilter(_stump("hu_median", -1e9))
    assert everything.apply(labels, hu, AFFINE, MAX_CANDIDATE_ML / 40) == 1  # tube 32 voxels, cube 64
    assert np.all(labels[6:14, 14:16, 14:16] == L.GGO) and np.all(labels[8:12, 22:26, 22:26] == L.HIGH_OPACITY)


@dataclass
class _Case:
    case_id: str
    volume: CTVolume
    labels: np.ndarray

    def to_volume(self) -> CTVolume:
        return self.volume


class _FakeSegmenter:
    """Returns the truth plus the planted false components (a fake network, for speed)."""

    def __init__(self, outputs: dict[str, np.ndarray]):
        self.outputs = outputs

    def segment(self, volume: CTVolume) -> np.ndarray:
        return self.outputs[volume.series_instance_uid].copy()


def _cases(n: int) -> tuple[list[_Case], _FakeSegmenter]:
    """Cases with true cubes of consolidation (20 HU) in GGO and, in some, false vessel pieces (60 HU)."""
    rng = np.random.default_rng(1)
    cases, outputs = [], {}
    for k in range(n):
        labels, hu = _scene()
        truth = labels.copy()
        truth[labels == L.HIGH_OPACITY] = L.GGO
        out = truth.copy()
        for _ in range(3):
            z, y, x = rng.integers(6, 11), rng.integers(10, 27), rng.integers(10, 27)
            size = int(rng.integers(2, 4))
            if rng.random() < 0.5:
                hu[z:z + size, y:y + size, x:x + size] = 20.0
                truth[z:z + size, y:y + size, x:x + size] = L.HIGH_OPACITY
                out[z:z + size, y:y + size, x:x + size] = L.HIGH_OPACITY
            else:
                hu[z:z + size, y:y + 1, x:x + 1] = 60.0
                out[z:z + size, y:y + 1, x:x + 1] = L.HIGH_OPACITY
        uid = f"case-{k}"
        volume = CTVolume(hu=hu.astype(np.float32), affine=AFFINE, datasets=(), series_instance_uid=uid,
                          study_instance_uid=uid, frame_of_reference_uid="")
        cases.append(_Case(uid, volume, truth))
        outputs[uid] = out
    return cases, _FakeSegmenter(outputs)


def test_fit_from_cases_learns_to_reject_and_cross_validates():
    cases, segmenter = _cases(40)
    fit = fit_from_cases(segmenter, cases, folds=4)
    assert fit.cases == [c.case_id for c in cases]
    assert fit.spearman_cv > fit.spearman_before
    assert fit.removed_false_ml > fit.removed_true_ml
    stored = fit.filter.to_dict()["provenance"]
    assert stored["cases"] == 40 and stored["cv_folds"] == 4 and stored["components"] > 40
    labels = segmenter.segment(cases[0].volume)
    fit.filter.apply(labels, cases[0].volume.hu, AFFINE, cases[0].volume.voxel_volume_ml)
    assert np.count_nonzero(labels != cases[0].labels) < np.count_nonzero(
        segmenter.segment(cases[0].volume) != cases[0].labels)
    with pytest.raises(ValueError, match="both true and false"):
        fit_filter(np.zeros((50, len(FEATURE_NAMES))), np.zeros(50), np.ones(50))
    with pytest.raises(ValueError, match="2 folds"):
        fit_from_cases(segmenter, cases, folds=1)


SMALL = dict(input_size=32, width=8, growth=8, dense_layers=2, features=8, levels=2, hidden=8, head_width=8,
             lstm_pool=2, refine=8, context=1)


def test_segmenter_applies_the_checkpoint_filter_unless_told_not_to(tmp_path):
    from lungburden.segmentation.convlstm import ConvLSTMSegmenter
    from lungburden.segmentation.networks import build_model, load_checkpoint, save_checkpoint, write_checkpoint
    from lungburden.training.calibration import Calibration, CalibrationScore, write_calibrated_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "raw.pt", build_model("convlstm", **SMALL), {"kind": "test"})
    _, checkpoint = load_checkpoint(tmp_path / "raw.pt")
    fitted_on = {"first_case": "phantom-600", "last_case": "phantom-999"}
    checkpoint[CHECKPOINT_KEY] = HighOpacityFilter(_stump("hu_median", 40.0), 0.5, fitted_on).to_dict()
    write_checkpoint(tmp_path / "filtered.pt", checkpoint)
    assert ConvLSTMSegmenter(tmp_path / "raw.pt", threads=1).high_opacity_filter is None
    assert ConvLSTMSegmenter(tmp_path / "filtered.pt", threads=1, high_opacity_filter=False).high_opacity_filter is None
    # the real-CT steps after the filter are off: this scene tests the filter alone
    segmenter = ConvLSTMSegmenter(tmp_path / "filtered.pt", threads=1, lung_field_rules=None,
                                  opacity_split=None, lesion_regions=None)
    assert (segmenter.info.parameters["high_opacity_filter"]
            == "1 trees, reject p > 0.5, fitted on phantom-600..phantom-999")
    labels, hu = _scene()
    segmenter._finish_components(labels, hu, 0.05, AFFINE)  # the rule steps keep both components (> 0.5 mL)
    assert np.all(labels[6:14, 14:16, 14:16] == L.GGO) and np.all(labels[8:12, 22:26, 22:26] == L.HIGH_OPACITY)
    labels, hu = _scene()
    segmenter._finish_components(labels, hu, 0.05, None)  # no affine (no spacing): the filter is skipped
    assert np.all(labels[6:14, 14:16, 14:16] == L.HIGH_OPACITY)
    # a calibration changes the labels the filter learnt from: the calibrated copy drops it
    score = CalibrationScore([0, 0, 0.5, 0], 0.9, 0.9, 0.8, 0.98, 0.97, -1.0)
    calibration = Calibration([0.0, 0.0, 0.5, 0.0], score, score, ["phantom-500"], [0.0, 0.5], 0.002)
    write_calibrated_checkpoint(tmp_path / "filtered.pt", tmp_path / "cal.pt", calibration, {"command": "test"})
    assert CHECKPOINT_KEY not in load_checkpoint(tmp_path / "cal.pt")[1]


def test_fit_filter_command(tmp_path):
    from lungburden.cli import main
    from lungburden.segmentation.convlstm import DEFAULT_WEIGHTS, ConvLSTMSegmenter
    from lungburden.segmentation.networks import load_checkpoint

    common = ["model", "fit-filter", "--phantoms", "2", "--folds", "2", "--threads", "2", "--quiet", "--no-cache",
              "--real-ct", str(tmp_path / "none")]
    # the held-out evaluation seeds and the network's own training cases are refused
    assert main([*common, "--phantom-seed-start", "99", "--out", str(tmp_path / "bad.pt")]) == 2
    _, shipped = load_checkpoint(DEFAULT_WEIGHTS)
    trained_on = sorted(shipped["metadata"]["split"]["train"])[0]
    assert trained_on.startswith("phantom-")
    assert main([*common, "--phantom-seed-start", trained_on.split("-")[1], "--out", str(tmp_path / "bad.pt")]) == 2
    assert main([*common, "--folds", "1", "--out", str(tmp_path / "bad.pt")]) == 2
    assert main([*common, "--out", str(tmp_path)]) == 2  # a folder
    assert not (tmp_path / "bad.pt").exists()
    # the shipped network on two unseen phantoms: both kinds of component occur, a filter is fitted and stored
    assert main([*common, "--out", str(tmp_path / "f.pt")]) == 0
    _, written = load_checkpoint(tmp_path / "f.pt")
    provenance = written[CHECKPOINT_KEY]["provenance"]
    assert provenance["cases"] == 2 and provenance["first_case"] == "phantom-600"
    assert provenance["source_weights"] == str(DEFAULT_WEIGHTS) and provenance["components"] > 0
    assert all(torch.equal(v, shipped["state_dict"][k]) for k, v in written["state_dict"].items())  # same network
    assert ConvLSTMSegmenter(tmp_path / "f.pt", threads=1).high_opacity_filter is not None


def test_calibrate_fits_without_the_stored_filter(tmp_path, monkeypatch):
    from lungburden.cli import main
    from lungburden.segmentation.networks import build_model, load_checkpoint, save_checkpoint, write_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "raw.pt", build_model("convlstm", **SMALL), {"kind": "test"})
    _, checkpoint = load_checkpoint(tmp_path / "raw.pt")
    checkpoint[CHECKPOINT_KEY] = HighOpacityFilter(_stump("hu_median", -1e9)).to_dict()  # rejects everything
    write_checkpoint(tmp_path / "filtered.pt", checkpoint)
    common = ["model", "calibrate", "--phantoms", "1", "--phantom-matrix", "64", "--phantom-max-slices", "8",
              "--threads", "1",
              "--quiet", "--real-ct", str(tmp_path / "none"), "--grid", "0,0.5"]
    assert main([*common, "--weights", str(tmp_path / "raw.pt"), "--out", str(tmp_path / "a.pt")]) == 0
    applied = []
    monkeypatch.setattr(HighOpacityFilter, "apply", lambda self, *args: applied.append(args) or 0)
    assert main([*common, "--weights", str(tmp_path / "filtered.pt"), "--out", str(tmp_path / "b.pt")]) == 0
    assert not applied  # the offsets are fitted on the labels the calibrated checkpoint will give
    a, b = (load_checkpoint(tmp_path / name)[1] for name in ("a.pt", "b.pt"))
    assert a["calibration"]["before"] == b["calibration"]["before"]
    assert a["calibration"]["logit_offsets"] == b["calibration"]["logit_offsets"]
    assert CHECKPOINT_KEY not in b
