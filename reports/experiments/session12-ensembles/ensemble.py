"""Logit-averaging ensembles of checkpoints, finished with the segmenter's own label steps.

python ensemble.py OUT.json START N NAME=CKPT [NAME=CKPT ...] --combos A+B,A+B+C

Each phantom (seeds START..START+N-1) is generated once; every network runs once on it
(model-grid logits, float16, `ConvLSTMSegmenter.model_grid_logits`); each combination averages
the logits of its members and is finished by `labels_from_logits` (offsets, argmax on the source
grid, body clearing, GGO margin, component steps: what `segment` does). Writes per case and per
combination the truth and model volumes (GGO mL, high-opacity mL, burden %) and the overlap
counts, and prints pooled Dice and Spearman r at the end.
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, "/work/main")
from lungburden.inference.calibration import _volumes  # noqa: E402
from lungburden.inference.evaluation import DICE_CLASSES, overlap  # noqa: E402
from lungburden.inference.predict import ConvLSTMSegmenter  # noqa: E402
from lungburden.inference.training.data import CaseIndex, DataSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("start", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--combos", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--consensus", default="", help="A+B: also score high-opacity consensus variants of A+B")
    a = ap.parse_args()
    segs = {}
    for item in a.models:
        name, path = item.split("=", 1)
        segs[name] = ConvLSTMSegmenter(None if path == "default" else path, threads=a.threads)
    combos = [c.split("+") for c in a.combos.split(",")]
    finisher = next(iter(segs.values()))
    index = CaseIndex(DataSpec(phantoms=a.n, phantom_seed_start=a.start).build_sources())
    rows = []
    for raw in index.iter_raw(index.ids()):
        t0 = time.time()
        volume = raw.to_volume()
        hu = volume.hu
        truth = np.asarray(raw.labels, np.uint8)
        logits, pre = {}, None
        for name, seg in segs.items():
            pre, logits[name] = seg.model_grid_logits(hu)
        row = {"case": raw.case_id, "truth": _volumes(truth, volume.voxel_volume_ml), "combos": {}}
        preds = {}
        for combo in combos:
            mean = torch.stack([logits[m].float() for m in combo]).mean(0)
            pred = finisher.labels_from_logits(pre, hu, mean, volume.voxel_volume_ml,
                                               affine=np.asarray(volume.affine))
            preds["+".join(combo)] = pred
            ov = {k: overlap(truth, pred, DICE_CLASSES[k]) for k in ("lesion", "ggo", "high_opacity")}
            row["combos"]["+".join(combo)] = {
                "volumes": _volumes(pred, volume.voxel_volume_ml),
                "overlap": {k: [int(v.tp), int(v.fp), int(v.fn)] for k, v in ov.items()}}
        if a.consensus:
            members = a.consensus.split("+")
            mean_pred = preds[a.consensus]
            for name, pred in consensus_variants(mean_pred, [preds[m] for m in members]).items():
                ov = {k: overlap(truth, pred, DICE_CLASSES[k]) for k in ("lesion", "ggo", "high_opacity")}
                row["combos"][f"{a.consensus}:{name}"] = {
                    "volumes": _volumes(pred, volume.voxel_volume_ml),
                    "overlap": {k: [int(v.tp), int(v.fp), int(v.fn)] for k, v in ov.items()}}
        rows.append(row)
        print(raw.case_id, f"{time.time() - t0:.1f}s", flush=True)
        with open(a.out, "w") as f:
            json.dump(rows, f)
    summarise(rows)


def consensus_variants(mean_pred: np.ndarray, member_preds: list[np.ndarray]) -> dict[str, np.ndarray]:
    """High opacity of the ensemble kept only where the members agree:
    ``vote``: voxels every member (finished alone) labels high opacity; the others take the first
    member's non-high label (else the next member's);
    ``compT``: 26-connected high-opacity components of the ensemble of which every member's own
    high opacity covers at least T; the others take the label of most of their shell."""
    from scipy import ndimage

    from lungburden import labels as L
    from lungburden.inference.postprocess import _CUBE, _component_shell

    out = {}
    vote = mean_pred.copy()
    disagree = (mean_pred == L.HIGH_OPACITY) & ~np.logical_and.reduce([p == L.HIGH_OPACITY for p in member_preds])
    fill = member_preds[-1].copy()
    for p in reversed(member_preds[:-1]):
        fill = np.where(p != L.HIGH_OPACITY, p, fill)
    vote[disagree] = np.where(fill[disagree] == L.HIGH_OPACITY, L.GGO, fill[disagree])
    out["vote"] = vote
    high = mean_pred == L.HIGH_OPACITY
    components, count = ndimage.label(high, structure=_CUBE)
    if count:
        index = np.arange(1, count + 1)
        sizes = np.bincount(components[high], minlength=count + 1)[1:]
        cover = np.min([np.bincount(components[high & (p == L.HIGH_OPACITY)], minlength=count + 1)[1:] / sizes
                        for p in member_preds], axis=0)
        boxes = ndimage.find_objects(components)
    for t in (0.1, 0.3, 0.5):
        pred = mean_pred.copy()
        if count:
            for i in index[cover < t]:
                grown, component, shell = _component_shell(components, int(i), boxes[i - 1])
                around = np.bincount(pred[grown][shell], minlength=L.HIGH_OPACITY)[:L.HIGH_OPACITY]
                pred[grown][component] = int(np.argmax(around))
        out[f"comp{t:g}"] = pred
    return out


def summarise(rows) -> None:
    truth = np.array([r["truth"] for r in rows])
    print(f"{len(rows)} cases")
    for combo in rows[0]["combos"]:
        vols = np.array([r["combos"][combo]["volumes"] for r in rows])
        dice = {}
        for k in ("lesion", "ggo", "high_opacity"):
            tp, fp, fn = np.sum([r["combos"][combo]["overlap"][k] for r in rows], axis=0)
            dice[k] = 2 * tp / (2 * tp + fp + fn)
        sp = [stats.spearmanr(truth[:, i], vols[:, i]).statistic for i in range(3)]
        print(f"{combo:24s} DSC lesion {dice['lesion']:.4f} GGO {dice['ggo']:.4f} high {dice['high_opacity']:.4f}"
              f" | Spearman GGO {sp[0]:.4f} high {sp[1]:.4f} burden {sp[2]:.4f}"
              f" | bias {np.mean(vols[:, 2] - truth[:, 2]):+.2f} %", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--summary":  # --summary A.json [B.json ...]: the combinations all files have
        rows = [row for path in sys.argv[2:] for row in json.load(open(path))]
        common = set.intersection(*(set(r["combos"]) for r in rows))
        summarise([{**r, "combos": {k: v for k, v in r["combos"].items() if k in common}} for r in rows])
    else:
        main()
