"""Benchmark of the DICOM node (not a test): receive throughput and end-to-end latency.

1. Receive throughput: the same files are sent by DCMTK ``storescu`` (one association) to
   ``lungburden serve`` (pynetdicom SCP; fsync of every instance + job database row) and to DCMTK
   ``storescp`` (``+B`` bit-preserving and default; no fsync), in the same run; median of
   ``--repeat`` runs. DCMTK leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is set in its
   environment, which costs it a delayed ACK (~40 ms) per instance on loopback: both are shown.
2. Latency: a ``--slices`` phantom series is sent to a node that delivers to a real Orthanc by
   C-STORE; reported is the time from the last instance received to the SEG + SR stored in
   Orthanc, minus ``series_quiet_seconds`` (the waiting time the configuration imposes), split into
   completion detection, queue pick-up, analysis and delivery.

Usage: ``.venv/bin/python benchmarks/bench_node.py [--slices 120] [--size 512] [--model threshold]
[--repeat 3] [--json out.json]``. Needs dcmtk and orthanc (+ orthanc-dicomweb) installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from node_helpers import NodeProcess, storescu, write_phantom  # noqa: E402
from orthanc import OrthancServer, free_port  # noqa: E402


def _size_mb(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 1e6


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def _send_timed(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    result = storescu(port, files, called=called, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    return elapsed


def bench_storescp(files: list[Path], workdir: Path, repeat: int, extra: list[str],
                   env: dict[str, str] | None = None) -> list[float]:
    times = []
    for i in range(repeat):
        out = workdir / f"storescp-{'-'.join(extra) or 'default'}-{len(env or {})}-{i}"
        out.mkdir(parents=True)
        port = free_port()
        proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), *extra, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        try:
            _wait_port(port)
            times.append(_send_timed(port, files, "STORESCP"))
        finally:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(out, ignore_errors=True)
    return times


def bench_node_receive(files: list[Path], workdir: Path, repeat: int) -> list[float]:
    times = []
    for i in range(repeat):
        node = NodeProcess(workdir / f"node-recv-{i}", {
            "node": {"series_quiet_seconds": 3600, "host": "127.0.0.1", "min_free_disk_mb": 50},
            "http": {"enabled": False},
        })
        with node:
            times.append(_send_timed(node.port, files, "LUNGBURDEN"))
        shutil.rmtree(node.storage_dir, ignore_errors=True)
    return times


def bench_latency(files: list[Path], workdir: Path, model: str, quiet: float) -> dict:
    import pydicom

    pacs = OrthancServer(workdir / "orthanc")
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    with pacs:
        node = NodeProcess(workdir / "node-latency", {
            "node": {"series_quiet_seconds": quiet, "host": "127.0.0.1", "min_free_disk_mb": 50},
            "http": {"enabled": False},
            "processing": {"model": model},
            "destinations": [{"name": "pacs", "type": "dimse", "host": "127.0.0.1", "port": pacs.dicom_port,
                              "ae_title": pacs.aet}],
        })
        with node:
            send_s = _send_timed(node.port, files, "LUNGBURDEN")

            def delivered(store):
                jobs = [j for j in store.jobs(series_instance_uid=str(header.SeriesInstanceUID))
                        if j.state in ("done", "failed", "dead")]
                return jobs[0] if jobs else None

            job = node.wait_for(delivered, timeout=1800, what="SEG + SR delivered")
            if job.state != "done":
                raise RuntimeError(f"job {job.id} ended {job.state}: {job.reason}")
            # Orthanc has both instances (the delivery is marked done after the C-STORE responses)
            found = [s for s in pacs.series_in_study(str(header.StudyInstanceUID))
                     if s["MainDicomTags"].get("Modality") in ("SEG", "SR")]
            assert len(found) == 2, found
        last = job.last_instance_at
        delivered_at = job.deliveries[0].delivered_at
        result_json = job.result_dir / "result.json" if job.result_dir else None
        timings = json.loads(result_json.read_text()).get("timings_s", {}) if result_json else {}
        return {
            "slices": len(files),
            "model": model,
            "series_quiet_seconds": quiet,
            "send_seconds": round(send_s, 2),
            "last_instance_to_stored_minus_quiet_s": round(delivered_at - last - quiet, 2),
            "completion_detection_s": round(job.created_at - (last + quiet), 2),
            "queue_pickup_s": round(job.started_at - job.created_at, 2),
            "analysis_and_delivery_s": round(delivered_at - job.started_at, 2),
            "pipeline_timings_s": timings,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the phantom")
    parser.add_argument("--model", default="threshold")
    parser.add_argument("--quiet", type=float, default=2.0, help="series_quiet_seconds of the latency run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        workdir = Path(tmp)
        files = write_phantom(workdir / "phantom", seed=5, slices=args.slices, size=args.size)
        mb = _size_mb(files)
        print(f"{len(files)} instances, {mb:.1f} MB ({args.size}x{args.size}), {os.cpu_count()} CPUs, "
              f"{platform.python_implementation()} {platform.python_version()}")
        report: dict = {"instances": len(files), "megabytes": round(mb, 2), "cpus": os.cpu_count()}
        nodelay = {"TCP_NODELAY": "1"}
        receive = {
            "lungburden serve (fsync + SQLite)": bench_node_receive(files, workdir, args.repeat),
            "storescp +B (bit-preserving)": bench_storescp(files, workdir, args.repeat, ["+B"]),
            "storescp +B, TCP_NODELAY=1": bench_storescp(files, workdir, args.repeat, ["+B"], nodelay),
            "storescp default, TCP_NODELAY=1": bench_storescp(files, workdir, args.repeat, [], nodelay),
        }
        report["receive"] = {}
        print(f"\nreceive throughput, storescu -> SCP, median of {args.repeat}:")
        for name, times in receive.items():
            median = statistics.median(times)
            report["receive"][name] = {"seconds": [round(t, 3) for t in times], "MB_per_s": round(mb / median, 1),
                                       "instances_per_s": round(len(files) / median, 1)}
            print(f"  {name:<40} {median:6.2f} s  {mb / median:7.1f} MB/s  {len(files) / median:7.1f} inst/s")
        if not args.skip_latency:
            latency = bench_latency(files, workdir, args.model, args.quiet)
            report["latency"] = latency
            print(f"\nlast instance received -> SEG + SR stored in Orthanc ({latency['slices']} slices, "
                  f"model {latency['model']}, quiet time excluded): "
                  f"{latency['last_instance_to_stored_minus_quiet_s']:.2f} s")
            for key in ("completion_detection_s", "queue_pickup_s", "analysis_and_delivery_s"):
                print(f"  {key:<28} {latency[key]:6.2f} s")
            print(f"  pipeline steps: {latency['pipeline_timings_s']}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
