"""Helpers of the DICOM node tests: small synthetic CT series and a node running as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from conftest import SHARED_DATA as REAL_DATA
from ct_builders import ct_slice
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lungburden.dicom_node.demo import dcmtk_tool

REPO = Path(__file__).resolve().parents[1]
REAL_STUDY = REAL_DATA / "real-ct" / "lung-pet-ct-dx-A0001"


def make_ct_dataset(
    index: int,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    rows: int = 32,
    cols: int = 32,
    kernel: str = "L",
    thickness: float = 5.0,
    sop_uid: str | None = None,
) -> Dataset:
    """One synthetic axial CT slice (no patient data beyond a fake ID)."""
    return ct_slice(np.full((rows, cols), -800, dtype=np.int16), study_uid=study_uid, series_uid=series_uid,
                    frame_uid=frame_uid, index=index, position=(-100.0, -100.0, -float(index) * thickness),
                    spacing=(200.0 / rows, 200.0 / cols), thickness=thickness, sop_uid=sop_uid,
                    PatientID="NODE-TEST", PatientName="Test^Node", SeriesNumber=2 if kernel == "L" else 3,
                    SeriesDescription=f"Chest {kernel}", ConvolutionKernel=kernel)


def write_ct_series(out_dir: Path, slices: int = 20, study_uid: str | None = None, kernel: str = "L",
                    frame_uid: str | None = None, **kwargs) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = frame_uid or generate_uid()
    paths = []
    for i in range(slices):
        ds = make_ct_dataset(i, study_uid, series_uid, frame_uid, kernel=kernel, **kwargs)
        path = out_dir / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_phantom(out_dir: Path, seed: int = 3, slices: int = 24, size: int = 256) -> list[Path]:
    """A phantom chest CT series from :mod:`lungburden.phantom` (realistic input for the pipeline)."""
    from lungburden.phantom import PhantomSpec, generate_phantom, write_phantom_series

    spec = PhantomSpec(seed=seed, slices=slices, rows=size, cols=size, slice_spacing_mm=10.0)
    phantom = generate_phantom(spec)
    write_phantom_series(phantom, out_dir, spec)
    return sorted(p for p in out_dir.rglob("*") if p.is_file() and _is_dicom(p))


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_dicom(p))


def storescu(port: int, paths: list[Path] | Path, aet: str = "STORESCU", called: str = "LUNGBURDEN",
             timeout: float = 120, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """DCMTK ``storescu`` (the scanner) sending files or a folder (``+sd``) to 127.0.0.1:``port``."""
    args = [dcmtk_tool("storescu") or "storescu", "-aet", aet, "-aec", called, *(extra or [])]
    if isinstance(paths, Path) and paths.is_dir():
        args += ["+sd", "+r"]
        targets = [str(paths)]
    else:
        targets = [str(p) for p in (paths if isinstance(paths, list) else [paths])]
    return subprocess.run([*args, "127.0.0.1", str(port), *targets], capture_output=True, text=True,
                          timeout=timeout)


class NodeProcess:
    """``python -m lungburden.dicom_node serve`` with a generated YAML config (ports 0 = free)."""

    def __init__(self, workdir: Path, config: dict | None = None, env: dict[str, str] | None = None,
                 config_path: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        if config_path is None:
            self.config = config or {}
            self.config.setdefault("node", {}).setdefault("storage_dir", str(self.workdir / "var"))
            self.config["node"].setdefault("port", 0)
            self.config["node"].setdefault("min_free_disk_mb", 50)
            self.config.setdefault("http", {}).setdefault("port", 0)
            self.config.setdefault("processing", {}).setdefault("model", "threshold")
            self.config_path = self.workdir / "node.yaml"
            self.config_path.write_text(yaml.safe_dump(self.config))
            self._storage = Path(self.config["node"]["storage_dir"])
        else:  # an existing file adjusted by environment variables
            self.config_path = Path(config_path)
            self.env.setdefault("LUNGBURDEN_NODE__STORAGE_DIR", str(self.workdir / "var"))
            self._storage = Path(self.env["LUNGBURDEN_NODE__STORAGE_DIR"])
        self.ready_file = self.workdir / "ready"
        self.log_path = self.workdir / "node.log"
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.http_port = 0

    @property
    def storage_dir(self) -> Path:
        return self._storage

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.ready_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGBURDEN_")}
        env.update(self.env)
        env["LUNGBURDEN_READY_FILE"] = str(self.ready_file)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lungburden.dicom_node", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            start_new_session=True,  # its own process group, as under a service manager
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            if self.ready_file.exists() and self.ready_file.read_text().strip():
                self.port, self.http_port = map(int, self.ready_file.read_text().split())
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"node not ready after {timeout} s:\n{self.log_text()[-4000:]}")

    def children(self) -> list[int]:
        """PIDs of the node's child processes (workers, multiprocessing's resource tracker)."""
        if self.process is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    def kill(self, wait_children: float = 10.0) -> None:
        """``kill -9`` the node alone; its workers must die with it (PR_SET_PDEATHSIG): checked."""
        children = self.children()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None
        deadline = time.monotonic() + wait_children
        while time.monotonic() < deadline:
            alive = [pid for pid in children if _running(pid)]
            if not alive:
                return
            time.sleep(0.1)
        for pid in alive:
            if "spawn_main" in _cmdline(pid):  # a worker outliving the node would be a bug
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"worker process {pid} outlived the killed node")

    def terminate_group(self, timeout: float = 30.0) -> float:
        """SIGTERM to the node's whole process group (``timeout``, systemd); returns the seconds to exit."""
        assert self.process is not None
        start = time.monotonic()
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout)
        self.process = None
        return time.monotonic() - start

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def store(self):
        from lungburden.jobs.queue import JobStore

        return JobStore.for_storage(self.storage_dir)

    def wait_for(self, predicate, timeout: float = 120.0, what: str = "condition", interval: float = 0.2):
        """Poll ``predicate(store)`` until truthy; fail with the node log otherwise."""
        store = self.store()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                value = predicate(store)
                if value:
                    return value
                if self.process is not None and self.process.poll() is not None:
                    raise AssertionError(f"node died while waiting for {what}:\n{self.log_text()[-4000:]}")
                time.sleep(interval)
        finally:
            store.close()
        jobs = self.store().jobs()
        raise AssertionError(f"timed out waiting for {what}; jobs: {[j.to_json() for j in jobs]}\n"
                             f"{self.log_text()[-4000:]}")

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_dataset(data: bytes) -> Dataset:
    import io

    return pydicom.dcmread(io.BytesIO(data))
