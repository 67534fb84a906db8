"""What each label-finishing step of the network segmenter adds, on phantoms (docs/model-development.md).

    python benchmarks/finishing_steps.py [--phantoms 100] [--phantom-seed-start 500] [--weights CKPT]
        [--threads 1] [--out FILE]

Runs the network once per phantom (``ConvLSTMSegmenter.model_grid_logits``), then finishes the
stored logits with the segmenter's own steps (``labels_from_logits``), enabling the steps of
:mod:`lungburden.segmentation.postprocess` one after another, and prints per configuration the
pooled Dice (lesion, GGO, high opacity), the Spearman r of GGO / high-opacity volume and the mean
burden error against the phantoms' truth (the scoring of ``lungburden model calibrate``); the last row
adds the checkpoint's learned high-opacity component filter (:mod:`lungburden.segmentation.component_filter`),
when it has one. Seeds 500+
are the validation phantoms the steps were chosen on; seeds 1-100 are the held-out evaluation
set (report them, do not tune on them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lungburden.segmentation.convlstm import ConvLSTMSegmenter  # noqa: E402
from lungburden.segmentation.postprocess import (  # noqa: E402
    APEX_MIN_LUNG_CM2,
    FAT_MEDIAN_HU,
    MAX_DETACHED_ML,
    MIN_HIGH_OPACITY_ML,
    GGOMargins,
)
from lungburden.training.calibration import collect_cases, score_offsets  # noqa: E402
from lungburden.training.data import CaseIndex, DataSpec  # noqa: E402

#: The segmenter with every finishing step off (the 0.5 mL opacity-speck filter stays).
ALL_OFF = dict(ggo_margins=None, max_detached_ml=0, apex_min_lung_cm2=0, min_high_opacity_ml=0, fat_median_hu=None)
#: Steps switched on one after another (name, segmenter keyword arguments); the last is the default.
STEPS = [
    ("network only (argmax, body, 0.5 mL opacity specks)", {}),
    ("+ GGO / lung margin by attenuation", dict(ggo_margins=GGOMargins(high_hu=None))),
    ("+ GGO / high-opacity margin by attenuation", dict(ggo_margins=GGOMargins())),
    ("+ detached opacity removed", dict(max_detached_ml=MAX_DETACHED_ML)),
    ("+ high opacity above the apex removed", dict(apex_min_lung_cm2=APEX_MIN_LUNG_CM2)),
    ("+ high-opacity specks relabelled", dict(min_high_opacity_ml=MIN_HIGH_OPACITY_ML)),
    ("+ fat-attenuation high opacity relabelled", dict(fat_median_hu=FAT_MEDIAN_HU)),
]
#: The last row: the checkpoint's component filter on top (the default of a checkpoint that has one).
FILTER_STEP = "+ learned high-opacity component filter (= default)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phantoms", type=int, default=100)
    p.add_argument("--phantom-seed-start", type=int, default=500)
    p.add_argument("--weights", default=None, help="checkpoint (default: the shipped weights)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args()
    started = time.perf_counter()
    base = ConvLSTMSegmenter(args.weights, threads=args.threads)
    spec = DataSpec(phantoms=args.phantoms, phantom_seed_start=args.phantom_seed_start)
    index = CaseIndex(spec.build_sources())
    cases = collect_cases(base, index.iter_raw(index.ids()))
    # A calibrated checkpoint's offsets apply to every configuration alike.
    offsets = (base.logit_offsets.flatten().tolist() if base.logit_offsets is not None
               else [0.0] * int(cases[0].logits.shape[1]))
    lines = [f"phantoms {args.phantom_seed_start}..{args.phantom_seed_start + args.phantoms - 1} "
             f"({len(cases)} cases), weights {base.info.parameters['weights']}, precision {base.precision}",
             "| configuration | lesion DSC | GGO DSC | high DSC | Spearman GGO | Spearman high | burden bias % |",
             "|---|---|---|---|---|---|---|"]
    settings = dict(ALL_OFF)
    steps = STEPS + ([(FILTER_STEP, {})] if base.high_opacity_filter is not None else [])
    for name, enabled in steps:
        settings.update(enabled)
        variant = ConvLSTMSegmenter(model=base.source_model, threads=args.threads, precision=base.precision,
                                    **settings)
        if name == FILTER_STEP:
            variant.high_opacity_filter = base.high_opacity_filter
        s = score_offsets(variant, cases, offsets)
        lines.append(f"| {name} | {s.lesion_dice:.4f} | {s.ggo_dice:.4f} | {s.high_opacity_dice:.4f} | "
                     f"{s.spearman_ggo:.4f} | {s.spearman_high_opacity:.4f} | {s.burden_bias:+.2f} |")
        print(lines[-1], flush=True)
    lines.append(f"wall time {time.perf_counter() - started:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
