"""Lung field and opacity of the shipped segmenter on the real studies without pneumonia.

    python benchmarks/real_ct_check.py [--out DIR] [--slices a0001:12,60 lidc3:40,138]

Data root: ``$LUNGBURDEN_DATA`` (default ``../shared/data`` next to the project). For the
Lung-PET-CT-Dx study (lung kernel) and the two LIDC-IDRI series, prints the lung volume, the
burden, GGO and high-opacity mL, the opacity outside the tumour boxes (Lung-PET-CT-Dx), and
whether the trachea (a dark air tube near the midline of the top slices) or gas below the lungs
is in the lung field; writes overlays of chosen slices (lung field blue, GGO yellow, high
opacity red) to ``--out``.
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
from lungburden.segmentation.convlstm import ConvLSTMSegmenter  # noqa: E402
from lungburden.segmentation.lung_field import airway_mask, outside_air_mask  # noqa: E402
from lungburden.training.data import tumour_region  # noqa: E402

DATA = Path(os.environ.get("LUNGBURDEN_DATA", ROOT.parent / "shared" / "data"))
STUDIES = {"a0001": "real-ct/lung-pet-ct-dx-A0001/lung-kernel-L-5mm",
           "lidc1": "real-ct/lidc-idri-0001", "lidc3": "real-ct/lidc-idri-0003"}


def overlay(hu: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(hu, cmap="gray", vmin=-1350, vmax=150)
    ax.imshow(labels, cmap=ListedColormap([(0, 0, 0, 0), (0.1, 0.5, 1, 0.35), (1, 1, 0, 0.5), (1, 0, 0, 0.6)]),
              vmin=0, vmax=3, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="real_ct_check")
    p.add_argument("--slices", nargs="*", default=["a0001:12,30,60", "lidc1:5,120", "lidc3:40,113,114,138"],
                   help="NAME:K,K,... slice indices to draw")
    p.add_argument("--off", action="store_true", help="without the lung-field, opacity-split and lesion-region rules")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draw = {item.split(":")[0]: [int(k) for k in item.split(":")[1].split(",")] for item in args.slices}
    kwargs = dict(lung_field_rules=None, opacity_split=None, lesion_regions=None) if args.off else {}
    segmenter = ConvLSTMSegmenter(**kwargs)
    report = {}
    for name, rel in STUDIES.items():
        folder = DATA / rel
        volume = load_files(sorted(folder.glob("*.dcm")))
        labels = segmenter.segment(volume)
        v = volume.voxel_volume_ml
        field = labels >= L.LUNG
        lung_ml = float(field.sum() * v)
        row = {"lung_ml": round(lung_ml, 1),
               "burden_percent": round(100 * float((labels >= L.GGO).sum() * v) / lung_ml, 2) if lung_ml else None,
               "ggo_ml": round(float((labels == L.GGO).sum() * v), 1),
               "high_opacity_ml": round(float((labels == L.HIGH_OPACITY).sum() * v), 1)}
        airway = airway_mask(volume.hu, volume.affine)
        row["trachea_found"] = airway is not None
        row["field_in_airway_ml"] = round(float((field & airway).sum() * v), 1) if airway is not None else None
        row["field_in_outside_air_ml"] = round(float((field & outside_air_mask(volume.hu)).sum() * v), 1)
        row["field_in_gas_below_minus950_ml"] = round(float((field & (volume.hu <= -950)).sum() * v), 1)
        if name == "a0001":
            region = tumour_region(volume, folder.parent)
            outside = float(((labels >= L.GGO) & ~region).sum() * v)
            row["opacity_outside_tumour_percent"] = round(100 * outside / lung_ml, 2) if lung_ml else None
        report[name] = row
        for k in draw.get(name, []):
            if 0 <= k < len(labels):
                overlay(volume.hu[k], labels[k], out / f"{name}-slice{k:03d}.png", f"{name} slice {k}")
        print(name, json.dumps(row), flush=True)
    (out / "real_ct_check.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
