"""The node's SCP, intake and HTTP endpoint (in-process node, real DCMTK storescu / pynetdicom SCU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest
import requests
from ct_builders import encode, make_ct_dataset, write_ct_series, write_phantom
from node_helpers import InProcessNodes, storescu
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from lungburden.dicom_node.demo import dcmtk_tool
from lungburden.dicom_node.http import parse_multipart_related

HAVE_STORESCU = dcmtk_tool("storescu") is not None


@pytest.fixture
def node(tmp_path):
    nodes = InProcessNodes(tmp_path)
    yield lambda **node_options: nodes.start(node=node_options)
    nodes.stop()


def _assoc(port: int, contexts, aet: str = "TESTSCU", **kwargs):
    ae = AE(ae_title=aet)
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title="LUNGBURDEN", **kwargs)


def _echo_ok(port: int) -> bool:
    assoc = _assoc(port, [Verification])
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.skipif(not HAVE_STORESCU, reason="DCMTK storescu not installed")
def test_storescu_series_is_spooled_durably(node, tmp_path):
    service = node()
    paths = write_ct_series(tmp_path / "in", slices=12)
    result = storescu(service.scp.port, tmp_path / "in")
    assert result.returncode == 0, result.stderr
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    records = service.store.instances(series_uid)
    assert len(records) == 12
    for r in records:  # byte-identical copies of what was sent, under the UID layout
        assert r.path.parent.name == series_uid and r.path.name == f"{r.sop_instance_uid}.dcm"
        assert pydicom.dcmread(r.path).SOPInstanceUID == r.sop_instance_uid
        assert r.path.stat().st_size > 2000
    assert not list(service.spool.root.rglob(".*.tmp"))
    assert service.store.series(series_uid).state == "receiving"
    assert _echo_ok(service.scp.port)


def test_calling_ae_allow_list(node, tmp_path):
    service = node(allowed_calling_aets=["CT01"])
    assoc = _assoc(service.scp.port, [Verification], aet="INTRUDER")
    assert assoc.is_rejected
    assoc = _assoc(service.scp.port, [Verification], aet="CT01")
    assert assoc.is_established
    assoc.release()


def test_bounded_associations(node):
    service = node(max_associations=1)
    first = _assoc(service.scp.port, [Verification])
    assert first.is_established
    second = _assoc(service.scp.port, [Verification])
    assert second.is_rejected  # A-ASSOCIATE-RJ transient: local limit exceeded
    first.release()
    time.sleep(0.3)
    assert _echo_ok(service.scp.port)


def test_out_of_resources_when_disk_nearly_full(node, tmp_path):
    service = node()
    service.spool.min_free_disk_mb = 10**9  # pretend the disk is nearly full
    ds = make_ct_dataset(0, generate_uid(), generate_uid(), generate_uid())
    assoc = _assoc(service.scp.port, [CTImageStorage])
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA700
    assert "MiB" in status.ErrorComment
    assert not list(service.spool.iter_files())


def test_malformed_datasets_get_failure_statuses(node, tmp_path, monkeypatch):
    from pynetdicom import _config

    # send files as raw bytes after their File Meta (no decoding on our side either)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    service = node()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    cases = {}
    good = make_ct_dataset(0, study, series, frame)
    no_pixels = make_ct_dataset(1, study, series, frame)
    del no_pixels.PixelData
    cases["no pixel data"] = (no_pixels, 0xA900)
    bad_uid = make_ct_dataset(2, study, series, frame)
    bad_uid.SeriesInstanceUID = "../../etc"
    cases["path traversal UID"] = (bad_uid, 0xA900)
    mr = make_ct_dataset(3, study, series, frame)
    mr.SOPClassUID = MRImageStorage  # the data set says MR, the request says CT
    cases["wrong SOP class in data set"] = (mr, 0x0122)
    # truncated and garbage data sets, sent as files (pynetdicom streams them without decoding)
    truncated = tmp_path / "truncated.dcm"
    full = encode(make_ct_dataset(4, study, series, frame))
    truncated.write_bytes(full[: len(full) - 700])
    garbage = tmp_path / "garbage.dcm"
    meta_only = encode(make_ct_dataset(5, study, series, frame))
    header_len = 132 + 12 + int.from_bytes(meta_only[140:144], "little")
    garbage.write_bytes(meta_only[:header_len] + b"\xff\xfe\x00\x01garbage" * 50)

    assoc = _assoc(service.scp.port, [(CTImageStorage, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    statuses = {}
    for name, (ds, _) in cases.items():
        if name != "wrong SOP class in data set":
            statuses[name] = assoc.send_c_store(ds).Status
    statuses["truncated"] = assoc.send_c_store(truncated).Status
    statuses["garbage"] = assoc.send_c_store(garbage).Status
    statuses["good"] = assoc.send_c_store(good).Status
    assoc.release()
    assert statuses["no pixel data"] == 0xA900
    assert statuses["path traversal UID"] == 0xA900
    assert statuses["truncated"] == 0xA900
    assert statuses["garbage"] in (0xA900, 0xC000)
    assert statuses["good"] == 0x0000
    # a data set whose SOP class differs from the negotiated one
    outcome = service.intake.accept(encode(mr), "test", expected_sop_class=CTImageStorage)
    assert outcome.status in (0x0122, 0xA900)
    assert [p.name for p in service.spool.iter_files()] == [f"{good.SOPInstanceUID}.dcm"]
    assert service.scp.stats.refused == 4
    assert _echo_ok(service.scp.port)


def test_unsupported_sop_class_is_not_negotiated(node):
    service = node()
    assoc = _assoc(service.scp.port, [MRImageStorage, Verification])
    assert assoc.is_established
    ds = make_ct_dataset(0, generate_uid(), generate_uid(), generate_uid())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    with pytest.raises(ValueError):
        assoc.send_c_store(ds)  # no accepted presentation context for MR
    assoc.release()


def test_compressed_transfer_syntax_is_stored_without_decoding(node):
    service = node()
    ds = make_ct_dataset(0, generate_uid(), generate_uid(), generate_uid())
    ds.compress(RLELossless)
    assoc = _assoc(service.scp.port, [(CTImageStorage, [RLELossless])])
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    (path,) = service.spool.iter_files()
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert (stored.pixel_array == -800).all()


def test_stow_rs_endpoint_and_health(node, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    service = node()
    base = f"http://127.0.0.1:{service.http.port}"
    study = generate_uid()
    paths = write_ct_series(tmp_path / "in", slices=3, study_uid=study)
    client = DICOMwebClient(f"{base}/dicom-web")
    response = client.store_instances([pydicom.dcmread(p) for p in paths], study_instance_uid=study)
    assert len(response.ReferencedSOPSequence) == 3
    assert "FailedSOPSequence" not in response
    assert len(list(service.spool.iter_files())) == 3
    # a partly bad request: 202 with the failed instance and its reason code
    bad = pydicom.dcmread(paths[0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del bad.PixelData
    good = make_ct_dataset(9, study, generate_uid(), generate_uid())
    boundary = "BOUNDARY42"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + encode(ds) + b"\r\n"
        for ds in (bad, good)
    ) + f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"garbage" + \
        f"\r\n--{boundary}--\r\n".encode()
    r = requests.post(f"{base}/dicom-web/studies", data=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 202
    document = r.json()
    failed = document["00081198"]["Value"]
    assert [item["00081197"]["Value"][0] for item in failed] == [0xA900, 0xC000]
    assert len(document["00081199"]["Value"]) == 1
    # all failed: 409
    r = requests.post(f"{base}/dicom-web/studies", data=body.replace(encode(good), b"junk"), timeout=30,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 409
    assert requests.post(f"{base}/dicom-web/studies", data=b"x", timeout=10,
                         headers={"Content-Type": "application/dicom"}).status_code == 415
    health = requests.get(f"{base}/health", timeout=10)
    assert health.status_code == 200
    report = health.json()
    assert report["status"] == "ok" and report["dicom_port"] == service.scp.port
    assert report["receiving_series"] == 2
    assert set(report["jobs"]) >= {"queued", "running", "done", "dead", "failed", "skipped"}
    jobs = requests.get(f"{base}/jobs?state=queued", timeout=10).json()
    assert jobs["jobs"] == []
    assert requests.get(f"{base}/jobs?state=bogus", timeout=10).status_code == 400
    assert requests.get(f"{base}/jobs/999", timeout=10).status_code == 404


def test_multipart_parser():
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\nAB\r\nC\r\n--b\r\n\r\nD\r\n--b--\r\n"
    parts = parse_multipart_related('multipart/related; type="application/dicom"; boundary="b"', body)
    assert parts == [({"content-type": "application/dicom"}, b"AB\r\nC"), ({}, b"D")]
    with pytest.raises(ValueError):
        parse_multipart_related("multipart/related", body)


def test_restart_recovers_unregistered_spool_files(node, tmp_path):
    service = node()
    paths = write_ct_series(tmp_path / "in", slices=2)
    for p in paths:
        ds = pydicom.dcmread(p)
        service.spool.write(p.read_bytes(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    leftover = next(service.spool.iter_files()).with_name(".1.2.3.tmp")
    leftover.write_bytes(b"partial")
    service.engine.recover()
    assert not leftover.exists()
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    assert len(service.store.instances(series_uid)) == 2
    assert json.loads(json.dumps(service.health()))["receiving_series"] == 1


def test_spool_file_is_complete_when_success_is_returned(node, tmp_path):
    service = node()
    ds = make_ct_dataset(0, generate_uid(), generate_uid(), generate_uid())
    outcome = service.intake.accept(encode(ds), "test")
    assert outcome.ok and outcome.path == service.spool.path_for(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert Path(outcome.path).read_bytes() == encode(ds)


@pytest.mark.skipif(not HAVE_STORESCU, reason="DCMTK storescu not installed")
def test_node_demo_loopback(tmp_path, capsys):
    """`lungburden node-demo` (used by `make demo`): phantom -> node -> results in a local folder."""
    from lungburden.dicom_node.commands import main

    write_phantom(tmp_path / "phantom", seed=31)
    assert main(["node-demo", str(tmp_path / "phantom"), "--out", str(tmp_path / "demo"), "--model", "threshold"]) == 0
    printed = capsys.readouterr().out
    assert "sent 24 instances by storescu" in printed and ": done" in printed
    (result,) = (tmp_path / "demo" / "results").rglob("result.json")
    delivered = sorted(p.name for p in result.parent.rglob("*") if p.is_file())
    assert {"result.json", "seg.dcm", "sr.dcm", "report.dcm"} <= set(delivered)
    assert any(name.startswith("sc_") for name in delivered)  # the Secondary Capture images
    assert json.loads(result.read_text())["burden_percent"] > 0


def test_dcmtk_tool_skips_the_python_environment_scripts(tmp_path, monkeypatch):
    """pynetdicom's Python `storescu` in the venv must not shadow DCMTK's (other options)."""
    import os
    import sysconfig

    scripts, system = tmp_path / "venv-bin", tmp_path / "usr-bin"
    for folder in (scripts, system):
        folder.mkdir()
        tool = folder / "storescu"
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(scripts))
    monkeypatch.setenv("PATH", os.pathsep.join([str(scripts), str(system)]))
    assert dcmtk_tool("storescu") == str(system / "storescu")
    monkeypatch.setenv("PATH", str(scripts))
    assert dcmtk_tool("storescu") is None
    other_venv = tmp_path / "other-venv-bin"  # a Python console script of another environment
    other_venv.mkdir()
    (other_venv / "storescu").write_text("#!/opt/venv/bin/python3\nimport sys\n")
    (other_venv / "storescu").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(other_venv), str(system)]))
    assert dcmtk_tool("storescu") == str(system / "storescu")
