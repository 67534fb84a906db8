"""The shipped ConvLSTM weights: the default model, loadable, small, and accurate on a held-out phantom.

Held-out phantoms use seeds below 1000 (training uses 1000+, see docs/training.md). The accuracy
floors are regression guards well below the figures in the README's model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ct_builders import write_phantom
from test_cli import check_outputs

from lungburden import labels as L
from lungburden.dicom_io.volume import load_files
from lungburden.phantom import PhantomSpec, generate_phantom
from lungburden.segmentation.convlstm import DEFAULT_WEIGHTS
from lungburden.segmentation.registry import DEFAULT_SEGMENTER, get_segmenter
from lungburden.training.data import tumour_region

#: Regression floors for the shipped weights on held-out phantom seed 3 (the shipped model reads
#: lung DSC 0.98, lesion DSC 0.76, burden 16.8 % vs 25 % truth; docs/model-card.md).
LUNG_DICE_FLOOR = 0.90
LESION_DICE_FLOOR = 0.40
BURDEN_ABS_TOLERANCE = 20.0
#: Specificity guard on the real non-COVID study: the shipped model reads a lung of 5456 mL with
#: 2.28 % of it opaque outside the tumour boxes (docs/model-card.md, "Real CT").
REAL_LUNG_ML_RANGE = (4000.0, 7500.0)
REAL_FALSE_BURDEN_CEILING = 5.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def test_weights_ship_and_are_the_default():
    assert DEFAULT_SEGMENTER == "convlstm"
    path = Path(DEFAULT_WEIGHTS)
    assert path.is_file() and path.stat().st_size < 20 * 2**20
    segmenter = get_segmenter()
    assert segmenter.info.name and segmenter.info.version
    # the second stage ships with the network, fitted on phantoms neither trained nor evaluated on
    fitted = segmenter.high_opacity_filter
    assert fitted is not None and len(fitted.ensemble.roots) == 400
    assert (fitted.provenance["first_case"], fitted.provenance["last_case"]) == ("phantom-600", "phantom-999")
    assert segmenter.info.parameters["high_opacity_filter"].startswith("400 trees, reject p > 0.5")


@pytest.fixture(scope="module")
def held_out_series(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("held-out")
    write_phantom(out, seed=3, slices=40, size=256, slice_spacing_mm=2.5, burden_percent=25)
    return out


def test_held_out_phantom_accuracy(held_out_series):
    volume = load_files(sorted(held_out_series.glob("*.dcm")))
    truth = generate_phantom(PhantomSpec(seed=3, slices=40, slice_spacing_mm=2.5, rows=256, cols=256,
                                         burden_percent=25)).labels
    labels = get_segmenter().segment(volume)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert dice(labels >= L.LUNG, truth >= L.LUNG) > LUNG_DICE_FLOOR
    assert dice(labels >= L.GGO, truth >= L.GGO) > LESION_DICE_FLOOR


@pytest.mark.integration
def test_analyze_defaults_to_convlstm(held_out_series, tmp_path):
    from lungburden.cli import main

    assert main(["analyze", str(held_out_series), "--out", str(tmp_path / "o"), "--min-slices", "16"]) == 0
    result = check_outputs(tmp_path / "o", tmp_path)
    assert result["model"] == "convlstm"
    truth = json.loads((held_out_series / "truth.json").read_text())
    assert result["burden_percent"] == pytest.approx(truth["burden_percent"], abs=BURDEN_ABS_TOLERANCE)


def test_real_study_lung_volume_and_specificity(real_study, real_lung_series):
    """On the real lung-cancer study (no pneumonia) the lung volume is plausible and the opacity
    outside the annotated tumour stays small: a weights change that regresses on real anatomy fails."""
    from lungburden.quantify import quantify

    volume = load_files(real_lung_series)
    labels = get_segmenter().segment(volume)
    q = quantify(labels, volume.hu, volume.affine)
    assert REAL_LUNG_ML_RANGE[0] < q.lung_volume_ml < REAL_LUNG_ML_RANGE[1]
    outside = (labels >= L.GGO) & ~tumour_region(volume, real_study)
    false_burden = 100.0 * float(outside.sum()) * volume.voxel_volume_ml / q.lung_volume_ml
    assert false_burden < REAL_FALSE_BURDEN_CEILING
