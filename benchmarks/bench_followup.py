"""What a prior costs: ``lungburden analyze`` of a patient's newest study without priors, with one
prior whose lungburden SR is in the PACS, and with one prior without (retrieved, analysed, stored).

A real Orthanc on this machine holds the prior, a phantom chest CT (512 x 512) of the same
patient two weeks earlier, searched and retrieved by DICOMweb (QIDO-RS, WADO-RS, STOW-RS;
``--source dicomweb``) or by DIMSE (C-FIND, C-GET, C-STORE; ``--source dimse``; C-MOVE instead of
C-GET: ``--source dimse-move``); the newest study is local files, as ``analyze`` reads them.
Each configuration runs ``--runs`` times, interleaved, as its own ``lungburden analyze`` process
(imports and model load included); before each run without the SR the prior's results are
deleted from Orthanc. Printed: the median wall time, the median of result.json's ``priors``
step, the seconds a prior adds (median minus the median without priors), the ratio to the run
without priors, and the peak memory (maximum resident set size of the process; this small
coordinating process writes the phantoms with ``lungburden phantom`` so as not to count in it).
Not a test: ``python benchmarks/bench_followup.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from archive_helpers import LUNGBURDEN  # noqa: E402
from bench_archive import clear_results  # noqa: E402
from orthanc import OrthancServer  # noqa: E402
from processes import free_port  # noqa: E402

PATIENT = ("--patient-id", "BENCH-FOLLOWUP", "--patient-name", "BENCH^FOLLOWUP")
#: Each configuration and the source its prior must have (the run without SR stores it for the next).
CONFIGURATIONS = {"no priors": [], "1 prior without SR": ["analysis"], "1 prior, SR in the PACS": ["sr"]}


def analyze(folder: Path, out: Path, model: str, priors_from: list[str] | None) -> dict:
    """One ``lungburden analyze`` process: wall seconds, the priors step, peak RSS (MiB), priors found."""
    command = [LUNGBURDEN, "analyze", str(folder), "--out", str(out), "--model", model]
    if priors_from:
        command += ["--priors-from", *priors_from, "--max-priors", "1"]
    out.mkdir(parents=True)
    with (out / "stderr.txt").open("w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError((out / "stderr.txt").read_text()[-3000:])
    document = json.loads((out / "result.json").read_text())
    return {"wall_s": wall, "priors_s": document["timings_s"].get("priors", 0.0),
            "peak_rss_mib": usage.ru_maxrss / 1024, "priors": [p["source"] for p in document.get("priors", [])]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="threshold,convlstm", help="segmenters, comma-separated")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--spacing", type=float, default=5.0, help="slice spacing in mm (default 5)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--source", choices=("dicomweb", "dimse", "dimse-move"), default="dicomweb",
                        help="how the PACS is searched and read (default dicomweb)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-followup-") as tmp:
        root = Path(tmp)
        for name, seed, burden, date in (("prior", 201, 30, "20240105"), ("current", 202, 15, "20240119")):
            subprocess.run([LUNGBURDEN, "phantom", str(root / name), "--seed", str(seed), "--slices", str(args.slices),
                            "--spacing", str(args.spacing), "--burden", str(burden), *PATIENT, "--study-date", date],
                           check=True, capture_output=True)
        report: dict[str, dict] = {}
        receiver = free_port()
        registered = {"DicomModalities": {
            "lungburden": {"AET": "LUNGBURDEN", "Host": "127.0.0.1", "Port": 11112, "AllowFind": True,
                           "AllowGet": True, "AllowMove": True, "AllowStore": True},
            "lungburden-priors": {"AET": "LBPRIORS", "Host": "127.0.0.1", "Port": receiver}}}
        with OrthancServer(root / "orthanc", extra_config=registered) as orthanc:
            source = [orthanc.dicomweb_url if args.source == "dicomweb"
                      else f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]
            if args.source == "dimse-move":
                source += ["--priors-move-to", f"LBPRIORS:{receiver}"]
            for path in sorted((root / "prior").rglob("*.dcm")):
                orthanc.upload(path)
            for model in [m.strip() for m in args.models.split(",") if m.strip()]:
                runs: dict[str, list[dict]] = {name: [] for name in CONFIGURATIONS}
                for n in range(args.runs):
                    for k, (name, sources) in enumerate(CONFIGURATIONS.items()):
                        priors_from = None if name == "no priors" else source
                        if sources == ["analysis"]:
                            clear_results(orthanc)
                        run = analyze(root / "current", root / "out" / model / f"{n}-{k}", model, priors_from)
                        assert run["priors"] == sources, (name, run["priors"])
                        runs[name].append(run)
                base = statistics.median(r["wall_s"] for r in runs["no priors"])
                report[model] = {}
                for name, values in runs.items():
                    wall = statistics.median(r["wall_s"] for r in values)
                    report[model][name] = {
                        "runs": len(values), "wall_s_median": round(wall, 2),
                        "priors_step_s_median": round(statistics.median(r["priors_s"] for r in values), 2),
                        "extra_s": round(wall - base, 2), "ratio": round(wall / base, 2),
                        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in values)),
                    }
                    row = report[model][name]
                    print(f"{model:10s} {name:24s} wall {wall:6.2f} s  priors step {row['priors_step_s_median']:5.2f} s"
                          f"  extra {row['extra_s']:+6.2f} s  x{row['ratio']:.2f}  peak {row['peak_rss_mib']} MiB",
                          flush=True)
            clear_results(orthanc)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "coordinator_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "source": args.source, "slices": args.slices, "size": 512, "spacing_mm": args.spacing,
                      "runs": args.runs,
                      "results": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
