"""Evaluation metrics on hand-made masks (Dice, Bland-Altman, Spearman, Wilcoxon) and report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from lungburden import labels as L
from lungburden.training.data import RawCase
from lungburden.training.evaluation import (
    ModelComparison,
    Overlap,
    agreement,
    bland_altman,
    case_group,
    compare_labels,
    dice,
    evaluate_cases,
    overlap,
    summarize,
    write_comparison,
    write_report,
)

AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])  # voxel = 2 mm³ = 0.002 mL


def _maps() -> tuple[np.ndarray, np.ndarray]:
    """Truth and prediction with known counts.

    truth: lung 100 voxels of which GGO 20 and high 10; prediction: same lung field, GGO 15 of the
    true 20 + 5 false, high 10 of which 5 true.
    """
    truth = np.zeros((1, 10, 20), np.uint8)
    truth[0, :, :10] = L.LUNG  # 100 voxels of lung field
    truth[0, 0:2, :10] = L.GGO  # 20 GGO
    truth[0, 2, :10] = L.HIGH_OPACITY  # 10 high
    pred = truth.copy()
    pred[0, 0, 5:10] = L.LUNG  # 5 GGO missed (FN)
    pred[0, 5, 0:5] = L.GGO  # 5 GGO false (FP)
    pred[0, 2, 5:10] = L.LUNG  # 5 high missed
    pred[0, 6, 0:5] = L.HIGH_OPACITY  # 5 high false
    return truth, pred


def test_dice_exact_values():
    truth, pred = _maps()
    assert overlap(truth, pred, (L.GGO,)) == Overlap(tp=15, fp=5, fn=5)
    assert dice(truth, pred, (L.GGO,)) == pytest.approx(30 / 40)
    assert dice(truth, pred, (L.HIGH_OPACITY,)) == pytest.approx(10 / 20)
    # lesion = GGO or high: truth 30, pred 30, overlap 15 + 5 = 20 → FP 10, FN 10
    assert dice(truth, pred, (L.GGO, L.HIGH_OPACITY)) == pytest.approx(40 / 60)
    assert dice(truth, pred, (L.LUNG, L.GGO, L.HIGH_OPACITY)) == pytest.approx(1.0)
    empty = np.zeros_like(truth)
    assert dice(empty, empty, (L.GGO,)) is None
    assert dice(truth, empty, (L.GGO,)) == 0.0


def test_case_result_and_pooled_dice():
    truth, pred = _maps()
    hu = np.full(truth.shape, -800.0, np.float32)
    r1 = compare_labels("a", truth, pred, hu, AFFINE, fold=0)
    r2 = compare_labels("b", truth, truth, hu, AFFINE, fold=1)
    assert r1.dice["ggo"] == pytest.approx(0.75)
    assert r1.truth.ggo_volume_ml == pytest.approx(20 * 0.002)
    assert r1.model.high_opacity_volume_ml == pytest.approx(10 * 0.002)
    s = summarize([r1, r2])
    # per-case mean of 0.75 and 1.0; pooled: TP 35, FP 5, FN 5 → 70/80
    assert s.dice["ggo"].mean == pytest.approx(0.875)
    assert s.dice["ggo"].pooled == pytest.approx(70 / 80)
    assert s.dice["ggo"].sd == pytest.approx(np.std([0.75, 1.0], ddof=1))
    assert set(s.per_fold) == {"0", "1"}
    assert s.per_fold["1"]["high_opacity"].mean == pytest.approx(1.0)


def test_bland_altman_numbers():
    truth = [10.0, 20.0, 30.0, 40.0]
    pred = [12.0, 19.0, 33.0, 44.0]  # differences 2, -1, 3, 4
    ba = bland_altman(truth, pred)
    d = np.array([2.0, -1.0, 3.0, 4.0])
    assert ba.bias == pytest.approx(2.0)
    assert ba.sd == pytest.approx(d.std(ddof=1))
    assert ba.loa_low == pytest.approx(2.0 - 1.96 * d.std(ddof=1))
    assert ba.loa_high == pytest.approx(2.0 + 1.96 * d.std(ddof=1))


def test_spearman_and_wilcoxon():
    truth = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    pred = [1.5, 1.8, 3.3, 4.5, 5.2, 7.0]  # same ranks → r = 1
    a = agreement("x", truth, pred)
    assert a.spearman_r == pytest.approx(1.0)
    assert a.wilcoxon_p == pytest.approx(stats.wilcoxon(pred, truth).pvalue)
    assert a.truth_median == pytest.approx(3.5)
    rev = agreement("x", truth, truth[::-1])
    assert rev.spearman_r == pytest.approx(-1.0)
    same = agreement("x", truth, truth)
    assert same.wilcoxon_p == 1.0
    constant = agreement("x", [0.0, 0.0, 0.0], [0.0, 1.0, 2.0])
    assert constant.spearman_r is None


def test_spearman_interval_brackets_r_and_narrows_with_agreement():
    rng = np.random.default_rng(3)
    truth = np.r_[np.zeros(30), rng.gamma(1.0, 200.0, 70)]
    loose = agreement("x", truth, truth * rng.normal(1.0, 0.6, truth.size) + rng.exponential(20.0, truth.size))
    tight = agreement("x", truth, truth * rng.normal(1.0, 0.05, truth.size))
    for a in (loose, tight):
        low, high = a.spearman_ci
        assert -1.0 <= low <= a.spearman_r <= high <= 1.0
    assert tight.spearman_ci[1] - tight.spearman_ci[0] < loose.spearman_ci[1] - loose.spearman_ci[0]
    again = agreement("x", truth, truth * 1.1)
    assert again.spearman_ci == agreement("x", truth, truth * 1.1).spearman_ci  # fixed seed
    assert agreement("x", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]).spearman_ci is None  # too few cases


class _Oracle:
    """A segmenter returning the truth (with one voxel wrong) for evaluate_cases."""

    def __init__(self, cases):
        self.truth = {c.hu.tobytes()[:64]: c.labels for c in cases}

    def segment(self, volume):
        out = self.truth[volume.hu.tobytes()[:64]].copy()
        out[0, 5, 9] = L.GGO  # a lung voxel
        return out


def test_evaluate_cases_and_report_files(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(4):
        truth, _ = _maps()
        truth[0, 9, : 2 + i] = L.GGO
        hu = rng.normal(-700, 50, truth.shape).astype(np.float32)
        cases.append(RawCase(f"c{i}", hu, truth, AFFINE, source="test"))
    results = evaluate_cases(_Oracle(cases), cases, fold=2, progress=False)
    assert [r.case_id for r in results] == ["c0", "c1", "c2", "c3"]
    assert all(r.overlaps["ggo"].fp == 1 for r in results)
    summary = write_report(results, tmp_path, title="test", info={"model": "oracle"})
    for name in ("report.md", "report.json", "agreement-ggo_volume_ml.png", "agreement-burden_percent.png"):
        assert (tmp_path / name).is_file(), name
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["summary"]["n_cases"] == 4
    assert doc["cases"][0]["fold"] == 2
    assert doc["summary"]["agreement"]["ggo_volume_ml"]["bland_altman"]["bias"] == pytest.approx(0.002)
    assert summary.agreement["ggo_volume_ml"].spearman_r == pytest.approx(1.0)
    assert "| ggo |" in (tmp_path / "report.md").read_text()
    path = write_comparison([ModelComparison("oracle", None, summary, {"16x512": {
        "slices": 16, "rows": 512, "wall_s": 1.0, "cpu_s": 2.0, "cold_wall_s": 3.0, "peak_rss_mib": 300.0,
        "peak_rss_growth_mib": 20.0, "threads": 2}})], tmp_path)
    text = path.read_text()
    assert "oracle" in text and "1.00 / 2.00 (3.00)" in text


def test_report_by_case_group(tmp_path):
    """Phantom cases are grouped by lesion pattern; each group gets pooled DSC and summed volumes."""
    truth, _ = _maps()
    truth[truth >= L.GGO] = L.LUNG  # lesion-free lung
    hu = np.full(truth.shape, -700, np.float32)
    consolidation = truth.copy()
    consolidation[0, 9, :6] = L.HIGH_OPACITY
    metas = [{"lesion_kinds": "consolidation", "burden_percent": 40.0},
             {"lesion_kinds": "consolidation", "burden_percent": 30.0},
             {"lesion_kinds": "effusion,ggo", "burden_percent": 0.0}]
    cases = [RawCase(f"phantom-{i}", hu, consolidation if i < 2 else truth, AFFINE, source="phantom", meta=m)
             for i, m in enumerate(metas)]
    cases.append(RawCase("real-x", hu, truth, AFFINE, source="real-ct", meta={"volume": "x", "seed": None}))
    assert [case_group(c) for c in cases] == ["phantom: consolidation", "phantom: consolidation",
                                              "phantom: no lesions", "real-ct"]

    class MissesConsolidation:
        def segment(self, volume):
            out = truth.copy()  # every consolidation voxel read as lung
            return out

    summary = write_report(evaluate_cases(MissesConsolidation(), cases, progress=False), tmp_path, plots=False)
    group = summary.per_group["phantom: consolidation"]
    assert group.n_cases == 2 and group.pooled_dice["high_opacity"] == 0.0
    assert group.model_high_opacity_ml == 0.0 and group.truth_high_opacity_ml == pytest.approx(2 * 6 * 0.002)
    assert summary.per_group["phantom: no lesions"].pooled_dice["lesion"] is None
    assert set(summary.per_group) == {"phantom: consolidation", "phantom: no lesions", "real-ct"}
    text = (tmp_path / "report.md").read_text()
    assert "## By case group" in text and "| phantom: consolidation | 2 | 0.000 |" in text
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["cases"][0]["group"] == "phantom: consolidation"


# ------------------------------------------------------------------------------------ commands

TINY_HPARAMS = dict(context=1, input_size=32, refine=4, width=8, growth=4, dense_layers=2, features=8, levels=2,
                    hidden=4, head_width=4)
TINY_DATA = ["--phantom-matrix", "64", "--phantom-max-slices", "12", "--no-cache", "--threads", "1", "--quiet"]


def _tiny_checkpoint(path, metadata=None):
    import torch

    from lungburden.segmentation.networks import build_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(path, build_model("convlstm", **TINY_HPARAMS), metadata or {})
    return path


def test_evaluate_command_with_weights_and_cv(tmp_path):
    from lungburden.cli import main
    from lungburden.training.data import DataSpec

    ckpt = _tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "eval"
    assert main(["model", "evaluate", "--weights", str(ckpt), "--phantoms", "2", "--out", str(out), *TINY_DATA]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert [c["case_id"] for c in doc["cases"]] == ["phantom-1", "phantom-2"]  # evaluation seeds start at 1
    assert (out / "agreement-burden_percent.png").is_file()
    # a cross-validation folder: each fold's model on its own recorded test cases
    data = DataSpec(phantoms=2, phantom_seed_start=1, phantom_matrix=64, phantom_max_slices=12).to_dict()
    for k in range(2):
        (tmp_path / "cv" / f"fold-{k}").mkdir(parents=True)
        _tiny_checkpoint(tmp_path / "cv" / f"fold-{k}" / "best.pt",
                         {"data": data, "split": {"fold": k, "test": [f"phantom-{k + 1}"]}, "epochs": 1})
    assert main(["model", "evaluate", "--cv", str(tmp_path / "cv"), "--out", str(tmp_path / "cv-eval"),
                 *TINY_DATA]) == 0
    doc = json.loads((tmp_path / "cv-eval" / "report.json").read_text())
    assert [(c["case_id"], c["fold"]) for c in doc["cases"]] == [("phantom-1", 0), ("phantom-2", 1)]
    assert set(doc["summary"]["per_fold"]) == {"0", "1"}
    assert "### Fold 1" in (tmp_path / "cv-eval" / "report.md").read_text()


def test_compare_command_table(tmp_path):
    from lungburden.cli import main

    ckpt = _tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "cmp"
    assert main(["model", "compare", "--models", "convlstm,threshold", "--weights", f"convlstm={ckpt}",
                 "--phantoms", "1", "--timing-slices", "16", "--timing-rows", "64", "--no-plots", "--out", str(out),
                     *TINY_DATA]) == 0
    doc = json.loads((out / "comparison.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["convlstm", "threshold"]
    for m in doc["models"]:
        cost = m["compute"]["16x64"]
        assert "error" not in cost, cost
        assert cost["wall_s"] > 0 and cost["peak_rss_mib"] > 0 and m["summary"]["n_cases"] == 1
    assert (out / "threshold" / "report.md").is_file()
    assert "| threshold |" in (out / "comparison.md").read_text()


def test_compute_cost_peak_memory_is_the_child_s_own(tmp_path):
    """The timing child's peak memory is its own, not the parent's: ``ru_maxrss`` would hand a
    spawned child the parent's peak (the compare command's, with every case it evaluated)."""
    from lungburden.training.evaluation import measure_compute, peak_rss_mib, write_timing_volume

    ballast = np.ones(600 * 2**20, np.uint8)  # the parent's peak: over 600 MiB more
    parent_peak = peak_rss_mib()
    volume = write_timing_volume(tmp_path / "v.npz", slices=16, rows=64)
    cost = measure_compute("threshold", None, volume)
    assert "error" not in cost, cost
    assert 0 < cost["peak_rss_mib"] < parent_peak - 300, (cost["peak_rss_mib"], parent_peak)
    del ballast
