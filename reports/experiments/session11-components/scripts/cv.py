"""Case-grouped CV of a component FP classifier on dev features; Spearman effect."""
import pickle, sys
import numpy as np, pandas as pd
from scipy import stats
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.tree import DecisionTreeClassifier, export_text
from sklearn.model_selection import GroupKFold

def load(paths):
    Rs, Cs = [], []
    for p in paths:
        d = pickle.load(open(p, "rb")); Rs.append(pd.DataFrame(d["rows"])); Cs.append(pd.DataFrame(d["cases"]))
    R, C = pd.concat(Rs, ignore_index=True), pd.concat(Cs, ignore_index=True)
    R["fp"] = (R.t_high < 0.5).astype(int)
    R["lvol"] = np.log(R.vol); R["elong"] = R.ev1 / R.ev2; R["flat"] = R.ev2 / R.ev3
    R["share"] = R.vol / R.case_high; R["lcg"] = np.log1p(R.case_ggo); R["lch"] = np.log1p(R.case_high)
    return R, C

FEATS = ["lvol", "nsl", "med", "mean", "p10", "p90", "std", "bg", "lung", "ggo", "zrel", "xrel", "yrel",
         "ev1", "ev2", "ev3", "elong", "flat", "lcg", "lch", "share"]

def spearman_after(R, C, remove):
    pred = C.set_index("case").pred_high.copy()
    rem = R[remove].groupby("case").vol.sum()
    pred.loc[rem.index] -= rem
    pred = pred.clip(lower=0)
    t = C.set_index("case").truth_high
    return stats.spearmanr(t, pred.loc[t.index]).statistic, R[remove & (R.fp == 1)].vol.sum(), R[remove & (R.fp == 0)].vol.sum()

if __name__ == "__main__":
    R, C = load(sys.argv[1:])
    print(len(C), "cases", len(R), "comps; base spearman", spearman_after(R, C, np.zeros(len(R), bool)))
    for thr in [0.5, 1, 1.5, 2, 3]:
        print("speck", thr, spearman_after(R, C, (R.vol < thr).values))
    X, y, g = R[FEATS].values, R.fp.values, R.case.values
    w = R.vol.values  # weight by volume: the Spearman cost is volume
    for name, make in [("hgb", lambda: HistGradientBoostingClassifier(max_depth=3, max_iter=200, learning_rate=0.05)),
                       ("tree3", lambda: DecisionTreeClassifier(max_depth=3, min_samples_leaf=10))]:
        prob = np.zeros(len(R))
        for tr, te in GroupKFold(5).split(X, y, g):
            m = make(); m.fit(X[tr], y[tr], sample_weight=w[tr]); prob[te] = m.predict_proba(X[te])[:, 1]
        for p in [0.5, 0.6, 0.7, 0.8, 0.9]:
            print(name, p, spearman_after(R, C, prob > p))
    m = DecisionTreeClassifier(max_depth=3, min_samples_leaf=10).fit(X, y, sample_weight=w)
    print(export_text(m, feature_names=FEATS))
