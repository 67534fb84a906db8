"""Job store, series completion, selection, workers and exporters of the node (no network peers)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pydicom
import pytest
from ct_builders import write_ct_series, write_phantom
from pydicom.uid import generate_uid

from lungburden.config import config_from_mapping
from lungburden.dicom_io.volume import SeriesRejected
from lungburden.dicom_node import commands
from lungburden.jobs.assembly import SeriesAssembler, complete_now
from lungburden.jobs.exporters import ExportRunner, backoff_delay
from lungburden.jobs.queue import MAX_WORKER_DEATHS, JobStore, instance_set_hash
from lungburden.jobs.runner import JobRunner
from lungburden.jobs.spool import Intake, Spool


def _config(tmp_path: Path, **sections) -> object:
    raw = {"node": {"storage_dir": str(tmp_path / "var"), "series_quiet_seconds": 1, "min_free_disk_mb": 1},
           "processing": {"model": "threshold"}}
    for key, value in sections.items():
        raw.setdefault(key, {})
        if isinstance(value, dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return config_from_mapping(raw)


def _receive(config, store: JobStore, paths: list[Path]) -> None:
    intake = Intake(Spool(config.storage_dir), store)
    for p in paths:
        outcome = intake.accept(p.read_bytes(), source="test")
        assert outcome.ok, outcome.reason


def fake_process(files, out_dir, model=None, limits=None, segmenter=None, uid_seed=None, **kwargs):
    """Stands in for the pipeline: writes small seg.dcm/sr.dcm/result.json with seeded UIDs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    uids = {}
    for name in ("seg", "sr"):
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, name])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, name, "series"])
        ds.save_as(out_dir / f"{name}.dcm", enforce_file_format=True)
        uids[name] = str(ds.SOPInstanceUID)
    result = {"study_instance_uid": str(src.StudyInstanceUID), "series_instance_uid": str(src.SeriesInstanceUID),
              "burden_percent": 12.5, "seg_sop_instance_uid": uids["seg"], "sr_sop_instance_uid": uids["sr"],
              "slices": len(files), "model": model}
    (out_dir / "result.json").write_text(json.dumps(result))

    class Outputs:
        pass

    outputs = Outputs()
    outputs.result = result
    return outputs


def test_instance_set_hash_ignores_order_and_duplicates():
    assert instance_set_hash(["1.2", "1.3"]) == instance_set_hash(["1.3", "1.2", "1.3"])
    assert instance_set_hash(["1.2"]) != instance_set_hash(["1.2", "1.3"])


def test_completion_waits_for_the_whole_study_to_be_quiet(tmp_path):
    store = JobStore(tmp_path / "db.sqlite")
    now = 1000.0
    store.record_instance("1.1", "9.1", "8.1", "c", tmp_path / "a", "t", now=now)
    store.record_instance("1.2", "9.2", "8.1", "c", tmp_path / "b", "t", now=now + 10)
    store.record_instance("1.3", "9.3", "8.2", "c", tmp_path / "c", "t", now=now)
    quiet = {s.series_instance_uid for s in store.quiet_series(5, now=now + 12)}
    assert quiet == {"9.3"}  # 9.1 is quiet but its study is still receiving series 9.2
    quiet = {s.series_instance_uid for s in store.quiet_series(5, now=now + 16)}
    assert quiet == {"9.1", "9.2", "9.3"}
    # an instance arriving after the snapshot keeps the series open
    assert not store.mark_series_complete("9.1", last_received=now - 1)
    assert store.mark_series_complete("9.1", last_received=now)
    assert store.series("9.1").state == "complete"


def test_versions_duplicates_and_late_instances(tmp_path):
    config = _config(tmp_path, selection={"min_slices": 4})
    store = JobStore.for_storage(config.storage_dir)
    paths = write_ct_series(tmp_path / "in", slices=8)
    _receive(config, store, paths[:6])
    assembler = SeriesAssembler(config, store)
    assert assembler.poll() == []  # not quiet yet
    jobs = assembler.poll(now=time.time() + 5)
    assert [(j.state, j.version, j.instance_count) for j in jobs] == [("queued", 1, 6)]
    series_uid = jobs[0].series_instance_uid
    # the same instances again: no new version
    _receive(config, store, paths[:6])
    assert [j.state for j in assembler.poll(now=time.time() + 5)] == ["queued"]
    assert len(store.jobs()) == 1
    # late instances before v1 started: v2 supersedes v1, which will never run
    _receive(config, store, paths[6:7])
    (v2,) = assembler.poll(now=time.time() + 5)
    assert (v2.version, v2.instance_count, v2.supersedes, v2.state) == (2, 7, jobs[0].id, "queued")
    assert store.job(jobs[0].id).state == "superseded"
    # v2 starts; another late instance makes v3, v2 keeps running
    claimed = store.claim_job()
    assert claimed.id == v2.id
    _receive(config, store, paths[7:8])
    (v3,) = assembler.poll(now=time.time() + 5)
    assert (v3.version, v3.instance_count, v3.state) == (3, 8, "queued")
    assert store.job(v2.id).state == "running"
    assert [j.version for j in store.jobs(series_instance_uid=series_uid)] == [3, 2, 1]


def test_late_instances_ignored_by_policy_are_recorded(tmp_path):
    config = _config(tmp_path, selection={"min_slices": 4}, processing={"late_instance_policy": "ignore"})
    store = JobStore.for_storage(config.storage_dir)
    paths = write_ct_series(tmp_path / "in", slices=6)
    _receive(config, store, paths[:5])
    (v1,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    _receive(config, store, paths[5:])
    (late,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    assert late.state == "skipped" and "late_instance_policy=ignore" in late.reason
    assert store.job(v1.id).state == "queued"


def test_selection_rules_and_kernel_preference(tmp_path):
    config = _config(tmp_path, selection={"min_slices": 10})
    store = JobStore.for_storage(config.storage_dir)
    study, frame = generate_uid(), generate_uid()
    soft = write_ct_series(tmp_path / "soft", slices=12, study_uid=study, frame_uid=frame, kernel="B")
    lung = write_ct_series(tmp_path / "lung", slices=12, study_uid=study, frame_uid=frame, kernel="L")
    short = write_ct_series(tmp_path / "short", slices=5, study_uid=study)
    thick = write_ct_series(tmp_path / "thick", slices=12, study_uid=study, thickness=12.0)
    for paths in (soft, lung, short, thick):
        _receive(config, store, paths)
    jobs = {pydicom.dcmread(p[0]).SeriesInstanceUID: None for p in (soft, lung, short, thick)}
    created = SeriesAssembler(config, store).poll(now=time.time() + 5)
    by_series = {j.series_instance_uid: j for j in created}
    assert set(by_series) == set(jobs)

    def job_of(paths):
        return by_series[str(pydicom.dcmread(paths[0]).SeriesInstanceUID)]

    assert job_of(lung).state == "queued"
    assert job_of(soft).state == "skipped" and "preferred" in job_of(soft).reason
    assert job_of(short).state == "skipped" and "fewer than the minimum of 10" in job_of(short).reason
    assert job_of(thick).state == "skipped" and "slice thickness 12.0 mm" in job_of(thick).reason
    # a soft-kernel series arriving later is compared with the lung kernel analysed before
    soft2 = write_ct_series(tmp_path / "soft2", slices=12, study_uid=study, frame_uid=frame, kernel="B")
    _receive(config, store, soft2)
    (late,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    assert late.state == "skipped" and "already analysed" in late.reason


def test_claims_are_atomic_across_connections(tmp_path):
    store = JobStore(tmp_path / "db.sqlite")
    for i in range(30):
        store.add_job("1.1", f"1.2.{i}", [tmp_path / "x"], [f"1.3.{i}"], "m")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker():
        local = JobStore(tmp_path / "db.sqlite")
        while (job := local.claim_job(owner=f"host:{threading.get_ident()}")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 31))


def test_lost_workers_are_requeued_then_failed(tmp_path):
    store = JobStore(tmp_path / "db.sqlite")
    job, _ = store.add_job("1.1", "1.2", [tmp_path / "x"], ["1.3"], "m")
    dead_owner = f"{os.uname().nodename}:999999999"
    for attempt in range(1, MAX_WORKER_DEATHS + 1):
        assert store.claim_job(owner=dead_owner).id == job.id
        assert store.requeue_lost() == [job.id]
        expected = "queued" if attempt < MAX_WORKER_DEATHS else "failed"
        assert store.job(job.id).state == expected
    assert "died 3 times" in store.job(job.id).reason
    # a live owner with a valid lease is left alone
    job2, _ = store.add_job("1.1", "1.4", [tmp_path / "x"], ["1.5"], "m")
    store.claim_job(owner=f"{os.uname().nodename}:{os.getpid()}")
    assert store.requeue_lost() == []
    assert store.job(job2.id).state == "running"


def test_worker_and_exporter_with_folder_destination(tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path, selection={"min_slices": 4},
                     destinations=[{"name": "folder", "type": "folder", "path": str(out)}])
    store = JobStore.for_storage(config.storage_dir)
    paths = write_ct_series(tmp_path / "in", slices=6)
    _receive(config, store, paths)
    (job,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    seen = {}

    def recording_process(files, out_dir, model=None, limits=None, segmenter=None, uid_seed=None):
        seen.update(segmenter=segmenter, uid_seed=uid_seed)
        return fake_process(files, out_dir, model=model, uid_seed=uid_seed)

    runner = JobRunner(config, store, process_fn=recording_process)
    assert runner.run_next()
    # deterministic result UIDs: the seed names the series version, the model and its parameters
    info = seen["segmenter"].info
    assert seen["uid_seed"] == (f"{job.series_instance_uid}/{job.instance_set_hash}/threshold/{info.version}/"
                                + json.dumps(info.parameters or {}, sort_keys=True))
    job = store.job(job.id)
    assert job.state == "exporting" and job.result["burden_percent"] == 12.5
    assert [(d.destination, d.state) for d in job.deliveries] == [("folder", "pending")]
    exporter = ExportRunner(config, store)
    assert exporter.deliver_one()
    job = store.job(job.id)
    assert job.state == "done"
    target = out / job.study_instance_uid / job.series_instance_uid / "v1"
    assert sorted(p.name for p in target.iterdir()) == ["result.json", "seg.dcm", "sr.dcm"]
    assert not exporter.deliver_one()


def test_rejected_series_fail_with_the_reason(tmp_path):
    config = _config(tmp_path, selection={"min_slices": 4})
    store = JobStore.for_storage(config.storage_dir)
    _receive(config, store, write_ct_series(tmp_path / "in", slices=5))
    (job,) = SeriesAssembler(config, store).poll(now=time.time() + 5)

    def reject(files, out_dir, **kwargs):
        raise SeriesRejected(job.series_instance_uid, "gantry tilt of 20 degrees")

    JobRunner(config, store, process_fn=reject).run_next()
    failed = store.job(job.id)
    assert failed.state == "failed" and "gantry tilt of 20 degrees" in failed.reason
    assert not (config.storage_dir / "results" / f"job-{job.id:06d}-v1").exists()

    def crash(files, out_dir, **kwargs):
        raise RuntimeError("out of memory")

    assert store.retry([job.id]) == [job.id]
    JobRunner(config, store, process_fn=crash).run_next()
    assert "RuntimeError: out of memory" in store.job(job.id).reason


class _FlakyExporter:
    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def send(self, job):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionRefusedError("connection refused")


def test_retries_backoff_dead_letter_and_retry(tmp_path, capsys):
    config = _config(
        tmp_path, selection={"min_slices": 4},
        export={"max_attempts": 3, "backoff_initial_seconds": 0, "backoff_max_seconds": 0},
        destinations=[{"name": "pacs", "type": "dimse", "host": "127.0.0.1", "port": 9, "ae_title": "PACS"}],
    )
    store = JobStore.for_storage(config.storage_dir)
    _receive(config, store, write_ct_series(tmp_path / "in", slices=5))
    (job,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    JobRunner(config, store, process_fn=fake_process).run_next()
    exporter = ExportRunner(config, store)
    flaky = exporter.exporters["pacs"] = _FlakyExporter(failures=3)
    for _ in range(3):
        assert exporter.deliver_one()
    job = store.job(job.id)
    assert job.state == "dead" and "dead letter" in job.reason
    assert job.deliveries[0].attempts == 3 and "connection refused" in job.deliveries[0].last_error
    assert not exporter.deliver_one()
    # visible in `lungburden jobs`, re-triable by `lungburden retry`
    config_file = tmp_path / "node.yaml"
    config_file.write_text(json.dumps({"node": {"storage_dir": str(config.storage_dir)}}))
    assert commands.main(["jobs", "--config", str(config_file)]) == 0
    listing = capsys.readouterr().out
    assert "dead" in listing and "pacs:dead(3)" in listing and job.series_instance_uid in listing
    assert commands.main(["retry", "--config", str(config_file), str(job.id)]) == 0
    assert f"job {job.id}: exporting" in capsys.readouterr().out
    assert store.job(job.id).state == "exporting"
    assert exporter.deliver_one()
    assert store.job(job.id).state == "done" and flaky.calls == 4
    assert commands.main(["jobs", "--config", str(config_file), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["counts"]["done"] == 1 and document["jobs"][0]["deliveries"][0]["state"] == "done"


def test_find_and_rerun_a_job(tmp_path):
    store = JobStore(tmp_path / "db.sqlite")
    job, _ = store.add_job("1.1", "1.2", [tmp_path / "a"], ["1.3", "1.4"], "m")
    assert store.find_job("1.2", instance_set_hash(["1.4", "1.3"]), "m") == job
    assert store.find_job("1.2", instance_set_hash(["1.3"]), "m") is None
    assert store.find_job("1.2", job.instance_set_hash, "other") is None
    assert not store.rerun_job(job.id, [tmp_path / "b"])  # queued: not finished
    assert not store.rerun_job(job.id + 1, [tmp_path / "b"])  # no such job
    store.claim_job()
    assert not store.rerun_job(job.id, [tmp_path / "b"])  # running
    store.job_succeeded(job.id, tmp_path / "out", {}, ["pacs", "folder"])
    assert not store.rerun_job(job.id, [tmp_path / "b"])  # exporting
    store.delivery_succeeded(job.id, "folder")
    store.delivery_failed(job.id, "pacs", "refused", max_attempts=1, delay=0)
    assert store.job(job.id).state == "dead"
    assert store.rerun_job(job.id, [tmp_path / "b"])  # a dead job is analysed again, not only re-sent
    rerun = store.job(job.id)
    assert (rerun.state, rerun.attempts, rerun.files, rerun.deliveries) == ("queued", 0, (tmp_path / "b",), ())
    assert rerun.version == job.version and rerun.instance_set_hash == job.instance_set_hash


def test_runner_and_exporter_with_more_destinations(tmp_path):
    """The deliveries of the Orthanc plugin: named destinations with exporters of their own."""
    out = tmp_path / "out"
    config = _config(tmp_path, selection={"min_slices": 4},
                     destinations=[{"name": "folder", "type": "folder", "path": str(out)}])
    store = JobStore.for_storage(config.storage_dir)
    _receive(config, store, write_ct_series(tmp_path / "in", slices=5))
    (job,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    extra = _FlakyExporter(failures=0)
    exporter = ExportRunner(config, store, exporters={"x:extra": extra})
    assert list(exporter.exporters) == ["x:extra", "folder"]
    runner = JobRunner(config, store, process_fn=fake_process, destinations=list(exporter.exporters))
    assert runner.run_next()
    assert [d.destination for d in store.job(job.id).deliveries] == ["folder", "x:extra"]
    while exporter.deliver_one():
        pass
    assert store.job(job.id).state == "done" and extra.calls == 1
    assert JobRunner(config, store).destinations == ["folder"]
    with pytest.raises(ValueError, match="folder"):
        ExportRunner(config, store, exporters={"folder": extra})


def test_backoff_is_exponential_and_capped(tmp_path):
    export = _config(tmp_path, export={"backoff_initial_seconds": 2, "backoff_factor": 3,
                                       "backoff_max_seconds": 50}).export
    assert [backoff_delay(export, n) for n in range(1, 6)] == [2, 6, 18, 50, 50]


def test_complete_now_for_pulled_series(tmp_path):
    config = _config(tmp_path, selection={"min_slices": 4})
    store = JobStore.for_storage(config.storage_dir)
    paths = write_ct_series(tmp_path / "in", slices=5)
    _receive(config, store, paths)
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    (job,) = complete_now(config, store, [series_uid])
    assert job.state == "queued"


@pytest.mark.parametrize("journal", ["WAL", "DELETE"])
def test_journal_modes(tmp_path, journal):
    store = JobStore(tmp_path / "db.sqlite", journal_mode=journal)
    mode = store.query("PRAGMA journal_mode")[0][0]
    assert mode.upper() == journal


def test_retention_purges_finished_series(tmp_path):
    from lungburden.jobs.engine import JobEngine

    config = _config(tmp_path, selection={"min_slices": 4}, node={"port": 0})
    engine = JobEngine(config, analysis="none")
    _receive(config, engine.store, write_ct_series(tmp_path / "in", slices=5))
    (job,) = SeriesAssembler(config, engine.store).poll(now=time.time() + 5)
    assert engine.purge(time.time() + 10) == 0  # queued: kept
    JobRunner(config, engine.store, process_fn=fake_process).run_next()
    job = engine.store.job(job.id)
    assert job.state == "done" and job.result_dir.exists()
    assert engine.purge(time.time() - 3600) == 0  # too recent
    assert engine.purge(time.time() + 10) == 1
    assert not list(engine.spool.iter_files()) and not job.result_dir.exists()
    assert engine.store.instances(job.series_instance_uid) == []
    assert engine.store.job(job.id).state == "done"  # the record stays


def test_rerun_of_a_series_version_gives_the_same_result_uids(tmp_path):
    """Idempotency with the real pipeline: a job re-run after a crash produces the same SEG/SR UIDs."""
    config = _config(tmp_path, processing={"model": "threshold"})
    store = JobStore.for_storage(config.storage_dir)
    _receive(config, store, write_phantom(tmp_path / "phantom", seed=41, slices=20, size=128))
    (job,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    runner = JobRunner(config, store)
    uids = []
    for _ in range(2):
        assert runner.run_next()
        done = store.job(job.id)
        assert done.state in ("done", "exporting"), done.reason
        uids.append({k: v for k, v in done.result.items() if k.endswith("_uid")})
        store.retry([job.id], states=("done",))  # as if the worker had died before recording success
    assert uids[0] == uids[1]
    assert uids[0]["seg_sop_instance_uid"] != uids[0]["sr_sop_instance_uid"]


def test_result_uid_seed_follows_the_algorithm():
    """Other weights or precision = other SEG/SR objects = other UIDs; the same setting = the same."""
    from types import SimpleNamespace

    from lungburden.jobs.runner import uid_seed
    from lungburden.pipeline import result_uids
    from lungburden.segmentation.base import AlgorithmInfo

    job = SimpleNamespace(series_instance_uid="1.2.3", instance_set_hash="abc")

    def info(**parameters):
        return AlgorithmInfo(name="lungburden convlstm", version="0.1.0", parameters=parameters or None)

    base = uid_seed(job, "convlstm", info(weights="a.pt sha256:1", precision="float32"))
    assert base == uid_seed(job, "convlstm", info(precision="float32", weights="a.pt sha256:1"))
    others = [uid_seed(job, "convlstm", info(weights="a.pt sha256:2", precision="float32")),
              uid_seed(job, "convlstm", info(weights="a.pt sha256:1", precision="bfloat16")),
              uid_seed(job, "threshold", info(weights="a.pt sha256:1", precision="float32")),
              uid_seed(job, "convlstm", info())]
    assert len({base, *others}) == 5
    assert result_uids(base) == result_uids(base) != result_uids(others[1])


def test_job_database_is_owner_only_and_runner_passes_the_configured_outputs(tmp_path):
    """The job database (UIDs, hosts) is 0600; workers produce the outputs of ``processing.outputs``."""
    config = _config(tmp_path, processing={"outputs": ["seg", "sr"]})
    store = JobStore.for_storage(config.storage_dir)
    store.counts()
    for path in config.storage_dir.glob("lungburden.db*"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert JobRunner(config, store).process_fn.keywords["outputs"] == ["seg", "sr"]
