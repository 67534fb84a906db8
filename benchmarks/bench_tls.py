"""Receive throughput of the SCP with and without DICOM TLS (PS3.15 B.1, BCP 195).

A 120-slice 512x512 CT series is sent by DCMTK ``storescu`` to an in-process node (no workers),
over plain TCP and over TLS 1.2+ with client certificates, alternately; prints the median of
``--runs`` runs of each and the ratio. Usage: ``python benchmarks/bench_tls.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ct_builders import write_ct_series  # noqa: E402
from node_helpers import storescu  # noqa: E402
from test_scp_hardening import make_pki  # noqa: E402

from lungburden.config import config_from_mapping  # noqa: E402
from lungburden.dicom_node.service import NodeService  # noqa: E402


def _node(workdir: Path, tls: dict | None) -> NodeService:
    raw = {"node": {"storage_dir": str(workdir), "port": 0, "series_quiet_seconds": 3600, "min_free_disk_mb": 1,
                    **({"tls": tls} if tls else {})},
           "http": {"enabled": False}}
    return NodeService(config_from_mapping(raw), start_workers=False).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        pki = make_pki(tmp_path / "pki")
        series = tmp_path / "series"
        write_ct_series(series, slices=args.slices, rows=512, cols=512)
        megabytes = sum(p.stat().st_size for p in series.iterdir()) / 2**20
        tls = {"certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key"),
               "ca_certificates": str(pki / "ca.crt")}
        plain_node, tls_node = _node(tmp_path / "plain", None), _node(tmp_path / "tls", tls)
        tls_args = ["+tls", str(pki / "scanner1.key"), str(pki / "scanner1.crt"), "+cf", str(pki / "ca.crt")]
        times: dict[str, list[float]] = {"plain": [], "tls": []}
        try:
            for _ in range(args.runs):
                for name, node, extra in (("plain", plain_node, []), ("tls", tls_node, tls_args)):
                    start = time.perf_counter()
                    result = storescu(node.scp.port, series, extra=extra)
                    times[name].append(time.perf_counter() - start)
                    if result.returncode != 0:
                        raise SystemExit(f"storescu ({name}) failed: {result.stderr}")
        finally:
            plain_node.stop()
            tls_node.stop()
    plain, secure = statistics.median(times["plain"]), statistics.median(times["tls"])
    print(f"{args.slices} slices, {megabytes:.1f} MiB, median of {args.runs} runs (DCMTK storescu -> node)")
    print(f"plain TCP: {plain:.2f} s  ({megabytes / plain:.1f} MiB/s)")
    print(f"TLS:       {secure:.2f} s  ({megabytes / secure:.1f} MiB/s)")
    print(f"TLS / plain time ratio: {secure / plain:.2f}")


if __name__ == "__main__":
    main()
