"""Result safety on a hospital network: nothing partial or implausible is sent, superseded results
are retracted with an IHE IOCM rejection note, destinations are independent, health and audit.

Decision tested here for a series cut short: its result is delivered *flagged* (QC flag
``incomplete_coverage`` in result.json and the SR) and, when the complete series arrives as
version 2, an IOCM rejection note (KOS, "Rejected for Quality Reasons") referencing the partial
version's SEG and SR is sent to every destination that received them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ct_builders import write_ct_series, write_phantom
from node_helpers import NodeProcess, storescu
from orthanc import OrthancServer, orthanc_available
from pydicom.uid import generate_uid

from lungburden.config.loader import config_from_mapping
from lungburden.dicom_node.demo import dcmtk_tool
from lungburden.jobs.assembly import SeriesAssembler
from lungburden.jobs.engine import JobEngine
from lungburden.jobs.exporters import ExportRunner
from lungburden.jobs.logs import configure_audit
from lungburden.jobs.queue import MAX_WORKER_DEATHS, JobStore
from lungburden.jobs.runner import JobRunner
from lungburden.jobs.spool import Intake, Spool

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"

def _config(tmp_path: Path, **sections):
    raw = {"node": {"storage_dir": str(tmp_path / "var"), "series_quiet_seconds": 1, "min_free_disk_mb": 1},
           "processing": {"model": "threshold"}, "selection": {"min_slices": 4}}
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return config_from_mapping(raw)


def _receive(config, store: JobStore, paths: list[Path], source: str = "dimse:CT01") -> None:
    intake = Intake(Spool(config.storage_dir), store)
    for p in paths:
        outcome = intake.accept(p.read_bytes(), source=source)
        assert outcome.ok, outcome.reason


def _audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_no_patient_data(path: Path, names: list[str]) -> None:
    text = path.read_text()
    for name in names:
        assert name.lower() not in text.lower(), name


# --- 1. nonsense input: refused with a reason, nothing delivered ------------------------------------

def _variant(paths: list[Path], out: Path, kind: str) -> list[Path]:
    out.mkdir(parents=True)
    series_uid = generate_uid()
    written = []
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if kind == "slope0":
            ds.RescaleSlope = 0
        elif kind == "slope1e30":
            ds.RescaleSlope = "1e30"
        elif kind == "all_air":
            pixels = np.full(ds.pixel_array.shape, -1000 - float(ds.RescaleIntercept), dtype=ds.pixel_array.dtype)
            ds.PixelData = pixels.tobytes()
        elif kind == "16x16":
            step = ds.Rows // 16
            pixels = np.ascontiguousarray(ds.pixel_array[::step, ::step][:16, :16])
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelSpacing = [float(v) * step for v in ds.PixelSpacing]
            ds.PixelData = pixels.tobytes()
        path = out / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


@pytest.mark.parametrize("kind, reason", [
    ("slope0", "RescaleSlope is 0"),
    ("all_air", "no soft tissue"),
    ("slope1e30", "HU (RescaleSlope/RescaleIntercept not those of a CT)"),
    ("16x16", "images of 16x16 pixels"),
])
def test_nonsense_series_are_refused_and_nothing_is_delivered(tmp_path, kind, reason):
    out = tmp_path / "out"
    audit_file = tmp_path / "audit.jsonl"
    config = _config(tmp_path, destinations=[{"name": "folder", "type": "folder", "path": str(out)}],
                     logging={"audit_file": str(audit_file)})
    configure_audit(config)
    store = JobStore.for_storage(config.storage_dir)
    phantom = write_phantom(tmp_path / "phantom", slices=24, size=128)
    _receive(config, store, _variant(phantom, tmp_path / kind, kind))
    (job,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    assert job.state == "queued", job.reason
    assert JobRunner(config, store).run_next()
    job = store.job(job.id)
    assert job.state == "failed" and "quality check" in job.reason and reason in job.reason, job.reason
    assert job.deliveries == () and job.result is None
    assert not ExportRunner(config, store).deliver_one()
    assert not out.exists()
    events = [r["event"] for r in _audit_records(audit_file)]
    assert events.count("instance_received") == 24 and events[-1] == "job_failed"
    _assert_no_patient_data(audit_file, ["PHANTOM^SEED3", "PHANTOM-SEED3"])
    configure_audit(_config(tmp_path))


def test_a_refused_result_can_be_reported_by_an_sr_without_measurements(tmp_path):
    from lungburden.results.validate import run_dciodvfy

    out = tmp_path / "out"
    config = _config(tmp_path, destinations=[{"name": "folder", "type": "folder", "path": str(out)}],
                     processing={"on_quality_failure": "sr"})
    store = JobStore.for_storage(config.storage_dir)
    phantom = write_phantom(tmp_path / "phantom", slices=24, size=128)
    _receive(config, store, _variant(phantom, tmp_path / "slope0", "slope0"))
    (job,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    assert JobRunner(config, store).run_next()
    assert ExportRunner(config, store).deliver_one()
    job = store.job(job.id)
    assert job.state == "done" and job.reason.startswith("no measurements: quality check:"), job.reason
    assert "RescaleSlope is 0" in job.reason and job.result["refused"] == job.reason
    (delivered,) = [p for p in out.rglob("*") if p.is_file() and p.suffix == ".dcm"]
    assert delivered.name == "sr.dcm"
    sr = pydicom.dcmread(delivered)
    assert sr.StudyInstanceUID == pydicom.dcmread(phantom[0]).StudyInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in sr.ContentSequence]
    assert "126010" not in names  # no Imaging Measurements container
    (qc,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert qc.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "111235"  # Unusable
    assert any("RescaleSlope is 0" in item.get("TextValue", "") for item in qc.ContentSequence)
    report = run_dciodvfy(delivered)
    assert report.ok, report.output


# --- 2. the lost-worker log line agrees with the job state ---------------------------------------

def test_job_failed_after_worker_deaths_is_not_logged_as_requeued(tmp_path, caplog):
    config = _config(tmp_path)
    engine = JobEngine(config, analysis="none")
    job, _ = engine.store.add_job("1.1", "1.2", [tmp_path / "x"], ["1.3"], "threshold")
    dead_owner = f"{os.uname().nodename}:999999999"
    caplog.set_level(logging.WARNING, logger="lungburden.jobs.engine")
    for attempt in range(1, MAX_WORKER_DEATHS + 1):
        caplog.clear()
        assert engine.store.claim_job(owner=dead_owner).id == job.id
        assert engine.requeue_lost() == [job.id]
        state = engine.store.job(job.id).state
        if attempt < MAX_WORKER_DEATHS:
            assert state == "queued" and "re-queued 1 jobs" in caplog.text
        else:
            assert state == "failed" and "re-queued" not in caplog.text
            assert f"job {job.id} (series 1.2) marked failed: the worker process died 3 times" in caplog.text


# --- 3. a hung destination does not delay a folder destination -------------------------------------

class SilentServer:
    """Accepts TCP connections and never answers (a hung PACS)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def _fake_process(files, out_dir, model=None, limits=None, segmenter=None, uid_seed=None, **kwargs):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    result = {"study_instance_uid": str(src.StudyInstanceUID), "series_instance_uid": str(src.SeriesInstanceUID)}
    for name in ("seg", "sr"):
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, name])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, name, "series"])
        ds.save_as(out_dir / f"{name}.dcm", enforce_file_format=True)
        result[f"{name}_sop_instance_uid"] = str(ds.SOPInstanceUID)
        result[f"{name}_series_instance_uid"] = str(ds.SeriesInstanceUID)
    (out_dir / "result.json").write_text(json.dumps(result))
    return namedtuple("Outputs", "result")(result)


def test_hung_destination_beside_folder(tmp_path):
    hung = SilentServer()
    out = tmp_path / "out"
    config = _config(tmp_path, export={"timeout_seconds": 20, "backoff_initial_seconds": 1},
                     destinations=[{"name": "hung", "type": "dimse", "host": "127.0.0.1", "port": hung.port,
                                    "ae_title": "HUNG"},
                                   {"name": "folder", "type": "folder", "path": str(out)}])
    store = JobStore.for_storage(config.storage_dir)
    for i in range(3):
        _receive(config, store, write_ct_series(tmp_path / f"in{i}", slices=6))
    jobs = SeriesAssembler(config, store).poll(now=time.time() + 5)
    runner = JobRunner(config, store, process_fn=_fake_process)
    while runner.run_next():
        pass
    exporter = ExportRunner(config, store)
    stop = threading.Event()
    thread = threading.Thread(target=exporter.run, args=(stop, 0.1), daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        deadline = start + 10
        while time.monotonic() < deadline:
            if all((out / j.study_instance_uid / j.series_instance_uid / "v1" / "seg.dcm").exists() for j in jobs):
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        assert elapsed < 3.0, f"folder deliveries took {elapsed:.1f} s beside a hung destination"
        states = exporter.destination_states()
        assert states["folder"]["delivered"] == 3 and states["folder"]["pending"] == 0
        assert states["hung"]["busy_since"] is not None and states["hung"]["pending"] == 3
    finally:
        stop.set()
        hung.close()
        thread.join(5)


# --- 4. health ---------------------------------------------------------------------------------------

def test_health_reports_disk_queue_dead_letters_and_destinations(tmp_path, monkeypatch):
    from lungburden.dicom_node.service import NodeService

    config = _config(tmp_path, node={"min_free_disk_mb": 1024},
                     destinations=[{"name": "folder", "type": "folder", "path": str(tmp_path / "out")}])
    service = NodeService(config, start_workers=False)
    usage = namedtuple("usage", "total used free")
    free_mb = {"value": 50_000}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, free_mb["value"] * 2**20))
    service.spool._free_cache = (0.0, 0.0)
    report = service.health()
    assert report["status"] == "ok", report["problems"]
    assert report["queue_depth"] == 0 and report["dead_letters"] == {"deliveries": 0, "jobs": 0}
    assert report["destination_state"]["folder"]["pending"] == 0
    assert report["disk"]["ok"]

    for value, words in ((100, "spool nearly full"), (0, "disk full")):
        free_mb["value"] = value
        service.spool._free_cache = (0.0, 0.0)
        report = service.health()
        assert report["status"] == "degraded" and any(words in p for p in report["problems"]), report
        assert not report["disk"]["ok"]
    # queue depth, dead letters and per-destination pending counts
    free_mb["value"] = 50_000
    service.spool._free_cache = (0.0, 0.0)
    _receive(config, service.store, write_ct_series(tmp_path / "in", slices=6))
    (job,) = SeriesAssembler(config, service.store).poll(now=time.time() + 5)
    assert service.health()["queue_depth"] == 1
    JobRunner(config, service.store, process_fn=_fake_process).run_next()
    assert service.health()["destination_state"]["folder"]["pending"] == 1
    service.store.claim_delivery()
    service.store.delivery_failed(job.id, "folder", "disk error", max_attempts=1, delay=0)
    report = service.health()
    assert report["dead_letters"]["deliveries"] == 1 and report["status"] == "degraded"
    assert report["destination_state"]["folder"]["dead"] == 1


# --- 5. superseded versions: undelivered results are never sent late ------------------------------

def test_pending_delivery_of_an_older_version_is_superseded(tmp_path):
    config = _config(tmp_path, destinations=[{"name": "folder", "type": "folder", "path": str(tmp_path / "out")}])
    store = JobStore.for_storage(config.storage_dir)
    paths = write_ct_series(tmp_path / "in", slices=8)
    _receive(config, store, paths[:5])
    (v1,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    runner = JobRunner(config, store, process_fn=_fake_process)
    assert runner.run_next()  # v1 analysed, its delivery still pending
    _receive(config, store, paths[5:])
    (v2,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    assert v2.version == 2 and runner.run_next()
    v1 = store.job(v1.id)
    assert v1.state == "superseded" and [d.state for d in v1.deliveries] == ["superseded"]
    exporter = ExportRunner(config, store)
    assert exporter.deliver_one() and not exporter.deliver_one()
    assert store.job(v2.id).state == "done"
    # nothing of v1 was delivered, so no rejection note was needed
    assert store.rejections(v1.id) == []
    assert not (tmp_path / "out" / v2.study_instance_uid / v2.series_instance_uid / "v2" / "kos.dcm").exists()


# --- 6. a partial series, then the rest: retracted in a real PACS ------------------------------------

@pytest.mark.integration
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed")
@pytest.mark.skipif(dcmtk_tool("storescu") is None, reason="DCMTK storescu not installed")
def test_partial_series_then_rest_is_retracted_with_a_rejection_note(tmp_path):
    from lungburden.results.validate import run_dciodvfy

    files = write_phantom(tmp_path / "phantom", seed=3, slices=120, size=128, slice_spacing_mm=2.5)
    patient = pydicom.dcmread(files[0], stop_before_pixels=True)
    audit_file = tmp_path / "audit.jsonl"
    folder = tmp_path / "folder"
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        config = {
            "node": {"series_quiet_seconds": 1.5},
            "export": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2},
            "logging": {"audit_file": str(audit_file)},
            "destinations": [
                {"name": "pacs", "type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port,
                 "ae_title": orthanc.aet},
                {"name": "folder", "type": "folder", "path": str(folder)},
            ],
        }
        with NodeProcess(tmp_path / "node", config) as node:
            series_uid = str(patient.SeriesInstanceUID)
            study_uid = str(patient.StudyInstanceUID)
            assert storescu(node.port, files[:40], aet="CT01").returncode == 0

            def done(version):
                def predicate(store):
                    return next((j for j in store.jobs(series_instance_uid=series_uid)
                                 if j.version == version and j.state == "done"), None)
                return predicate

            v1 = node.wait_for(done(1), timeout=120, what="partial version delivered")
            result1 = json.loads((folder / study_uid / series_uid / "v1" / "result.json").read_text())
            assert result1["slices"] == 40
            assert [f["code"] for f in result1["quality"]["flags"]] == ["incomplete_coverage"]
            assert v1.result["quality"]["flags"][0]["code"] == "incomplete_coverage"
            sr1 = pydicom.dcmread(folder / study_uid / series_uid / "v1" / "sr.dcm")
            qc = sr1.ContentSequence[-1]
            assert qc.ConceptNameCodeSequence[0].CodeValue == "C0034375"  # TID 1500 Qualitative Evaluations
            assert any(item.get("TextValue", "").startswith("incomplete_coverage") for item in qc.ContentSequence)
            assert any(item.ValueType == "CODE" and item.ConceptCodeSequence[0].CodeValue == "130576"
                       for item in qc.ContentSequence)

            time.sleep(2.0)  # the quiet time passes: version 1 stands alone for a while
            assert storescu(node.port, files[40:], aet="CT01").returncode == 0
            v2 = node.wait_for(done(2), timeout=120, what="complete version delivered")
            assert v2.instance_count == 120 and v2.supersedes == v1.id
            assert v2.result["quality"]["flags"] == []

            # what the PACS holds: v2's SEG + SR, v1's SEG + SR, and a note rejecting exactly v1's
            by_class: dict[str, list[tuple[str, str]]] = {SEG: [], SR: [], KOS: []}
            for series in orthanc.series_in_study(study_uid):
                for instance_id in series["Instances"]:
                    tags = orthanc.get(f"/instances/{instance_id}/simplified-tags")
                    if tags.get("SOPClassUID") in by_class:
                        by_class[tags["SOPClassUID"]].append((tags["SOPInstanceUID"], instance_id))
            assert len(by_class[KOS]) == 1, by_class
            note_path = tmp_path / "kos-from-orthanc.dcm"
            note_path.write_bytes(orthanc.instance_file(by_class[KOS][0][1]))
            note = pydicom.dcmread(note_path)
            assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
            assert note.StudyInstanceUID == study_uid and note.PatientID == patient.PatientID
            referenced = {sop.ReferencedSOPInstanceUID
                          for study in note.CurrentRequestedProcedureEvidenceSequence
                          for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}
            assert referenced == {v1.result["seg_sop_instance_uid"], v1.result["sr_sop_instance_uid"],
                                  v1.result["pdf_sop_instance_uid"], *v1.result["sc_sop_instance_uids"]}
            current = {v2.result["seg_sop_instance_uid"], v2.result["sr_sop_instance_uid"]}
            held = {uid for uid, _ in by_class[SEG] + by_class[SR]}
            assert held - current <= referenced  # nothing normal-looking without a rejection note
            report = run_dciodvfy(note_path)
            assert report.ok, report.output
            # the folder destination got the same note with version 2
            assert (folder / study_uid / series_uid / "v2" / "kos.dcm").exists()
            store = node.store()
            assert {r["destination"] for r in store.rejections(v1.id)} == {"pacs", "folder"}
            store.close()

    records = _audit_records(audit_file)
    received = [r for r in records if r["event"] == "instance_received"]
    assert len(received) == 120 and {r["calling_ae_title"] for r in received} == {"CT01"}
    assert {r["series_instance_uid"] for r in received} == {series_uid}
    analysed = [r for r in records if r["event"] == "job_analysed"]
    assert [r["version"] for r in analysed] == [1, 2]
    delivered = [r for r in records if r["event"] == "delivered"]
    assert {(r["destination"], r["version"]) for r in delivered} == {("pacs", 1), ("pacs", 2), ("folder", 1),
                                                                     ("folder", 2)}
    assert all(r["rejection_note_sop_instance_uid"] for r in delivered if r["version"] == 2)
    _assert_no_patient_data(audit_file, [str(patient.PatientName), str(patient.PatientID)])
