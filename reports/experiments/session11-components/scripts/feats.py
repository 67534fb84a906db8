"""Per high-opacity component features after the default finishing: python feats.py OUT.pkl GLOB"""
import sys, pickle, glob
import numpy as np
from scipy import ndimage
sys.path.insert(0, "/work/main")
from lungburden import labels as L
from lungburden.inference.predict import ConvLSTMSegmenter
from lungburden.inference.postprocess import _CUBE, _component_shell

seg = ConvLSTMSegmenter(None, threads=1)
rows, cases = [], []
for path in sorted(glob.glob(sys.argv[2])):
    c = pickle.load(open(path, "rb"))
    hu = c.hu.astype(np.float32)
    lab = seg.labels_from_logits(c.pre, hu, c.logits, c.voxel_ml, affine=c.affine)
    truth = c.truth
    vml = c.voxel_ml
    sp = np.abs(np.diag(c.affine[:3, :3])) if False else np.linalg.norm(c.affine[:3, :3], axis=0)
    lungish = (lab >= L.LUNG)
    zs = np.flatnonzero(lungish.any(axis=(1, 2)))
    xs = np.flatnonzero(lungish.any(axis=(0, 1)))
    ys = np.flatnonzero(lungish.any(axis=(0, 2)))
    cranial_low = c.affine[2, 0] < 0  # index 0 is cranial
    counts = np.bincount(lab.ravel(), minlength=4) * vml
    tcounts = np.bincount(truth.ravel(), minlength=4) * vml
    cases.append(dict(case=c.case_id, truth_high=tcounts[3], pred_high=counts[3], truth_ggo=tcounts[2],
                      pred_ggo=counts[2], pred_lung=counts[1], truth_lung=tcounts[1]))
    high = lab == L.HIGH_OPACITY
    comps, n = ndimage.label(high, structure=_CUBE)
    boxes = ndimage.find_objects(comps)
    for i in range(1, n + 1):
        grown, m, shell = _component_shell(comps, i, boxes[i - 1])
        sub = lab[grown]
        around = np.bincount(sub[shell], minlength=4)
        tot = max(around.sum(), 1)
        h = hu[grown][m]
        idx = np.argwhere(m) + np.array([s.start for s in grown])
        mm = idx * sp
        cov = np.cov(mm.T) if len(mm) > 3 else np.eye(3)
        ev = np.sort(np.clip(np.linalg.eigvalsh(cov), 1e-6, None))[::-1]
        zc = idx[:, 0].mean()
        zrel = (zc - zs[0]) / max(zs[-1] - zs[0], 1)
        if not cranial_low:
            zrel = 1 - zrel
        xc, yc = idx[:, 2].mean(), idx[:, 1].mean()
        xrel = abs(xc - (xs[0] + xs[-1]) / 2) / max((xs[-1] - xs[0]) / 2, 1)
        yrel = (yc - ys[0]) / max(ys[-1] - ys[0], 1)
        tr = truth[grown][m]
        rows.append(dict(case=c.case_id, vol=m.sum() * vml, nsl=len(np.unique(idx[:, 0])),
                         med=np.median(h), mean=h.mean(), p10=np.percentile(h, 10), p90=np.percentile(h, 90),
                         std=h.std(), bg=around[0] / tot, lung=around[1] / tot, ggo=around[2] / tot,
                         zrel=zrel, xrel=xrel, yrel=yrel, ev1=np.sqrt(ev[0]), ev2=np.sqrt(ev[1]), ev3=np.sqrt(ev[2]),
                         case_lung=counts[1], case_ggo=counts[2], case_high=counts[3],
                         t_high=(tr == 3).mean(), t_ggo=(tr == 2).mean(), t_lung=(tr == 1).mean()))
    print(c.case_id, n, f"{counts[3]:.1f} vs {tcounts[3]:.1f}", flush=True)
pickle.dump(dict(rows=rows, cases=cases), open(sys.argv[1], "wb"))
