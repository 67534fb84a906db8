import sys, pickle, numpy as np
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/tmp/s13")
from cv3 import load
from lungburden.inference.predict import ConvLSTMSegmenter
from lungburden.inference.component_filter import describe_high_opacity
seg = ConvLSTMSegmenter(None, threads=1, high_opacity_filter=False)
R, C = load([("/tmp/s11/f600.pkl", "g600.pkl")])
mine = ["lvol","nsl","med","mean","p10","p90","std","p95","maxhu","bg","lung","ggo","zrel","xrel","yrel","ev1","ev2","ev3","elong","flat",
        "s1_dense","s1_dense_lung","s1_dense_ggo","s1_hu","s2_dense","s2_dense_lung","s2_dense_ggo","s2_hu"]
worst = 0
for k in range(600, 640):
    c = pickle.load(open(f"/tmp/s11/cache/phantom-{k}.pkl", "rb"))
    hu = c.hu.astype(np.float32)
    lab = seg.labels_from_logits(c.pre, hu, c.logits, c.voxel_ml, affine=c.affine)
    f = describe_high_opacity(lab, hu, c.affine, c.voxel_ml)
    r = R[R.case == c.case_id]
    assert f.count == len(r), (k, f.count, len(r))
    if f.count:
        worst = max(worst, float(np.nanmax(np.abs(f.features - r[mine].values) / (1 + np.abs(r[mine].values)))))
print("40 cases, worst relative difference", worst)
