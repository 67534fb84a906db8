"""Cache network logits + truth for phantom seeds: python cache.py START N"""
import sys, pickle, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/main")
from lungburden.inference.calibration import collect_cases
from lungburden.inference.predict import ConvLSTMSegmenter
from lungburden.inference.training.data import CaseIndex, DataSpec
start, n = int(sys.argv[1]), int(sys.argv[2])
seg = ConvLSTMSegmenter(None, threads=1)
spec = DataSpec(phantoms=n, phantom_seed_start=start)
index = CaseIndex(spec.build_sources())
out = Path("/tmp/s11/cache")
for raw in index.iter_raw(index.ids()):
    t = time.time()
    [c] = collect_cases(seg, [raw])
    c.hu = c.hu.astype(np.int16) if np.abs(c.hu).max() < 32000 else c.hu
    with open(out / f"{c.case_id.replace('/', '_')}.pkl", "wb") as f:
        pickle.dump(c, f, protocol=4)
    print(c.case_id, c.hu.shape, f"{time.time()-t:.1f}s", flush=True)
