"""The classical threshold baseline on the real study: a plausible lung field and left/right split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungburden import labels as L
from lungburden.dicom_io.volume import load_files
from lungburden.quantify import quantify
from lungburden.segmentation.registry import available_segmenters, get_segmenter


def test_threshold_on_real_study(real_lung_series: list[Path]):
    volume = load_files(real_lung_series)
    segmenter = get_segmenter("threshold")
    labels = segmenter.segment(volume)
    assert labels.dtype == np.uint8 and labels.shape == volume.shape
    q = quantify(labels, volume.hu, volume.affine)
    # An adult's lungs: 3-8 L in all, each side 35-65 %.
    assert 3000 < q.lung_volume_ml < 8000
    assert 0.35 < q.left_lung_volume_ml / q.lung_volume_ml < 0.65
    assert -900 < q.lung_mean_hu < -750
    # Nothing outside the lung field is labelled, and the lesion classes respect their HU bands
    # after smoothing (raw voxel means fall in them).
    assert -750 < q.ggo_mean_hu < -300 and q.high_opacity_mean_hu > -300
    assert set(np.unique(labels)) <= {L.BACKGROUND, L.LUNG, L.GGO, L.HIGH_OPACITY}
    assert segmenter.info.name and segmenter.info.version
    assert "threshold" in available_segmenters()
