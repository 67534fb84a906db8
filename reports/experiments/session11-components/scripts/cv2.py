import sys; sys.path.insert(0, "/tmp/s11")
import numpy as np
from cv import load, spearman_after, FEATS
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.pipeline import make_pipeline
from sklearn.model_selection import GroupKFold
R, C = load(["/tmp/s11/f600.pkl", "/tmp/s11/f800.pkl"])
Rv, Cv = load(["/tmp/s11/f500.pkl"])
sets = {
 "all": FEATS,
 "nocase": [f for f in FEATS if f not in ("lcg", "lch", "share")],
 "small": ["lvol", "med", "p10", "p90", "bg", "lung", "ggo", "zrel", "xrel", "yrel", "lcg", "lch"],
}
y, g, w = R.fp.values, R.case.values, R.vol.values
for sname, feats in sets.items():
    X = R[feats].values
    for name, make in [("hgb", lambda: HistGradientBoostingClassifier(max_depth=3, max_iter=200, learning_rate=0.05)),
                       ("lr", lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)))]:
        prob = np.zeros(len(R))
        for tr, te in GroupKFold(5).split(X, y, g):
            m = make(); m.fit(X[tr], y[tr], **({"sample_weight": w[tr]} if name == "hgb" else {"logisticregression__sample_weight": w[tr]})); prob[te] = m.predict_proba(X[te])[:, 1]
        m = make(); m.fit(X, y, **({"sample_weight": w} if name == "hgb" else {"logisticregression__sample_weight": w}))
        pv = m.predict_proba(Rv[feats].values)[:, 1]
        out = []
        for p in [0.5, 0.7, 0.9]:
            s, fp, tp = spearman_after(R, C, prob > p); sv, fpv, tpv = spearman_after(Rv, Cv, pv > p)
            out.append(f"p{p}: dev {s:.4f} ({fp:.0f}/{tp:.0f}) val {sv:.4f} ({fpv:.0f}/{tpv:.0f})")
        print(sname, name, " | ".join(out))
