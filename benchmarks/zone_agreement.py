"""Lung-zone involvement of the pipeline against the phantoms' truth, and where the differences come from.

For each held-out phantom (the evaluation's :func:`~lungburden.training.data.sample_phantom_spec`,
seeds 1-10 by default), written as a DICOM series, loaded and analysed as the pipeline does
(:func:`~lungburden.pipeline.analyze_volume`, the shipped model unless ``--model``), the
involvement (% of the zone's lung field) of each of the six zones is computed three ways:

- ``truth``: the truth labels with the truth lung field and the phantom's own left/right split
  (``truth.json``);
- ``model``: the pipeline's result (its zones on its own predicted lung field, result.json);
- ``model in truth zones``: the model's opacities (GGO + high opacity) inside the truth lung
  field, zoned on the truth lung field; its difference from ``truth`` is the lesion error alone.

``model`` minus ``model in truth zones`` is then what the predicted lung field adds: zone
boundaries that move with the predicted extent of each lung (and the left/right split), and a
denominator of predicted lung. Printed: per zone the three values, then the max / median
absolute difference of ``model`` and of ``model in truth zones`` against the truth, the zones
beyond ``--tolerance`` points, and how far each lung's predicted top and bottom lie from the
truth's. Not a test: ``python benchmarks/zone_agreement.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from lungburden import labels as L
from lungburden.dicom_io.volume import load_files
from lungburden.phantom import generate_phantom, phantom_quantities, write_phantom_series
from lungburden.pipeline import analyze_volume
from lungburden.quantify import LUNGS, left_lung_mask, zone_involvement
from lungburden.segmentation.registry import DEFAULT_SEGMENTER, get_segmenter
from lungburden.training.data import sample_phantom_spec


def extent_mm(labels: np.ndarray, left: np.ndarray, affine: np.ndarray, lung: str) -> tuple[float, float]:
    """Top and bottom (LPS z of the voxel centres) of one lung of a label map."""
    mask = (labels > 0) & (left if lung == "left" else ~left)
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    z = affine[2, 0] * slices + affine[2, 3]
    return float(z.max()), float(z.min())


def measure(seed: int, segmenter, model: str, tmp: Path) -> dict:
    spec = sample_phantom_spec(seed)
    phantom = generate_phantom(spec)
    folder = write_phantom_series(phantom, tmp / f"phantom-{seed}", spec)
    volume = load_files(sorted(p for p in Path(folder).rglob("*.dcm")))
    if volume.hu.shape != phantom.labels.shape or not np.allclose(volume.affine, phantom.affine, atol=1e-3):
        raise RuntimeError(f"phantom {seed}: the loaded series is not on the phantom's grid")
    result = analyze_volume(volume, segmenter, model)
    truth = phantom_quantities(phantom).zones
    field = phantom.labels > 0
    opaque = result.labels >= L.GGO
    in_truth_zones = zone_involvement(np.where(field, np.where(opaque, result.labels, L.LUNG), 0).astype(np.uint8),
                                      phantom.affine, phantom.left_lung & field)
    predicted_left = left_lung_mask(result.labels, volume.affine)
    zones = []
    for t, m, x in zip(truth.zones, result.quantities.zones.zones, in_truth_zones.zones, strict=True):
        zones.append({"lung": t.lung, "zone": t.zone, "truth": t.involvement_percent,
                      "model": m.involvement_percent, "model_in_truth_zones": x.involvement_percent,
                      "truth_lung_ml": t.lung_volume_ml, "model_lung_ml": m.lung_volume_ml})
    shifts = {}
    for lung in LUNGS:
        t_top, t_bottom = extent_mm(phantom.labels, phantom.left_lung, phantom.affine, lung)
        m_top, m_bottom = extent_mm(result.labels, predicted_left, volume.affine, lung)
        shifts[lung] = {"top_mm": round(m_top - t_top, 1), "bottom_mm": round(m_bottom - t_bottom, 1)}
    return {"seed": seed, "slices": spec.slices, "spacing_mm": spec.slice_spacing_mm,
            "burden_truth": round(float(100 * np.count_nonzero(phantom.labels >= L.GGO) / np.count_nonzero(field)), 2),
            "burden_model": result.quantities.burden_percent, "zones": zones, "extent_shift": shifts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1-10", help="phantom seeds, e.g. 1-10 or 3,5,8 (default 1-10)")
    parser.add_argument("--model", default=DEFAULT_SEGMENTER)
    parser.add_argument("--tolerance", type=float, default=2.0, help="points of involvement (default 2)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every figure here")
    args = parser.parse_args()
    if "-" in args.seeds:
        first, last = (int(v) for v in args.seeds.split("-"))
        seeds = list(range(first, last + 1))
    else:
        seeds = [int(v) for v in args.seeds.split(",")]
    segmenter = get_segmenter(args.model)
    cases = []
    with tempfile.TemporaryDirectory(prefix="zone-agreement-") as tmp:
        for seed in seeds:
            case = measure(seed, segmenter, args.model, Path(tmp))
            cases.append(case)
            print(f"phantom {seed:3d} ({case['slices']} x {case['spacing_mm']} mm, burden truth "
                  f"{case['burden_truth']:5.1f} %, model {case['burden_model']:5.1f} %); lung extent shift "
                  + ", ".join(f"{lung} top {s['top_mm']:+.1f} bottom {s['bottom_mm']:+.1f} mm"
                              for lung, s in case["extent_shift"].items()), flush=True)
            for z in case["zones"]:
                flag = " *" if abs(z["model"] - z["truth"]) > args.tolerance else ""
                print(f"    {z['lung']:5s} {z['zone']:6s} truth {z['truth']:6.2f}  model {z['model']:6.2f}  "
                      f"model in truth zones {z['model_in_truth_zones']:6.2f}{flag}")
    own = [abs(z["model"] - z["truth"]) for c in cases for z in c["zones"]]
    fixed = [abs(z["model_in_truth_zones"] - z["truth"]) for c in cases for z in c["zones"]]
    boundary = [abs(z["model"] - z["model_in_truth_zones"]) for c in cases for z in c["zones"]]
    failing = [(c["seed"], z["lung"], z["zone"], z["truth"], z["model"], z["model_in_truth_zones"])
               for c in cases for z in c["zones"] if abs(z["model"] - z["truth"]) > args.tolerance]
    shifts = [abs(s[k]) for c in cases for s in c["extent_shift"].values() for k in ("top_mm", "bottom_mm")]
    summary = {
        "model": args.model, "seeds": seeds, "zones": len(own), "tolerance_points": args.tolerance,
        "own_lung_field": {"max": round(max(own), 2), "median": round(statistics.median(own), 2),
                           "beyond_tolerance": sum(d > args.tolerance for d in own)},
        "truth_lung_field": {"max": round(max(fixed), 2), "median": round(statistics.median(fixed), 2),
                             "beyond_tolerance": sum(d > args.tolerance for d in fixed)},
        "lung_field_part": {"max": round(max(boundary), 2), "median": round(statistics.median(boundary), 2)},
        "extent_shift_mm": {"max": max(shifts), "median": statistics.median(shifts)},
        "failing_zones": [dict(zip(("seed", "lung", "zone", "truth", "model", "model_in_truth_zones"), f,
                                   strict=True)) for f in failing],
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "cases": cases}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
