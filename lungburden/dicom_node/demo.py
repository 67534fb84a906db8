"""``lungburden node-demo``: the network path on loopback with embedded defaults.

A node is started in this process (free port on 127.0.0.1, ``series_quiet_seconds`` 2, a folder
destination), the DICOM files of a folder are sent to it by C-STORE (DCMTK ``storescu`` when
installed, else pynetdicom), and the SEG + SR + result.json delivered to the folder are listed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

from lungburden.config import config_from_mapping
from lungburden.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from lungburden.jobs.queue import TERMINAL_STATES

log = logging.getLogger(__name__)


def _dicom_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            f.seek(128)
            if f.read(4) == b"DICM":
                files.append(path)
    return files


def dcmtk_tool(name: str) -> str | None:
    """Path of the DCMTK program ``name`` on ``PATH``, or None. Python scripts of that name are
    skipped (and this environment's scripts folder): pynetdicom installs Python apps called
    ``storescu``, ``echoscu`` … into a virtualenv, with other options, which shadow DCMTK's
    once a virtualenv is activated."""
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or Path(entry).resolve() == scripts:
            continue
        found = shutil.which(name, path=entry)
        if found and not _is_python_script(Path(found)):
            return found
    return None


def _is_python_script(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = f.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def _send(port: int, files: list[Path], called: str) -> str:
    storescu = dcmtk_tool("storescu")
    if storescu:
        result = subprocess.run([storescu, "-aet", "DEMOSCU", "-aec", called, "127.0.0.1", str(port),
                                 *map(str, files)], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"storescu failed: {result.stderr[-1000:]}")
        return "storescu"
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title="DEMOSCU")
    for sop_class in sorted({str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError("association with the node failed")
    try:
        for f in files:
            assoc.send_c_store(pydicom.dcmread(f))
    finally:
        assoc.release()
    return "pynetdicom"


def run_demo(input_dir: Path, out_dir: Path, model: str | None = None, timeout: float = 600.0) -> int:
    from lungburden.dicom_node.service import NodeService

    files = _dicom_files(Path(input_dir))
    if not files:
        print(f"error: no DICOM files under {input_dir}")
        return EXIT_BAD_INPUT
    out_dir = Path(out_dir)
    config = config_from_mapping({
        "node": {"host": "127.0.0.1", "port": 0, "storage_dir": str(out_dir / "node-storage"),
                 "series_quiet_seconds": 2, "min_free_disk_mb": 100},
        "http": {"port": 0},
        "processing": {"model": model},
        "destinations": [{"name": "results", "type": "folder", "path": str(out_dir / "results")}],
    })
    service = NodeService(config).start()
    try:
        port = service.scp.port
        print(f"node LUNGBURDEN listening on 127.0.0.1:{port} (health: http://127.0.0.1:{service.http.port}/health)")
        start = time.perf_counter()
        how = _send(port, files, config.node.ae_title)
        print(f"sent {len(files)} instances by {how} in {time.perf_counter() - start:.1f} s; "
              f"waiting {config.node.series_quiet_seconds:g} s of quiet, then analysis and delivery ...")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = service.store.jobs()
            if jobs and all(j.state in TERMINAL_STATES for j in jobs):
                break
            time.sleep(0.25)
        rc = EXIT_OK
        for job in reversed(service.store.jobs()):
            line = f"job {job.id}: series {job.series_instance_uid}: {job.state}"
            if job.reason:
                line += f" ({job.reason})"
            print(line)
            if job.state == "done" and job.result:
                target = out_dir / "results" / job.study_instance_uid / job.series_instance_uid / f"v{job.version}"
                print(f"  burden {job.result.get('burden_percent', float('nan')):.2f} %, "
                      f"lung {job.result.get('lung_volume_ml', float('nan')):.0f} mL")
                for name in ("seg.dcm", "sr.dcm", "result.json"):
                    print(f"  {target / name}")
            elif job.state not in ("skipped", "superseded"):
                rc = EXIT_FAILED
        print(f"total {time.perf_counter() - start:.1f} s")
        return rc
    finally:
        service.stop()
