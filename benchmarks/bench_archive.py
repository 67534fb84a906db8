"""Archive-mode throughput: series per hour with ``--engine local`` and with 1 and 2 Celery workers.

A real Orthanc holds ``--studies`` phantom chest CT studies; a real Redis broker and
``lungburden worker`` processes run on this machine. Each configuration runs ``--runs`` times
(the results stored in Orthanc are deleted between runs, the table is new each time); the
median is printed with the time the engine adds per series (hand-out to outcome, minus the
task's own retrieve + analyse + store time). Not a test: ``python benchmarks/bench_archive.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from archive_helpers import LUNGBURDEN, ArchiveWorker, RedisServer, build_archive  # noqa: E402
from orthanc import OrthancServer  # noqa: E402


def clear_results(orthanc: OrthancServer) -> None:
    """Delete the SEG and SR series (so that the next run analyses everything again)."""
    for series in orthanc.get("/series?expand"):  # type: ignore[union-attr]
        if series["MainDicomTags"].get("Modality") in ("SEG", "SR", "OT", "DOC"):
            orthanc.delete(f"/series/{series['ID']}")


def run(orthanc: OrthancServer, table: Path, model: str, engine: list[str]) -> dict:
    proc = subprocess.run([LUNGBURDEN, "batch", "--url", orthanc.dicomweb_url, "--table", str(table), "--model", model,
                           "--no-progress", *engine], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="threshold", help="segmenter (default threshold; the ConvLSTM: convlstm)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
        root = Path(tmp)
        studies = build_archive(root / "data", seeds=tuple(range(100, 100 + args.studies)), size=args.size,
                                slices=args.slices, bad=False)
        with OrthancServer(root / "orthanc") as orthanc, RedisServer(root / "redis") as redis:
            for study in studies:
                for path in sorted(study.folder.glob("*.dcm")):
                    orthanc.upload(path)
            configs: dict[str, tuple[list[str], int]] = {
                "local, 1 process": (["--engine", "local", "--workers", "1"], 0),
                "local, 2 processes": (["--engine", "local", "--workers", "2"], 0),
                "celery, 1 worker": (["--engine", "celery", "--broker", redis.url, "--max-in-flight", "1"], 1),
                "celery, 2 workers": (["--engine", "celery", "--broker", redis.url, "--max-in-flight", "2"], 2),
            }
            report: dict[str, dict] = {}
            for name, (engine, worker_count) in configs.items():
                workers = [ArchiveWorker(root / "workers", redis.url, f"w{n}") for n in range(worker_count)]
                try:
                    for worker in workers:
                        worker.start()
                    runs = []
                    for n in range(args.runs):
                        clear_results(orthanc)
                        runs.append(run(orthanc, root / f"{name.replace(' ', '').replace(',', '-')}-{n}.csv",
                                        args.model, engine))
                finally:
                    for worker in workers:
                        worker.stop()
                wall = statistics.median(r["wall_s"] for r in runs)
                report[name] = {
                    "series_per_hour": round(3600 * args.studies / wall, 1),
                    "wall_s_median": round(wall, 2),
                    "task_s_median": statistics.median(r["task_s_median"] for r in runs),
                    "engine_overhead_s_median": statistics.median(r["engine_overhead_s_median"] for r in runs),
                    "done": [r["done"] for r in runs],
                }
                print(f"{name:20s} {report[name]['series_per_hour']:8.1f} series/h   wall {wall:6.2f} s   task "
                      f"{report[name]['task_s_median']:.2f} s/series   engine adds "
                      f"{report[name]['engine_overhead_s_median']:.3f} s/series", flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "studies": args.studies,
                      "slices": args.slices, "size": args.size, "model": args.model, "runs": args.runs,
                      "results": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
