"""Specificity on the real non-COVID study: opacity found outside the annotated lung tumour.

    python benchmarks/real_study_specificity.py [--model convlstm | --weights CKPT] [--study DIR]
        [--series lung-kernel-L-5mm | soft-kernel-B-5mm] [--out JSON]

Runs the product pipeline (``process_series``) on the lung-kernel series (or ``--series``) of
../shared/data/real-ct/lung-pet-ct-dx-A0001 (a lung-cancer patient without pneumonia), then
splits the opacity (GGO + high opacity) into what lies inside the annotated tumour boxes (the
20 Pascal-VOC boxes, extended by one slice above and below) and what lies outside. Outside the
tumour, every opacity voxel is a false positive, so the "burden outside the tumour" is the
specificity figure reported in the README's model card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lungburden import labels as L  # noqa: E402
from lungburden.dicom_io.volume import load_files  # noqa: E402
from lungburden.pipeline import analyze_volume  # noqa: E402
from lungburden.training.data import tumour_region  # noqa: E402
from lungburden.training.evaluation import build_segmenter  # noqa: E402

DATA_ROOT = Path(os.environ.get("LUNGBURDEN_DATA") or ROOT.parent / "shared" / "data")
DEFAULT_STUDY = DATA_ROOT / "real-ct" / "lung-pet-ct-dx-A0001"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="segmenter (default: the shipped default)")
    p.add_argument("--weights", default=None,
                   help="a checkpoint written by `lungburden model train` instead of --model")
    p.add_argument("--study", default=str(DEFAULT_STUDY))
    p.add_argument("--series", default="lung-kernel-L-5mm",
                   help="series folder of the study (default the lung kernel; soft-kernel-B-5mm is the same "
                        "acquisition with the soft-tissue kernel: much less image noise)")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    args = p.parse_args()
    study = Path(args.study)
    volume = load_files(sorted((study / args.series).glob("*.dcm")))
    segmenter = build_segmenter(args.model, args.weights)
    result = analyze_volume(volume, segmenter, args.model or "default")
    labels, q = result.labels, result.quantities
    voxel_ml = volume.voxel_volume_ml
    opacity = labels >= L.GGO
    region = tumour_region(volume, study)
    lung_ml = q.lung_volume_ml
    inside_ml = float(np.count_nonzero(opacity & region)) * voxel_ml
    outside_ml = float(np.count_nonzero(opacity & ~region)) * voxel_ml
    report = {
        "model": args.model or "default",
        "weights": args.weights,
        "series": args.series,
        "algorithm": f"{segmenter.info.name} {segmenter.info.version}",
        "lung_volume_ml": lung_ml,
        "right_lung_volume_ml": q.right_lung_volume_ml,
        "left_lung_volume_ml": q.left_lung_volume_ml,
        "burden_percent": q.burden_percent,
        "opacity_inside_tumour_boxes_ml": round(inside_ml, 1),
        "opacity_outside_tumour_ml": round(outside_ml, 1),
        "burden_outside_tumour_percent": round(100 * outside_ml / lung_ml, 2) if lung_ml else None,
        "ggo_outside_tumour_ml": round(float(np.count_nonzero((labels == L.GGO) & ~region)) * voxel_ml, 1),
        "high_opacity_outside_tumour_ml": round(
            float(np.count_nonzero((labels == L.HIGH_OPACITY) & ~region)) * voxel_ml, 1),
        "segment_seconds": round(result.timings_s["segment"], 2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
