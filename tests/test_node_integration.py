"""The node against real peers: DCMTK storescu as the scanner, a real Orthanc as the PACS.

Every test runs ``lungburden serve`` as a subprocess (``python -m lungburden.dicom_node serve``)
on free loopback ports with ``series_quiet_seconds`` of 1-2 s and the fast threshold segmenter.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest
from ct_builders import encode, make_ct_dataset, write_phantom
from node_helpers import REPO, NodeProcess, storescu
from orthanc import OrthancServer, orthanc_available
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from lungburden.dicom_node.demo import dcmtk_tool

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed"),
    pytest.mark.skipif(dcmtk_tool("storescu") is None, reason="DCMTK storescu not installed"),
]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


def _dimse(orthanc: OrthancServer) -> dict:
    return {"name": "pacs", "type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port,
            "ae_title": orthanc.aet}


def _node_config(*destinations: dict, quiet: float = 1.0, **sections) -> dict:
    config = {
        "node": {"series_quiet_seconds": quiet, "ae_title": "LUNGBURDEN"},
        "selection": {"min_slices": 16},
        "export": {"max_attempts": 20, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2},
        "destinations": list(destinations),
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)
    return config


def results_in_orthanc(orthanc: OrthancServer, study_uid: str) -> dict[str, list[dict]]:
    """SEG and SR instances Orthanc holds in the study (by SOP class)."""
    out: dict[str, list[dict]] = {"SEG": [], "SR": []}
    for series in orthanc.series_in_study(study_uid):
        for instance_id in series["Instances"]:
            tags = orthanc.get(f"/instances/{instance_id}/simplified-tags")
            if tags.get("SOPClassUID") == SEG:
                out["SEG"].append({"id": instance_id, **tags})
            elif tags.get("SOPClassUID") == SR:
                out["SR"].append({"id": instance_id, **tags})
    return out


def wait_for_results(orthanc: OrthancServer, study_uid: str, timeout: float = 90.0) -> dict[str, list[dict]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = results_in_orthanc(orthanc, study_uid)
        if found["SEG"] and found["SR"]:
            return found
        time.sleep(0.25)
    raise AssertionError(f"no SEG + SR in Orthanc for study {study_uid} after {timeout} s")


def _done(series_uid: str):
    def predicate(store):
        jobs = [j for j in store.jobs(series_instance_uid=series_uid) if j.state == "done"]
        return jobs[0] if jobs else None

    return predicate


def check_sr_equals_result(orthanc: OrthancServer, found: dict, result_json: Path, workdir: Path) -> dict:
    """The SR stored in Orthanc carries the numbers of result.json (read back by dcmqi)."""
    from lungburden.results.validate import read_sr_with_dcmqi, result_values

    result = json.loads(result_json.read_text())
    (seg,), (sr,) = found["SEG"], found["SR"]
    assert seg["SOPInstanceUID"] == result["seg_sop_instance_uid"]
    assert sr["SOPInstanceUID"] == result["sr_sop_instance_uid"]
    assert seg["StudyInstanceUID"] == sr["StudyInstanceUID"] == result["study_instance_uid"]
    sr_path = workdir / "sr-from-orthanc.dcm"
    sr_path.write_bytes(orthanc.instance_file(sr["id"]))
    values = read_sr_with_dcmqi(sr_path, workdir / "dcmqi")
    assert {"lung_volume_ml", "ggo_volume_ml", "high_opacity_volume_ml", "burden_percent"} <= set(values)
    expected = result_values(result)
    for key, value in values.items():
        assert value == pytest.approx(expected[key], abs=1e-3), key
    return result


def test_example_config_storescu_phantom_to_orthanc(orthanc, tmp_path):
    """Done criterion: `serve --config config/lungburden.example.yaml` adjusted to an Orthanc by
    environment variables; storescu of a phantom; SEG + SR land in Orthanc's copy of the study,
    once, although both destinations (C-STORE and STOW-RS) deliver them. The model is the shipped
    default (ConvLSTM), as in production."""
    phantom = write_phantom(tmp_path / "phantom", seed=21)
    orthanc_series_before = len(orthanc.get("/series"))
    env = {
        "LUNGBURDEN_NODE__PORT": "0",
        "LUNGBURDEN_NODE__HOST": "127.0.0.1",
        "LUNGBURDEN_NODE__SERIES_QUIET_SECONDS": "1",
        "LUNGBURDEN_NODE__MIN_FREE_DISK_MB": "50",
        "LUNGBURDEN_HTTP__PORT": "0",
        "LUNGBURDEN_DESTINATIONS__PACS__PORT": str(orthanc.dicom_port),
        "LUNGBURDEN_DESTINATIONS__PACS_WEB__URL": orthanc.dicomweb_url,
    }
    with NodeProcess(tmp_path / "node", env=env, config_path=REPO / "config" / "lungburden.example.yaml") as node:
        # the scanner first stores its series in the PACS too (Orthanc's copy of the study)
        assert storescu(orthanc.dicom_port, phantom, called=orthanc.aet).returncode == 0
        sent = storescu(node.port, phantom)
        assert sent.returncode == 0, sent.stderr
        ds = pydicom.dcmread(phantom[0], stop_before_pixels=True)
        job = node.wait_for(_done(ds.SeriesInstanceUID), what="job done")
        assert {d.destination: d.state for d in job.deliveries} == {"pacs": "done", "pacs-web": "done"}
        found = wait_for_results(orthanc, ds.StudyInstanceUID)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
        check_sr_equals_result(orthanc, found, job.result_dir / "result.json", tmp_path)
        # the SEG and SR sit in the source study, next to the CT series
        series = orthanc.series_in_study(ds.StudyInstanceUID)
        assert {s["MainDicomTags"]["Modality"] for s in series} == {"CT", "SEG", "SR", "OT", "DOC"}
        assert len(orthanc.get("/series")) == orthanc_series_before + 5  # CT, SEG, SR, SC, PDF
        # health and job states over HTTP
        import requests

        health = requests.get(f"http://127.0.0.1:{node.http_port}/health", timeout=10).json()
        assert health["status"] == "ok" and health["jobs"]["done"] >= 1 and health["workers"]["alive"] == 1


def test_real_study_two_kernels_lung_kernel_analysed(orthanc, tmp_path, real_study):
    """The real study (64 slices x 2 kernels) by storescu: the lung kernel is analysed, the soft
    kernel is skipped with a reason, SEG + SR land in Orthanc in the real study."""
    with NodeProcess(tmp_path / "node", _node_config(_dimse(orthanc), quiet=1.5)) as node:
        sent = storescu(node.port, real_study / "lung-kernel-L-5mm")
        assert sent.returncode == 0, sent.stderr
        sent = storescu(node.port, real_study / "soft-kernel-B-5mm")
        assert sent.returncode == 0, sent.stderr
        lung = pydicom.dcmread(next((real_study / "lung-kernel-L-5mm").glob("*.dcm")), stop_before_pixels=True)
        soft = pydicom.dcmread(next((real_study / "soft-kernel-B-5mm").glob("*.dcm")), stop_before_pixels=True)
        job = node.wait_for(_done(lung.SeriesInstanceUID), timeout=180, what="lung kernel job done")
        assert job.instance_count == 64
        skipped = node.store().jobs(series_instance_uid=soft.SeriesInstanceUID)
        assert [j.state for j in skipped] == ["skipped"]
        assert "another reconstruction of the same acquisition is preferred" in skipped[0].reason
        found = wait_for_results(orthanc, lung.StudyInstanceUID)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
        check_sr_equals_result(orthanc, found, job.result_dir / "result.json", tmp_path)
    log = node.log_text()
    assert "Lung_Dx" not in log and str(lung.get("PatientID", "@@")) not in log  # UIDs only in logs


def test_stow_rs_in_and_out(orthanc, tmp_path):
    """Input by STOW-RS to the node, output by STOW-RS to Orthanc (dicomweb-client both ways)."""
    from dicomweb_client.api import DICOMwebClient

    phantom = write_phantom(tmp_path / "phantom", seed=22)
    web = {"name": "pacs-web", "type": "dicomweb", "url": orthanc.dicomweb_url}
    with NodeProcess(tmp_path / "node", _node_config(web)) as node:
        ds = pydicom.dcmread(phantom[0], stop_before_pixels=True)
        client = DICOMwebClient(f"http://127.0.0.1:{node.http_port}/dicom-web")
        response = client.store_instances([pydicom.dcmread(p) for p in phantom], ds.StudyInstanceUID)
        assert len(response.ReferencedSOPSequence) == len(phantom)
        job = node.wait_for(_done(ds.SeriesInstanceUID), what="job done")
        found = wait_for_results(orthanc, ds.StudyInstanceUID)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
        check_sr_equals_result(orthanc, found, job.result_dir / "result.json", tmp_path)


def test_pull_by_wado_rs(orthanc, tmp_path):
    """`lungburden pull --url --study` retrieves from Orthanc's DICOMweb and sends SEG + SR back."""
    import subprocess
    import sys

    phantom = write_phantom(tmp_path / "phantom", seed=23)
    for path in phantom:
        orthanc.upload(path)
    ds = pydicom.dcmread(phantom[0], stop_before_pixels=True)
    node = NodeProcess(tmp_path / "node", _node_config(_dimse(orthanc)))  # config only, not started

    def pull():
        return subprocess.run(
            [sys.executable, "-m", "lungburden.dicom_node", "pull", "--config", str(node.config_path),
             "--url", orthanc.dicomweb_url, "--study", ds.StudyInstanceUID, "--timeout", "120"],
            capture_output=True, text=True, timeout=180, cwd=REPO,
        )

    result = pull()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done" in result.stdout and "burden" in result.stdout
    found = wait_for_results(orthanc, ds.StudyInstanceUID, timeout=10)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    # pulling again (the study now holds SEG + SR too): same instance set, nothing new, no duplicate
    again = pull()
    assert again.returncode == 0, again.stdout + again.stderr
    found = results_in_orthanc(orthanc, ds.StudyInstanceUID)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1


def _send_with_pynetdicom(port: int, paths: list[Path], stop_after: int | None = None):
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGBURDEN")
    assert assoc.is_established
    for i, path in enumerate(paths):
        if stop_after is not None and i == stop_after:
            return assoc  # left open: the transfer is "in progress"
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.release()
    return None


def test_crash_during_transfer(orthanc, tmp_path):
    """kill -9 while a series is being received; the scanner re-sends it after the restart:
    exactly one SEG + SR for the completed series."""
    phantom = write_phantom(tmp_path / "phantom", seed=24)
    ds = pydicom.dcmread(phantom[0], stop_before_pixels=True)
    node = NodeProcess(tmp_path / "node", _node_config(_dimse(orthanc), quiet=2.0)).start()
    try:
        open_assoc = _send_with_pynetdicom(node.port, phantom, stop_after=len(phantom) // 2)
        node.kill()
        open_assoc.abort()
        store = node.store()
        assert len(store.instances(ds.SeriesInstanceUID)) == len(phantom) // 2  # durable before Success
        assert store.jobs() == []
        node.start()
        sent = storescu(node.port, phantom)  # the scanner's retry of the whole series
        assert sent.returncode == 0, sent.stderr
        job = node.wait_for(_done(ds.SeriesInstanceUID), what="job done")
        assert job.instance_count == len(phantom) and job.version == 1
        found = wait_for_results(orthanc, ds.StudyInstanceUID)
        time.sleep(2.5)  # nothing else arrives later
        found = results_in_orthanc(orthanc, ds.StudyInstanceUID)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
        assert [j.state for j in node.store().jobs(series_instance_uid=ds.SeriesInstanceUID)] == ["done"]
    finally:
        node.stop()


def test_crash_during_inference(orthanc, tmp_path):
    """kill -9 while the worker analyses the series; after the restart the job is re-queued and
    delivered: exactly one SEG + SR."""
    phantom = write_phantom(tmp_path / "phantom", seed=25, slices=64, size=384)
    ds = pydicom.dcmread(phantom[0], stop_before_pixels=True)
    node = NodeProcess(tmp_path / "node", _node_config(_dimse(orthanc))).start()
    try:
        assert storescu(node.port, phantom).returncode == 0
        node.wait_for(lambda s: [j for j in s.jobs(["running"])], what="job running", interval=0.05)
        node.kill()
        store = node.store()
        (job,) = store.jobs(series_instance_uid=ds.SeriesInstanceUID)
        assert job.state == "running"
        assert results_in_orthanc(orthanc, ds.StudyInstanceUID) == {"SEG": [], "SR": []}
        time.sleep(0.5)
        node.start()
        job = node.wait_for(_done(ds.SeriesInstanceUID), what="job done after restart")
        assert job.attempts == 2 and job.version == 1
        time.sleep(1.0)
        found = results_in_orthanc(orthanc, ds.StudyInstanceUID)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
        assert "re-queued 1 jobs interrupted" in node.log_text()
    finally:
        node.stop()


def test_orderly_stop_during_inference_hands_the_job_back(tmp_path):
    """SIGTERM to the node's process group (as `timeout` or systemd send it) while a series is
    analysed: the node exits promptly, the job is queued again without counting as a failure,
    and the next start completes it."""
    phantom = write_phantom(tmp_path / "phantom", seed=27, slices=64, size=384)
    ds = pydicom.dcmread(phantom[0], stop_before_pixels=True)
    out = tmp_path / "out"
    node = NodeProcess(tmp_path / "node", _node_config({"name": "out", "type": "folder", "path": str(out)}))
    node.start()
    try:
        assert storescu(node.port, phantom).returncode == 0
        node.wait_for(lambda s: s.jobs(["running"]), what="job running", interval=0.05)
        assert node.terminate_group() < 15
        (job,) = node.store().jobs()
        assert (job.state, job.attempts) == ("queued", 0), job.reason
        assert "node was stopped" in job.reason
        node.start()
        job = node.wait_for(_done(ds.SeriesInstanceUID), what="job done after the restart")
        assert job.attempts == 1
        assert len(list(out.rglob("seg.dcm"))) == 1
    finally:
        node.stop()


def test_pacs_down_then_back(tmp_path):
    """Orthanc stopped while the results are ready: retried with backoff, delivered once it is back."""
    pacs = OrthancServer(tmp_path / "pacs")
    phantom = write_phantom(tmp_path / "phantom", seed=26)
    ds = pydicom.dcmread(phantom[0], stop_before_pixels=True)
    config = _node_config({"name": "pacs", "type": "dimse", "host": "127.0.0.1", "port": pacs.dicom_port,
                           "ae_title": pacs.aet})
    with NodeProcess(tmp_path / "node", config) as node:
        assert storescu(node.port, phantom).returncode == 0

        def failing(store):
            jobs = store.jobs(series_instance_uid=ds.SeriesInstanceUID)
            return jobs and jobs[0].state == "exporting" and jobs[0].deliveries[0].attempts >= 2

        node.wait_for(failing, what="failed delivery attempts")
        (job,) = node.store().jobs(series_instance_uid=ds.SeriesInstanceUID)
        assert "association" in job.deliveries[0].last_error
        pacs.start()
        try:
            job = node.wait_for(_done(ds.SeriesInstanceUID), what="delivered after the PACS came back")
            found = wait_for_results(pacs, ds.StudyInstanceUID, timeout=10)
            assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
            assert job.deliveries[0].attempts >= 2
        finally:
            pacs.stop()


def test_bad_input_corpus(orthanc, tmp_path):
    """Truncated, pixel-less, wrong-SOP-class and garbage files; a too-short series; a series the
    pipeline rejects: the node stays up, each is refused or skipped with a reason, nothing is sent."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    study = generate_uid()
    good = make_ct_dataset(0, study, generate_uid(), generate_uid())

    (corpus / "truncated.dcm").write_bytes(encode(good)[:-900])
    no_pixels = make_ct_dataset(1, study, generate_uid(), generate_uid())
    del no_pixels.PixelData
    no_pixels.save_as(corpus / "no-pixels.dcm", enforce_file_format=True)
    mr = make_ct_dataset(2, study, generate_uid(), generate_uid())
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.Modality = "MR"
    mr.save_as(corpus / "mr.dcm", enforce_file_format=True)
    (corpus / "garbage.dcm").write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 40)
    (corpus / "text.dcm").write_text("not a DICOM file at all\n")
    # a series too short for the selection rules, and one the pipeline rejects (duplicate positions)
    short_series, dup_series, frame = generate_uid(), generate_uid(), generate_uid()
    short = [make_ct_dataset(i, study, short_series, frame) for i in range(5)]
    dup = [make_ct_dataset(i % 9, study, dup_series, generate_uid()) for i in range(18)]
    for ds in dup:
        ds.FrameOfReferenceUID = dup[0].FrameOfReferenceUID
    for i, ds in enumerate(short + dup):
        ds.save_as(corpus / f"series-{i:02d}.dcm", enforce_file_format=True)

    with NodeProcess(tmp_path / "node", _node_config(_dimse(orthanc), selection={"min_slices": 16})) as node:
        for name in ("truncated.dcm", "no-pixels.dcm", "mr.dcm", "garbage.dcm", "text.dcm"):
            storescu(node.port, corpus / name, extra=["-nh"])  # may fail: each file is refused
        # the truncated file again through pynetdicom, streamed raw (storescu may refuse to read it)
        from pynetdicom import _config

        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="LUNGBURDEN")
            assert assoc.send_c_store(corpus / "truncated.dcm").Status == 0xA900
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        sent = storescu(node.port, sorted(corpus.glob("series-*.dcm")))
        assert sent.returncode == 0, sent.stderr

        def settled(store):
            jobs = store.jobs()
            return len(jobs) == 2 and all(j.state in ("skipped", "failed") for j in jobs) and jobs

        jobs = {j.series_instance_uid: j for j in node.wait_for(settled, what="series settled")}
        assert jobs[short_series].state == "skipped" and "fewer than the minimum" in jobs[short_series].reason
        assert jobs[dup_series].state == "failed" and "duplicate slice positions" in jobs[dup_series].reason
        # still up: echo works, health is ok
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="LUNGBURDEN")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        assert node.running
        log = node.log_text()
        assert "no Pixel Data" in log and "truncated" in log
        stored = {p.name for p in (node.storage_dir / "spool").rglob("*.dcm")}
        assert len(stored) == len(short) + len(dup)  # none of the malformed files
        time.sleep(1.0)
        assert results_in_orthanc(orthanc, study) == {"SEG": [], "SR": []}
