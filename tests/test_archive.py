"""Archive mode with real components: Orthanc (DICOMweb), a Redis broker, ``lungburden worker`` processes.

- ``batch --engine celery`` with two workers on phantom studies and the real Lung-PET-CT-Dx
  study: every chest series gets one row and exactly one SEG + SR in Orthanc, with the numbers
  ``lungburden analyze`` gives; the real study's soft-kernel reconstruction is skipped for its
  lung-kernel twin, the non-chest CT and the series with a missing slice fail with their
  reasons, the short series is skipped; a second run analyses and stores nothing.
- ``kill -9`` of a worker machine in the middle of a task and a broker restart: the task runs
  again on the other worker; the table and Orthanc hold exactly one result per series.
- ``--engine local`` needs no broker and writes Parquet.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from archive_helpers import (
    LUNGBURDEN,
    ArchiveWorker,
    RedisServer,
    batch,
    build_archive,
    celery_workers,
    redis_available,
    rows,
)
from orthanc import OrthancServer, orthanc_available

pytestmark = pytest.mark.skipif(not (orthanc_available() and redis_available()),
                                reason="needs Orthanc with DICOMweb and redis-server (make test installs them)")

MODEL = "threshold"
COMPARED = ("lung_volume_ml", "ggo_volume_ml", "high_opacity_volume_ml", "burden_percent", "lung_mean_hu")


def upload(orthanc: OrthancServer, folder: Path) -> None:
    for path in sorted(folder.glob("*.dcm")):
        orthanc.upload(path)


def results_in(orthanc: OrthancServer, study_uid: str) -> dict[str, list[int]]:
    """Instance counts of the SEG and SR series of a study."""
    out: dict[str, list[int]] = {"SEG": [], "SR": []}
    for series in orthanc.series_in_study(study_uid):
        modality = series["MainDicomTags"].get("Modality")
        if modality in out:
            out[modality].append(len(series["Instances"]))
    return out


def analyze(folder: Path, out: Path) -> dict:
    subprocess.run([LUNGBURDEN, "analyze", str(folder), "--out", str(out), "--model", MODEL], check=True,
                   capture_output=True, timeout=120)
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def archive(tmp_path_factory, real_study):
    root = tmp_path_factory.mktemp("archive")
    studies = build_archive(root / "data", real_study=real_study)
    with OrthancServer(root / "orthanc") as orthanc:
        for study in studies:
            upload(orthanc, study.folder)
        yield orthanc, studies, root


def test_batch_on_two_celery_workers(archive, tmp_path):
    orthanc, studies, _ = archive
    with celery_workers(tmp_path) as (redis, _workers):
        table = tmp_path / "results.csv"
        code, summary, log = batch(orthanc, table, "--engine", "celery", "--broker", redis.url,
                                   "--max-in-flight", "4")
        assert code == 1, log  # some series failed
        table_rows = rows(table)
        assert len(table_rows) == len(studies) and summary["considered"] == len(studies), log
        for study in studies:
            row = table_rows[study.series_uid]
            assert row["status"] == study.expected, (study.name, row["reason"])
            assert row["study_instance_uid"] == study.study_uid
            found = results_in(orthanc, study.study_uid)
            if study.expected == "done":
                assert found == {"SEG": [1], "SR": [1]}, study.name
                assert row["model"] == MODEL and row["model_version"] and row["sr_sop_instance_uid"]
                assert row["kernel"] and float(row["slice_thickness_mm"]) > 0 and row["acquisition_date"]
                reference = analyze(study.folder, tmp_path / "analyze" / study.name)
                for key in COMPARED:
                    assert float(row[key]) == pytest.approx(reference[key], abs=1e-6), (study.name, key)
            else:
                assert row["reason"], study.name
                if not any(s.expected == "done" and s.study_uid == study.study_uid for s in studies):
                    assert found == {"SEG": [], "SR": []}, study.name
        reasons = {s.name: table_rows[s.series_uid]["reason"] for s in studies}
        assert "no lungs" in reasons["non-chest"]
        assert "missing slices" in reasons["missing-slice"]
        assert "fewer than the minimum" in reasons["short"]
        lung_kernel = next(s.series_uid for s in studies if s.name == "real-lung-kernel")
        soft_kernel = reasons["real-soft-kernel"]
        assert "another reconstruction" in soft_kernel and lung_kernel in soft_kernel, soft_kernel
        done_by = {table_rows[s.series_uid]["worker"] for s in studies if s.expected == "done"}
        assert len(done_by) >= 2, f"one worker did all the work: {done_by}"

        # a second run: nothing analysed, nothing stored, the table unchanged
        before = table.read_text()
        instances = len(orthanc.get("/instances"))
        code, summary, log = batch(orthanc, table, "--engine", "celery", "--broker", redis.url)
        done = sum(s.expected == "done" for s in studies)
        assert summary["submitted"] == 0 and summary["already_done"] == done, log
        assert len(orthanc.get("/instances")) == instances
        assert table.read_text() == before


def test_killed_worker_and_broker_restart(tmp_path):
    """A worker machine dies in the middle of a series and the broker restarts: nothing is lost,
    nothing is stored twice."""
    studies = build_archive(tmp_path / "data", seeds=(11, 12, 13, 14), size=192, slices=32, bad=False)
    with OrthancServer(tmp_path / "orthanc") as orthanc, RedisServer(tmp_path / "redis") as redis:
        for study in studies:
            upload(orthanc, study.folder)
        first = ArchiveWorker(tmp_path / "workers", redis.url, "w1", visibility_timeout=8)
        second = ArchiveWorker(tmp_path / "workers", redis.url, "w2", visibility_timeout=8)
        table = tmp_path / "results.csv"
        first.start()
        coordinator = subprocess.Popen(
            [LUNGBURDEN, "batch", "--url", orthanc.dicomweb_url, "--table", str(table), "--model", MODEL,
             "--no-progress", "--engine", "celery", "--broker", redis.url, "--max-in-flight", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while "received" not in first.log_text():
                assert time.monotonic() < deadline, first.log_text()[-3000:]
                time.sleep(0.05)
            time.sleep(0.3)  # retrieving or analysing
            first.kill_group()
            redis.stop()
            redis.start()
            second.start()
            out, err = coordinator.communicate(timeout=180)
        finally:
            coordinator.kill()
            second.stop()
        assert coordinator.returncode == 0, err[-4000:]
        table_rows = rows(table)
        assert {r["status"] for r in table_rows.values()} == {"done"} and len(table_rows) == len(studies), err
        assert {r["worker"].split(":")[0] for r in table_rows.values()}  # every row names its worker
        for study in studies:
            assert results_in(orthanc, study.study_uid) == {"SEG": [1], "SR": [1]}, study.name
        # the task of the killed worker was delivered again, to the second worker
        killed = re.findall(r"analyse_series\[([0-9a-f-]+)\] received", first.log_text())
        rerun = re.findall(r"analyse_series\[([0-9a-f-]+)\] received", second.log_text())
        assert killed and killed[0] in rerun and len(set(rerun)) == len(studies), (killed, rerun)


def test_local_engine_parquet(archive, tmp_path):
    """No broker: a process pool; the Parquet table; --no-store leaves the archive untouched."""
    pq = pytest.importorskip("pyarrow.parquet")
    orthanc, studies, _ = archive
    chest = [s for s in studies if s.expected == "done"][:2]
    study_list = tmp_path / "studies.txt"
    study_list.write_text("".join(f"{s.study_uid}\n" for s in chest))
    instances = len(orthanc.get("/instances"))
    table = tmp_path / "results.parquet"
    code, summary, log = batch(orthanc, table, "--engine", "local", "--workers", "2", "--study-list",
                               str(study_list), "--no-store")
    assert code == 0 and summary["done"] == 2, log
    data = pq.read_table(table).to_pylist()
    assert sorted(r["series_instance_uid"] for r in data) == sorted(s.series_uid for s in chest)
    assert all(r["status"] == "done" and r["burden_percent"] > 0 and r["stored"] is False for r in data)
    assert len(orthanc.get("/instances")) == instances
