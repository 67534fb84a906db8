"""Merge session-11 component features with the vessel features; case-grouped CV of filters."""
import pickle, sys
import numpy as np, pandas as pd
sys.path.insert(0, "/tmp/s11")
from cv import FEATS, spearman_after
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.model_selection import GroupKFold

def load(pairs):
    Rs, Cs = [], []
    for old, new in pairs:
        a, b = pickle.load(open(old, "rb")), pickle.load(open(new, "rb"))
        ra, rb = pd.DataFrame(a["rows"]), pd.DataFrame(b["rows"])
        assert len(ra) == len(rb), (old, len(ra), len(rb))
        assert np.allclose(ra.vol, rb.vol) and (ra.case == rb.case).all()
        rb = rb.drop(columns=["case", "vol", "t_high", "t_ggo"])
        Rs.append(pd.concat([ra, rb], axis=1)); Cs.append(pd.DataFrame(a["cases"]))
    R, C = pd.concat(Rs, ignore_index=True), pd.concat(Cs, ignore_index=True)
    R["fp"] = (R.t_high < 0.5).astype(int)
    R["lvol"] = np.log(R.vol); R["elong"] = R.ev1 / R.ev2; R["flat"] = R.ev2 / R.ev3
    R["share"] = R.vol / R.case_high; R["lcg"] = np.log1p(R.case_ggo); R["lch"] = np.log1p(R.case_high)
    return R, C

NEW = [f"{s}_{k}" for s in ("s1", "s2") for k in ("dense", "dense_lung", "dense_ggo", "hu")] + \
      [f"{h}_{k}" for h in ("h15", "h3") for k in ("tube", "blob", "plate", "neg")] + ["maxhu", "p95"]
IMG = [f for f in FEATS if f not in ("lcg", "lch", "share")]
