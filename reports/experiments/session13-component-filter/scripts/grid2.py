import sys; sys.path.insert(0, "/tmp/s13")
from cv3 import *
R, C = load([("/tmp/s11/f600.pkl", "g600.pkl"), ("/tmp/s11/f800.pkl", "g800.pkl")])
Rv, Cv = load([("/tmp/s11/f500.pkl", "g500.pkl")])
print(len(R), "components", R.fp.sum(), "false")
NOH = [f for f in NEW if not f.startswith("h")]
for name, fs in [("noHessian", IMG + NOH), ("noHess-noPos", [f for f in IMG + NOH if f not in ("zrel", "xrel", "yrel")])]:
    X, y, g, w = R[fs].values, R.fp.values, R.case.values, R.vol.values
    make = lambda: HistGradientBoostingClassifier(max_depth=3, max_iter=400, learning_rate=0.05, early_stopping=False, random_state=0)
    prob = np.zeros(len(R))
    for tr, te in GroupKFold(5).split(X, y, g):
        m = make(); m.fit(X[tr], y[tr], sample_weight=w[tr]); prob[te] = m.predict_proba(X[te])[:, 1]
    m = make(); m.fit(X, y, sample_weight=w); pv = m.predict_proba(Rv[fs].values)[:, 1]
    for p in [0.4, 0.5, 0.6]:
        a = spearman_after(R, C, prob > p); b = spearman_after(Rv, Cv, pv > p)
        print(name, p, "dev %.4f (%.0f/%.0f)" % a, "val %.4f (%.0f/%.0f)" % b, flush=True)
