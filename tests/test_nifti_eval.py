"""Evaluation on NIfTI pairs with expert lesion masks (``lungburden model evaluate --nifti-pairs``)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from lungburden import labels as L
from lungburden.cli import main
from lungburden.phantom import PhantomSpec, generate_phantom
from lungburden.training.nifti_eval import evaluate_nifti, load_case


def _write_slice_pairs(folder, count: int = 4):
    """Single-slice pairs cut from phantoms (mask: 1 GGO, 2 high opacity) like the MedSeg slices."""
    folder.mkdir()
    for seed in range(count):
        phantom = generate_phantom(PhantomSpec(seed=seed, slices=16, burden_percent=10.0 + 5 * seed))
        k = int(np.argmax(((phantom.labels == L.GGO) | (phantom.labels == L.HIGH_OPACITY)).sum(axis=(1, 2))))
        hu, labels = phantom.hu[k], phantom.labels[k]
        mask = np.select([labels == L.GGO, labels == L.HIGH_OPACITY], [1, 2], 0).astype(np.uint8)
        affine = np.diag([0.8, 0.8, 5.0, 1.0])
        # NIfTI axes (columns, rows, 1), as the real slices are stored.
        nib.save(nib.Nifti1Image(hu.T[:, :, None].astype(np.int16), affine), folder / f"s{seed}_ct.nii.gz")
        nib.save(nib.Nifti1Image(mask.T[:, :, None], affine), folder / f"s{seed}_mask.nii.gz")


def test_perfect_segmenter_scores_one_and_an_empty_one_scores_zero(tmp_path):
    folder = tmp_path / "pairs"
    _write_slice_pairs(folder, 3)

    def oracle(volume):
        """The expert mask itself, as labels (the mask read the way the evaluation reads it)."""
        name = volume.series_instance_uid
        truth = load_case(name, folder / f"{name}_ct.nii.gz", folder / f"{name}_mask.nii.gz").truth
        labels = np.select([truth == 1, truth == 2], [L.GGO, L.HIGH_OPACITY], L.LUNG).astype(np.uint8)
        return np.repeat(labels, volume.hu.shape[0], axis=0)

    perfect = evaluate_nifti(tmp_path / "pairs", oracle, copies=4)
    assert perfect.pooled_dice["lesion"] == pytest.approx(1.0)
    assert perfect.amount_ratio["lesion"] == pytest.approx(1.0)
    assert perfect.spearman["lesion"]["r"] == pytest.approx(1.0)
    empty = evaluate_nifti(tmp_path / "pairs", lambda v: np.zeros(v.hu.shape, np.uint8), copies=4)
    assert empty.pooled_dice["lesion"] == 0.0 and empty.amount_ratio["lesion"] == 0.0


def test_evaluate_command_on_nifti_pairs_writes_table_and_overlays(tmp_path, capsys):
    _write_slice_pairs(tmp_path / "pairs", 4)
    out = tmp_path / "eval"
    assert main(["model", "evaluate", "--model", "threshold", "--nifti-pairs", str(tmp_path / "pairs"),
                 "--slice-copies", "4", "--out", str(out)]) == 0
    report = json.loads((out / "nifti_eval.json").read_text())
    assert len(report["cases"]) == 4
    assert 0.0 < report["pooled_dice"]["lesion"] <= 1.0
    assert (out / "cases.md").read_text().count("| s") >= 4
    assert list(out.glob("*.png"))
    assert main(["model", "evaluate", "--model", "threshold", "--nifti-pairs", str(tmp_path / "none"),
                 "--out", str(out)]) == 2
    assert "no NAME_ct.nii" in capsys.readouterr().err
