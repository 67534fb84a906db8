import sys; sys.path.insert(0, "/tmp/s13")
from cv3 import *
R, C = load([("/tmp/s11/f600.pkl", "g600.pkl"), ("/tmp/s11/f800.pkl", "g800.pkl")])
Rv, Cv = load([("/tmp/s11/f500.pkl", "g500.pkl")])
print("base dev", spearman_after(R, C, np.zeros(len(R), bool)), "val", spearman_after(Rv, Cv, np.zeros(len(Rv), bool)))
for fs_name, fs in [("img", IMG), ("img+new", IMG + NEW)]:
    X, y, g, w = R[fs].values, R.fp.values, R.case.values, R.vol.values
    for name, make in [("hgb", lambda: HistGradientBoostingClassifier(max_depth=3, max_iter=200, learning_rate=0.05)),
                       ("lr", lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)))]:
        prob = np.zeros(len(R))
        for tr, te in GroupKFold(5).split(X, y, g):
            m = make(); m.fit(X[tr], y[tr], **({"histgradientboostingclassifier__sample_weight" if False else "sample_weight": w[tr]} if name == "hgb" else {"logisticregression__sample_weight": w[tr]})); prob[te] = m.predict_proba(X[te])[:, 1]
        m = make(); m.fit(X, y, **({"sample_weight": w} if name == "hgb" else {"logisticregression__sample_weight": w}))
        pv = m.predict_proba(Rv[fs].values)[:, 1]
        for p in [0.5, 0.7, 0.8]:
            a = spearman_after(R, C, prob > p); b = spearman_after(Rv, Cv, pv > p)
            print(fs_name, name, p, "dev %.4f (%.0f/%.0f)" % a, "val %.4f (%.0f/%.0f)" % b)
