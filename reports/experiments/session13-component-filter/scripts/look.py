import sys; sys.path.insert(0, "/tmp/s13")
from cv3 import *
R, C = load([("/tmp/s11/f600.pkl", "g600.pkl"), ("/tmp/s11/f800.pkl", "g800.pkl")])
small = R[R.vol < 20]
pd.set_option("display.width", 200)
print(small.groupby("fp")[NEW + ["med", "ggo", "bg", "lung", "elong"]].median().T)
# univariate AUC, volume-weighted
from sklearn.metrics import roc_auc_score
for f in NEW + IMG:
    print(f, round(roc_auc_score(small.fp, small[f], sample_weight=small.vol), 3))
