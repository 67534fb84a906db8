"""python offs.py GLOB : high-opacity logit offsets on cached cases (default finishing)."""
import sys, glob, pickle
import numpy as np, torch
from scipy import stats
sys.path.insert(0, "/work/main")
from lungburden.inference.predict import ConvLSTMSegmenter
from lungburden.inference.evaluation import overlap, DICE_CLASSES, Overlap
from lungburden.inference.calibration import _volumes
seg = ConvLSTMSegmenter(None, threads=1)
OFFS = [0.0, -0.5, -1.0]
pooled = {o: {k: Overlap() for k in ("lesion", "ggo", "high_opacity")} for o in OFFS}
tv, mv = [], {o: [] for o in OFFS}
for p in sorted(glob.glob(sys.argv[1])):
    c = pickle.load(open(p, "rb")); hu = c.hu.astype(np.float32)
    tv.append(_volumes(c.truth, c.voxel_ml))
    for o in OFFS:
        t = torch.tensor([0, 0, 0, o], dtype=torch.float32).view(1, -1, 1, 1)
        pred = seg.labels_from_logits(c.pre, hu, c.logits, c.voxel_ml, offsets=t, affine=c.affine)
        for k in pooled[o]: pooled[o][k] += overlap(c.truth, pred, DICE_CLASSES[k])
        mv[o].append(_volumes(pred, c.voxel_ml))
tv = np.array(tv)
for o in OFFS:
    m = np.array(mv[o])
    print(o, {k: round(float(v.dice), 4) for k, v in pooled[o].items()},
          "Sp ggo %.4f high %.4f" % (stats.spearmanr(tv[:, 0], m[:, 0]).statistic, stats.spearmanr(tv[:, 1], m[:, 1]).statistic), flush=True)
