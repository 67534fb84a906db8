"""Per high-opacity component features (session 11's + vessel features): python feats2.py OUT.pkl GLOB"""
import sys, pickle, glob
import numpy as np
from scipy import ndimage
sys.path.insert(0, "/work/main")
from lungburden import labels as L
from lungburden.inference.predict import ConvLSTMSegmenter
from lungburden.inference.postprocess import _CUBE, _component_shell

seg = ConvLSTMSegmenter(None, threads=1)
rows, cases = [], []

def hessian_eigs(hu, sigma_vox):
    """Eigenvalues (ascending) of the Hessian of Gaussian-smoothed HU, per voxel (float32)."""
    H = np.empty(hu.shape + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]; order[i] += 1; order[j] += 1
            d = ndimage.gaussian_filter(hu, sigma_vox, order=order)
            H[..., i, j] = d; H[..., j, i] = d
    return np.linalg.eigvalsh(H)

for path in sorted(glob.glob(sys.argv[2])):
    c = pickle.load(open(path, "rb"))
    hu = c.hu.astype(np.float32)
    lab = seg.labels_from_logits(c.pre, hu, c.logits, c.voxel_ml, affine=c.affine)
    truth = c.truth
    vml = c.voxel_ml
    sp = np.linalg.norm(c.affine[:3, :3], axis=0)
    counts = np.bincount(lab.ravel(), minlength=4) * vml
    tcounts = np.bincount(truth.ravel(), minlength=4) * vml
    cases.append(dict(case=c.case_id, truth_high=tcounts[3], pred_high=counts[3], truth_ggo=tcounts[2],
                      pred_ggo=counts[2], pred_lung=counts[1], truth_lung=tcounts[1]))
    high = lab == L.HIGH_OPACITY
    comps, n = ndimage.label(high, structure=_CUBE)
    boxes = ndimage.find_objects(comps)
    for i in range(1, n + 1):
        grown, m, shell = _component_shell(comps, i, boxes[i - 1])
        # wider box for vessel features: 6 mm margin
        mg = [int(np.ceil(6.0 / s)) for s in sp]
        b = tuple(slice(max(s.start - g, 0), min(s.stop + g, lab.shape[k])) for k, (s, g) in enumerate(zip(boxes[i - 1], mg)))
        cm = comps[b] == i
        hb, lb = hu[b], lab[b]
        h = hb[cm]
        # shells at 1-2 mm and 2-4 mm (in mm, via EDT)
        dist = ndimage.distance_transform_edt(~cm, sampling=sp)
        feats = {}
        for name, lo, hi in (("s1", 0, 2.0), ("s2", 2.0, 4.5)):
            sh = (dist > lo) & (dist <= hi)
            nsh = max(sh.sum(), 1)
            feats[name + "_dense"] = ((hb > -250) & sh).sum() / nsh
            feats[name + "_dense_lung"] = ((hb > -250) & sh & (lb == L.LUNG)).sum() / nsh
            feats[name + "_dense_ggo"] = ((hb > -250) & sh & (lb == L.GGO)).sum() / nsh
            feats[name + "_hu"] = float(np.median(hb[sh])) if sh.any() else 0.0
        # Hessian at ~1.5 mm and ~3 mm
        for name, smm in (("h15", 1.5), ("h3", 3.0)):
            ev = hessian_eigs(hb, [smm / s for s in sp])[cm]
            l1, l2, l3 = ev[:, 0], ev[:, 1], ev[:, 2]
            neg = l1 < 0
            a1 = np.abs(l1) + 1e-3
            feats[name + "_tube"] = float(np.median(np.abs(l2) / a1))   # ~1 for tubes and blobs
            feats[name + "_blob"] = float(np.median(np.where(l3 < 0, np.abs(l3), 0) / a1))  # ~1 blob, ~0 tube
            feats[name + "_plate"] = float(np.median(np.where(l2 < 0, np.abs(l2), 0) / a1))
            feats[name + "_neg"] = float(neg.mean())
        tr = truth[grown][m]
        idx = np.argwhere(m) + np.array([s.start for s in grown])
        rows.append(dict(case=c.case_id, vol=m.sum() * vml, t_high=(tr == 3).mean(), t_ggo=(tr == 2).mean(),
                         maxhu=float(h.max()), p95=float(np.percentile(h, 95)), **feats))
    print(c.case_id, n, f"{counts[3]:.1f} vs {tcounts[3]:.1f}", flush=True)
pickle.dump(dict(rows=rows, cases=cases), open(sys.argv[1], "wb"))
