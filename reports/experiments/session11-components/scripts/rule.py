import sys; sys.path.insert(0, "/tmp/s11")
import numpy as np
from cv import load, spearman_after
R, C = load(["/tmp/s11/f600.pkl", "/tmp/s11/f800.pkl"]); Rv, Cv = load(["/tmp/s11/f500.pkl"])
def rule(R, H, G, ratio=None, shell=None):
    m = (R.case_high <= H) & (R.case_ggo >= G)
    if ratio is not None:
        m = (R.case_high <= ratio * R.case_ggo)
        if H: m &= R.case_high <= H
    if shell is not None:
        m &= R.ggo >= shell
    return m.values
for H in [5, 10, 16, 25, 40]:
    for G in [50, 100, 150, 300]:
        a = spearman_after(R, C, rule(R, H, G)); b = spearman_after(Rv, Cv, rule(Rv, H, G))
        print(f"H{H} G{G}: dev {a[0]:.4f} ({a[1]:.0f}/{a[2]:.0f}) val {b[0]:.4f} ({b[1]:.0f}/{b[2]:.0f})")
for r in [0.01, 0.02, 0.03, 0.05, 0.1]:
    for H in [0, 16, 40]:
        a = spearman_after(R, C, rule(R, H, 0, r)); b = spearman_after(Rv, Cv, rule(Rv, H, 0, r))
        print(f"ratio{r} H{H}: dev {a[0]:.4f} ({a[1]:.0f}/{a[2]:.0f}) val {b[0]:.4f} ({b[1]:.0f}/{b[2]:.0f})")
