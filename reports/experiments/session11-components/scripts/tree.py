import sys; sys.path.insert(0, "/tmp/s11")
import numpy as np
from cv import load, spearman_after, FEATS
from sklearn.tree import DecisionTreeClassifier, export_text
R, C = load(["/tmp/s11/f600.pkl", "/tmp/s11/f800.pkl"]); Rv, Cv = load(["/tmp/s11/f500.pkl"])
feats = [f for f in FEATS if f not in ("lcg", "lch", "share")]
for depth in [2, 3, 4]:
    for leaf in [10, 30]:
        m = DecisionTreeClassifier(max_depth=depth, min_samples_leaf=leaf, random_state=0).fit(R[feats].values, R.fp.values, sample_weight=R.vol.values)
        for p in [0.5, 0.7]:
            a = spearman_after(R, C, m.predict_proba(R[feats].values)[:, 1] > p); b = spearman_after(Rv, Cv, m.predict_proba(Rv[feats].values)[:, 1] > p)
            print(depth, leaf, p, f"dev {a[0]:.4f} ({a[1]:.0f}/{a[2]:.0f}) val {b[0]:.4f} ({b[1]:.0f}/{b[2]:.0f})")
        if depth == 3 and leaf == 30: print(export_text(m, feature_names=feats, show_weights=True))
