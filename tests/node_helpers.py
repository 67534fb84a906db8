"""Helpers of the DICOM node tests: DCMTK ``storescu`` as the scanner and the node as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from ct_builders import write_phantom  # noqa: F401 - also imported from here by benchmarks/bench_node.py
from processes import ManagedProcess, pid_cmdline, pid_running

from lungburden.config import config_from_mapping
from lungburden.dicom_node.demo import dcmtk_tool
from lungburden.dicom_node.service import NodeService

REPO = Path(__file__).resolve().parents[1]


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


def sr_numbers(ds) -> list[tuple[str, str, float, str]]:
    """Every NUM content item of an SR: (parent concept, concept code, value, unit), in document order."""
    out = []

    def walk(items, parent: str) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
            if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
                mv = item.MeasuredValueSequence[0]
                out.append((parent, name, float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence, name)

    walk(ds.ContentSequence, "")
    return out


class InProcessNodes:
    """Nodes started in the test process without workers (the receive side only), stopped together.

    ``start(node={...}, http={...}, **sections)``: a node on free ports storing under
    ``storage_root``/``varN``, holding series for 60 s and accepting with 1 MB free disk."""

    def __init__(self, storage_root: Path):
        self.storage_root = Path(storage_root)
        self.services: list[NodeService] = []

    def start(self, node: dict | None = None, http: dict | None = None, **sections) -> NodeService:
        raw = {"node": {"storage_dir": str(self.storage_root / f"var{len(self.services)}"), "port": 0,
                        "series_quiet_seconds": 60, "min_free_disk_mb": 1, **(node or {})},
               "http": {"port": 0, **(http or {})}, **sections}
        service = NodeService(config_from_mapping(raw), start_workers=False).start()
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in self.services:
            service.stop()


class NodeProcess(ManagedProcess):
    """``python -m lungburden.dicom_node serve`` with a generated YAML config (ports 0 = free)."""

    name = "node"

    def __init__(self, workdir: Path, config: dict | None = None, env: dict[str, str] | None = None,
                 config_path: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.workdir / "node.log")
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
        self.port = 0
        self.http_port = 0

    @property
    def storage_dir(self) -> Path:
        return self._storage

    def command(self) -> list[str]:
        return [sys.executable, "-m", "lungburden.dicom_node", "serve", "--config", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGBURDEN_")}
        env.update(self.env)
        env["LUNGBURDEN_READY_FILE"] = str(self.ready_file)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def working_dir(self) -> Path:
        return REPO

    def prepare(self) -> None:
        self.ready_file.unlink(missing_ok=True)

    def ready(self) -> bool:
        """The node writes its bound ports into the ready file."""
        text = self.ready_file.read_text().strip() if self.ready_file.exists() else ""
        if text:
            self.port, self.http_port = map(int, text.split())
        return bool(text)

    def kill(self, wait_children: float = 10.0) -> None:
        """``kill -9`` the node alone; its workers must die with it (PR_SET_PDEATHSIG): checked."""
        children = self.children()
        super().kill()
        deadline = time.monotonic() + wait_children
        while time.monotonic() < deadline:
            alive = [pid for pid in children if pid_running(pid)]
            if not alive:
                return
            time.sleep(0.1)
        for pid in alive:
            if "spawn_main" in pid_cmdline(pid):  # a worker outliving the node would be a bug
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"worker process {pid} outlived the killed node")

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
