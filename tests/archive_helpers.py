"""Real components of the archive-mode tests and benchmark: a Redis broker (Debian ``redis-server``)
with its own configuration on a free loopback port, ``lungburden worker`` processes, the
archive's studies (phantoms, a non-chest CT, a series with a missing slice, a short series),
``lungburden batch`` and its results table.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ct_builders import ct_slice, write_phantom
from processes import ManagedProcess, free_port
from pydicom.uid import generate_uid

REDIS_BINARY = shutil.which("redis-server") or "/usr/bin/redis-server"
LUNGBURDEN = str(Path(sys.executable).with_name("lungburden"))


def redis_available() -> bool:
    return Path(REDIS_BINARY).exists()


class RedisServer(ManagedProcess):
    """``redis-server`` with an append-only file (a restart loses no queued message), 127.0.0.1 only."""

    name = "redis-server"
    startup_timeout = 20.0

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.workdir / "redis.log")
        self.port = port or free_port()
        self.config_path = self.workdir / "redis.conf"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def prepare(self) -> None:
        self.config_path.write_text(
            f"bind 127.0.0.1\nport {self.port}\ndir {self.workdir}\ndaemonize no\nprotected-mode yes\n"
            "appendonly yes\nappendfsync always\nsave \"\"\nloglevel notice\n"
        )

    def command(self) -> list[str]:
        return [REDIS_BINARY, str(self.config_path)]

    def ready(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False


class ArchiveWorker(ManagedProcess):
    """``lungburden worker`` (Celery, prefork) with its own log; ready when Celery says so."""

    name = "lungburden worker"
    startup_timeout = 90.0
    stop_timeout = 30.0

    def __init__(self, workdir: Path, broker: str, name: str, concurrency: int = 1,
                 visibility_timeout: float = 3600.0, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.workdir / f"{name}.log")
        self.broker, self.node_name = broker, name
        self.concurrency, self.visibility_timeout = concurrency, visibility_timeout
        self.env = dict(env or {})  # e.g. the archive's credentials (LUNGBURDEN_DICOMWEB_USERNAME, ...)

    def command(self) -> list[str]:
        return [LUNGBURDEN, "worker", "--broker", self.broker, "--concurrency", str(self.concurrency),
                "--hostname", f"{self.node_name}@%h", "--visibility-timeout", str(self.visibility_timeout)]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}

    def ready(self) -> bool:
        return " ready." in self.log_text()

    def kill_group(self) -> None:
        """``kill -9`` of the worker and its pool processes (a machine lost)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None


@contextlib.contextmanager
def celery_workers(workdir: Path, count: int = 2) -> Iterator[tuple[RedisServer, list[ArchiveWorker]]]:
    """A real Redis and ``count`` started ``lungburden worker`` processes (``w1``, ``w2``, ...),
    all stopped on exit."""
    with RedisServer(workdir / "redis") as redis:
        workers = [ArchiveWorker(workdir / "workers", redis.url, f"w{n}") for n in range(1, count + 1)]
        try:
            for worker in workers:
                worker.start()
            yield redis, workers
        finally:
            for worker in workers:
                worker.stop()


@dataclass(frozen=True)
class ArchiveStudy:
    name: str
    folder: Path
    study_uid: str
    series_uid: str
    expected: str  # done / failed / skipped


def non_chest_series(out_dir: Path, slices: int = 20) -> list[Path]:
    """A head-like CT series: a soft-tissue disk in air, no lungs (refused by the content check)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:64, :64]
    image = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2, 40, -1000).astype(np.int16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(slices):
        ds = ct_slice(image, study_uid=study, series_uid=series, frame_uid=frame, index=i,
                      position=(-100.0, -100.0, -5.0 * i), spacing=(200 / 64, 200 / 64), thickness=5.0,
                      BodyPartExamined="HEAD", ConvolutionKernel="H30s", SeriesDescription="Head")
        path = out_dir / f"h{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def build_archive(root: Path, seeds: tuple[int, ...] = (3, 4, 5), size: int = 128, slices: int = 24,
                  bad: bool = True, real_study: Path | None = None) -> list[ArchiveStudy]:
    """Phantom chest studies (``seeds``); with ``real_study`` (the Lung-PET-CT-Dx A0001 folder, read
    in place) its lung-kernel series (analysed) and soft-kernel series (the same acquisition, not
    chosen); with ``bad``, a non-chest CT, a series with a missing slice and a study with only a
    short series."""
    import pydicom

    studies = []

    def study(name: str, files: list[Path], expected: str) -> None:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        studies.append(ArchiveStudy(name, files[0].parent, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                    expected))

    for seed in seeds:
        study(f"phantom-{seed}", write_phantom(root / f"phantom-{seed}", seed=seed, slices=slices, size=size),
              "done")
    if real_study is not None:
        study("real-lung-kernel", sorted((real_study / "lung-kernel-L-5mm").glob("*.dcm")), "done")
        study("real-soft-kernel", sorted((real_study / "soft-kernel-B-5mm").glob("*.dcm")), "skipped")
    if bad:
        study("non-chest", non_chest_series(root / "non-chest"), "failed")
        gap = write_phantom(root / "missing-slice", seed=41, slices=slices, size=size)
        gap[len(gap) // 2].unlink()
        study("missing-slice", [f for f in gap if f.exists()], "failed")
        study("short", write_phantom(root / "short", seed=42, slices=8, size=size), "skipped")
    return studies


def batch(orthanc, table: Path, *extra: str, model: str = "threshold", timeout: float = 240.0
          ) -> tuple[int, dict, str]:
    """``lungburden batch`` on ``orthanc`` (an :class:`orthanc.OrthancServer`): exit status, summary, log."""
    proc = subprocess.run([LUNGBURDEN, "batch", "--url", orthanc.dicomweb_url, "--table", str(table), "--model", model,
                           "--no-progress", *extra], capture_output=True, text=True, timeout=timeout)
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, summary, proc.stderr


def rows(table: Path) -> dict[str, dict]:
    """The rows of a CSV results table by Series Instance UID."""
    with table.open(newline="") as f:
        return {r["series_instance_uid"]: r for r in csv.DictReader(f)}
