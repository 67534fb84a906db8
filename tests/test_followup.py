"""Follow-up: the patient's priors in a real Orthanc (QIDO-RS, WADO-RS, STOW-RS), never another
patient's, the change since the most recent prior in result.json and the SR, and a prior without
a lungburden SR analysed once (its results are stored, so the next run reads them); the same
priors for ``lungburden analyze --priors-from`` on local files and in the results table of
``lungburden batch --priors``.

Three studies of one patient (rising then falling burden) and one of another patient with the
same name, as small phantoms analysed with the fast ``threshold`` model.
"""

from __future__ import annotations

import contextlib
import json
import time

import pydicom
import pytest
from archive_helpers import batch, celery_workers, redis_available, rows
from ct_builders import write_phantom
from orthanc import OrthancServer, orthanc_available
from processes import free_port

from lungburden.archive.tasks import SeriesTask
from lungburden.config import config_from_mapping
from lungburden.followup.priors import PatientKey, PriorFinder, task_priors
from lungburden.followup.trend import FROM_ANALYSIS, FROM_SR, FollowUp, PriorResult, compare
from lungburden.quantify import quantify
from lungburden.results.sr_followup import CHANGE_TRACKING_ID, PRIOR_TRACKING_PREFIX
from lungburden.results.validate import run_dciodvfy

NAME = "DOE^JANE"
#: (key, seed, Patient ID, Study Date, burden %): A is the patient, B another one of the same name.
STUDIES = (
    ("a1", 31, "PAT-A", "20240105", 5.0),
    ("b1", 32, "PAT-B", "20240110", 45.0),
    ("a2", 33, "PAT-A", "20240112", 35.0),
    ("a3", 34, "PAT-A", "20240120", 15.0),
)


def _key(pid: str, issuer: str = "", birth: str = "") -> PatientKey:
    return PatientKey(pid, issuer, birth)


def test_patient_matching_rules():
    current = _key("PAT-A", "HOSP", "19600101")
    assert current.mismatch(_key("PAT-A", "HOSP", "19600101")) is None
    assert current.mismatch(_key("PAT-A", "HOSP", "")) is None  # birth date on one side only
    assert current.mismatch(_key("PAT-B", "HOSP")) == "another Patient ID"
    assert current.mismatch(_key("PAT-A", "OTHER")) == "another Issuer of Patient ID"
    assert "ambiguous" in current.mismatch(_key("PAT-A", ""))
    assert "ambiguous" in _key("PAT-A").mismatch(_key("PAT-A", "HOSP"))
    assert "ambiguous" in current.mismatch(_key("PAT-A", "HOSP", "19700101"))
    assert "no Patient ID" in _key("").problem()
    assert "wildcard" in _key("PAT*").problem()
    assert _key("PAT-A").problem() is None


def test_followup_source_configuration(tmp_path, capsys):
    """One source of priors: a DICOMweb URL or a DICOM peer, each checked; the ``analyze`` option
    takes either form and names itself in the error."""
    from lungburden.cli import main
    from lungburden.config import ConfigError

    peer = {"name": "pacs", "host": "pacs.example", "port": 104, "ae_title": "PACS"}
    config = config_from_mapping({"followup": {"enabled": True, "dimse": peer}})
    assert config.followup.dimse.ae_title == "PACS" and config.followup.url is None
    for followup, key in (({"enabled": True}, "followup.url"),
                          ({"url": "http://pacs/dicom-web", "dimse": peer}, "followup.dimse"),
                          ({"dimse": {**peer, "port": 0}}, "followup.dimse.port"),
                          ({"dimse": {**peer, "ae_title": "A\\B"}}, "followup.dimse.ae_title")):
        with pytest.raises(ConfigError) as exc:
            config_from_mapping({"followup": followup})
        assert key in [problem[0] for problem in exc.value.problems], exc.value.problems
    write_phantom(tmp_path / "ct", seed=36, slices=20, size=128, burden_percent=5.0)
    assert main(["analyze", str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--model", "threshold",
                 "--priors-from", "dicom://@pacs"]) == 2
    assert "error: --priors-from must be" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--model", "threshold",
                 "--priors-from", "http://pacs/dicom-web", "--priors-move-to", "LBPRIORS:11113"]) == 2
    assert "error: --priors-move-to needs a DIMSE source of priors" in capsys.readouterr().err


def test_change_and_trend():
    labels_free = PriorResult("1.2", "1.2.1", "20240101", 10, 5000.0, 400.0, 100.0, 500.0, 10.0, 8.0, 2.0, FROM_SR)
    import numpy as np

    labels = np.zeros((6, 8, 8), np.uint8)
    labels[:, 1:7, 1:7] = 1
    labels[:3, 1:4, 1:7] = 2
    current = quantify(labels, np.zeros(labels.shape, np.float32), np.eye(4))
    change = compare(current, labels_free)
    assert change.burden_points == pytest.approx(current.burden_percent - 10.0, abs=1e-3)
    assert change.ggo_volume_ml == pytest.approx(current.ggo_volume_ml - 400.0, abs=1e-3)
    assert change.days == 10 and change.direction == "increased"
    follow = FollowUp("20240111", (labels_free,))
    assert follow.trend(current) == [(-10, 10.0), (0, current.burden_percent)]
    doc = follow.to_dict(current)
    assert doc["priors"][0]["study_instance_uid"] == "1.2" and doc["change_since_prior"]["days"] == 10
    assert FollowUp("20240111", note="none").to_dict(current) == {"priors": [], "change_since_prior": None,
                                                                  "priors_note": "none"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding the four studies; A1 already has a lungburden SR (analysed by the node)."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    root = tmp_path_factory.mktemp("followup")
    studies = {}
    for key, seed, pid, date, burden in STUDIES:
        files = write_phantom(root / key, seed=seed, slices=20, size=192, burden_percent=burden,
                              identity={"PatientID": pid, "PatientName": NAME, "StudyDate": date})
        for path in files:
            server.upload(path)
        studies[key] = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    yield server, studies, root
    server.stop()


def _config(server: OrthancServer, storage, followup: bool = True):
    return config_from_mapping({
        "node": {"storage_dir": str(storage)},
        "selection": {"min_slices": 16},
        "processing": {"model": "threshold", "outputs": ["seg", "sr", "sc", "pdf"]},
        "export": {"max_attempts": 3, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        "destinations": [{"name": "pacs", "type": "dicomweb", "url": server.dicomweb_url}],
        "followup": {"enabled": followup, "url": server.dicomweb_url, "lookback_days": 60, "max_priors": 3},
    })


def _pull(config, server: OrthancServer, study_uid: str) -> dict:
    """``lungburden pull`` in this process: WADO-RS, the node's job engine, STOW-RS back."""
    from lungburden.dicom_node.pull import process_jobs, retrieve
    from lungburden.jobs.engine import JobEngine

    engine = JobEngine(config, analysis="none")
    report = retrieve(engine, server.dicomweb_url, study_uid)
    (job,) = process_jobs(engine, [j.id for j in report.jobs], timeout=120)
    assert job.state == "done", job.reason
    return json.loads((engine.runner.result_dir(job) / "result.json").read_text())


def _srs(server: OrthancServer, study_uid: str) -> list[str]:
    return [i for s in server.series_in_study(study_uid) for i in s["Instances"]
            if server.get(f"/instances/{i}/simplified-tags").get("Modality") == "SR"]


@pytest.mark.integration
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed")
def test_priors_from_pacs(pacs, tmp_path):
    server, studies, root = pacs
    a1 = _pull(_config(server, tmp_path / "node-a1", followup=False), server, studies["a1"])
    assert "priors" not in a1 and len(_srs(server, studies["a1"])) == 1
    assert _srs(server, studies["a2"]) == []  # A2: no lungburden SR yet

    start = time.perf_counter()
    result = _pull(_config(server, tmp_path / "node"), server, studies["a3"])
    first_run = time.perf_counter() - start
    priors = result["priors"]
    # The patient's two earlier studies, most recent first; B (same name, other ID) is never used.
    assert [p["study_instance_uid"] for p in priors] == [studies["a2"], studies["a1"]]
    assert studies["b1"] not in json.dumps(result)
    assert [p["days_before"] for p in priors] == [8, 15]
    assert [p["source"] for p in priors] == [FROM_ANALYSIS, FROM_SR]
    # A1's numbers are those of its own analysis, read back from its SR.
    for name in ("burden_percent", "lung_volume_ml", "ggo_volume_ml", "high_opacity_volume_ml"):
        assert priors[1][name] == pytest.approx(a1[name], abs=1e-3), name
    change = result["change_since_prior"]
    assert change["prior_study_instance_uid"] == studies["a2"] and change["days"] == 8
    assert change["burden_points"] == pytest.approx(result["burden_percent"] - priors[0]["burden_percent"], abs=1e-3)
    assert change["ggo_volume_ml"] == pytest.approx(result["ggo_volume_ml"] - priors[0]["ggo_volume_ml"], abs=1e-3)
    assert change["direction"] == "decreased"  # 35 % -> 15 % phantom burden
    assert priors[0]["burden_percent"] > priors[1]["burden_percent"]  # 5 % -> 35 %: rising first
    # A2 was analysed once and its results stored: it now has exactly one lungburden SR.
    assert len(_srs(server, studies["a2"])) == 1
    assert _srs(server, studies["b1"]) == []

    # The SR carries the comparison: the prior studies referenced, their values, the change.
    sr_file = next((tmp_path / "node" / "results").glob("job-*/sr.dcm"))
    sr = pydicom.dcmread(sr_file)
    assert run_dciodvfy(sr_file).errors == []
    groups = [g for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010"
              for g in c.ContentSequence]

    def items(group):
        return {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence}

    by_tracking = {str(items(g)["112039"].TextValue): items(g) for g in groups  # the groups with numbers
                   if any(i.ValueType == "NUM" for i in g.ContentSequence)}
    prior_group = by_tracking[PRIOR_TRACKING_PREFIX + "2024-01-12"]
    assert prior_group["121018"].UID == studies["a2"]  # Procedure Study Instance UID
    assert float(prior_group["113288"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        priors[0]["burden_percent"])
    change_group = by_tracking[CHANGE_TRACKING_ID]
    assert change_group["121018"].UID == studies["a2"]
    assert float(change_group["CHG-BURDEN"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        change["burden_points"])
    assert float(change_group["385673002"].MeasuredValueSequence[0].NumericValue) == 8

    # The next run reads both priors from their SRs: nothing is analysed again.
    config = _config(server, tmp_path / "again")
    finder = PriorFinder(config.followup, config.selection, "threshold")
    from lungburden.dicom_io.volume import load_files
    from lungburden.segmentation.registry import get_segmenter

    volume = load_files(sorted((root / "a3").glob("CT*.dcm")))
    start = time.perf_counter()
    again = finder(volume, get_segmenter("threshold").info)
    second_run = time.perf_counter() - start
    assert [p.source for p in again.priors] == [FROM_SR, FROM_SR]
    assert finder.last.analysed == 0 and len(_srs(server, studies["a2"])) == 1
    assert again.priors[0].burden_percent == pytest.approx(priors[0]["burden_percent"], abs=1e-3)
    print(f"\npriors: first run {first_run:.1f} s (A2 analysed {result['timings_s'].get('priors', 0):.1f} s), "
          f"priors from SRs {second_run:.2f} s; per prior {finder.last.seconds}")


@pytest.mark.integration
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed")
def test_missing_patient_id_refuses_with_a_reason(pacs, tmp_path):
    server = pacs[0]
    files = write_phantom(tmp_path / "anon", seed=35, slices=20, size=192, burden_percent=5.0,
                          identity={"PatientID": "", "PatientName": NAME, "StudyDate": "20240125"})
    from lungburden.dicom_io.volume import load_files
    from lungburden.segmentation.registry import get_segmenter

    config = _config(server, tmp_path / "node")
    follow = PriorFinder(config.followup, config.selection, "threshold")(load_files(files),
                                                                         get_segmenter("threshold").info)
    assert follow.priors == () and "no Patient ID" in follow.note


def test_series_task_carries_the_priors_through_json():
    """A Celery worker gets the priors settings in the task's JSON (credentials stay out of it)."""
    task = SeriesTask("http://pacs:8042/dicom-web", "1.2.3", "1.2.3.4", "threshold", min_slices=20,
                      priors_url="http://priors:8042/dicom-web", lookback_days=30, max_priors=2, store_priors=False)
    sent = json.dumps(task.to_json())
    assert SeriesTask.from_json(json.loads(sent)) == task
    finder = task_priors(SeriesTask.from_json(json.loads(sent)), "user", "secret")
    assert "secret" not in sent and finder.config.password == "secret"
    assert (finder.config.url, finder.config.lookback_days, finder.config.max_priors, finder.config.store_results) == (
        "http://priors:8042/dicom-web", 30, 2, False)
    assert (finder.model, finder.selection.min_slices, finder.config.timeout_seconds) == ("threshold", 20, 120.0)
    assert task_priors(SeriesTask("http://pacs:8042/dicom-web", "1.2.3", "1.2.3.4")) is None


def _walk(ds):
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _analyze(folder, out, *extra: str) -> dict:
    """``lungburden analyze`` (in this process) with the ``threshold`` model; its result.json."""
    from lungburden.cli import main

    assert main(["analyze", str(folder), "--out", str(out), "--model", "threshold", *extra]) == 0
    return json.loads((out / "result.json").read_text())


@pytest.mark.integration
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed")
def test_analyze_with_priors_from_pacs(pacs, tmp_path, capsys):
    """Local files analysed, priors from the PACS: the patient's two earlier studies with their
    own numbers and the change; the other patient of the same name has none and is never used."""
    server, studies, root = pacs
    instances = len(server.get("/instances"))
    reference = {key: _analyze(root / key, tmp_path / f"plain-{key}") for key in ("a1", "a2")}
    source = ("--priors-from", server.dicomweb_url, "--no-store-priors")
    result = _analyze(root / "a3", tmp_path / "a3", *source, "--lookback-days", "60")
    priors = result["priors"]
    assert [p["study_instance_uid"] for p in priors] == [studies["a2"], studies["a1"]]
    assert [(p["study_date"], p["days_before"]) for p in priors] == [("20240112", 8), ("20240105", 15)]
    for prior, key in zip(priors, ("a2", "a1"), strict=True):
        for name in ("burden_percent", "lung_volume_ml", "ggo_volume_ml", "high_opacity_volume_ml"):
            assert prior[name] == pytest.approx(reference[key][name], abs=1e-3), (key, name)
    change = result["change_since_prior"]
    assert change["prior_study_instance_uid"] == studies["a2"] and change["days"] == 8
    assert change["burden_points"] == pytest.approx(result["burden_percent"] - reference["a2"]["burden_percent"],
                                                    abs=1e-3)
    assert change["direction"] == "decreased" and "priors_skipped" not in result and "priors_note" not in result
    assert studies["b1"] not in json.dumps(result)
    assert "Priors            2, the most recent of 20240112 (8 days before" in capsys.readouterr().out
    texts = {str(i.TextValue) for i in _walk(pydicom.dcmread(tmp_path / "a3" / "sr.dcm")) if "TextValue" in i}
    assert CHANGE_TRACKING_ID in texts and PRIOR_TRACKING_PREFIX + "2024-01-12" in texts  # as from the node

    # The look-back and the number of priors are the options': only A2 is 10 days back at most.
    near = _analyze(root / "a3", tmp_path / "near", *source, "--lookback-days", "10", "--max-priors", "3")
    assert [p["study_instance_uid"] for p in near["priors"]] == [studies["a2"]]
    # Another patient of the same name: no prior (A's studies are never used).
    other = _analyze(root / "b1", tmp_path / "b1", *source)
    assert other["priors"] == [] and other["change_since_prior"] is None and other["priors_note"]
    assert not any(studies[k] in json.dumps(other) for k in ("a1", "a2", "a3"))
    assert len(server.get("/instances")) == instances  # --no-store-priors: nothing stored


@contextlib.contextmanager
def engine_options(engine: str, workdir):
    """``batch`` options of an engine: a local pool of two, or a real Redis and two Celery workers."""
    if engine == "local":
        yield ("--engine", "local", "--workers", "2")
        return
    if not redis_available():
        pytest.skip("redis-server not installed (make test installs it)")
    with celery_workers(workdir) as (redis, _workers):
        yield ("--engine", "celery", "--broker", redis.url)


@pytest.mark.integration
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed")
@pytest.mark.parametrize("engine", ["local", "celery"])
def test_batch_with_priors_writes_the_prior_columns(pacs, tmp_path, engine):
    """``batch --priors`` (two workers of either engine, four series at once): each row names the
    patient's most recent prior and the change since it, computed from the rows of those studies;
    the Celery workers search and read the priors themselves."""
    server, studies, _ = pacs
    instances = len(server.get("/instances"))
    table = tmp_path / "results.csv"
    with engine_options(engine, tmp_path) as options:
        code, summary, log = batch(server, table, "--priors", "--no-store", *options, "--max-in-flight", "4")
    assert code == 0 and summary["done"] == 4, log
    by_study = {r["study_instance_uid"]: r for r in rows(table).values()}
    a1, a2, a3, b1 = (by_study[studies[k]] for k in ("a1", "a2", "a3", "b1"))
    for row in (a1, b1):
        assert row["prior_count"] == "0" and row["prior_study_instance_uid"] == "" and row["priors_note"]
    for row, prior, date, count in ((a2, a1, "20240105", "1"), (a3, a2, "20240112", "2")):
        assert (row["prior_count"], row["prior_study_instance_uid"], row["prior_study_date"]) == (
            count, prior["study_instance_uid"], date)
        assert float(row["change_burden_points"]) == pytest.approx(
            float(row["burden_percent"]) - float(prior["burden_percent"]), abs=1e-3)
    assert float(a3["change_burden_points"]) < 0 < float(a2["change_burden_points"])
    assert studies["b1"] not in (a1["priors_note"] + a2["prior_study_instance_uid"] + a3["prior_study_instance_uid"])
    assert len(server.get("/instances")) == instances  # --no-store: the priors were not stored either


@pytest.fixture(scope="module")
def dimse_pacs(pacs, tmp_path_factory):
    """A second Orthanc with the same four studies and no DICOMweb, answering C-FIND and C-GET
    only to the AE titles it knows (LUNGBURDEN, as a hospital PACS registers a modality)."""
    receiver = free_port()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-dimse"), dicomweb=False, extra_config={
        "DicomModalities": {
            "lungburden": {"AET": "LUNGBURDEN", "Host": "127.0.0.1", "Port": 11112, "AllowFind": True,
                           "AllowGet": True, "AllowMove": True, "AllowStore": True},
            # The C-MOVE destination: lungburden's receiver for priors.
            "lungburden-priors": {"AET": "LBPRIORS", "Host": "127.0.0.1", "Port": receiver}}})
    server.receiver_port = receiver
    server.start()
    root = pacs[2]
    for key, *_ in STUDIES:
        for path in sorted((root / key).glob("CT*.dcm")):
            server.upload(path)
    yield server, pacs[1], root
    server.stop()


@pytest.mark.integration
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed")
def test_priors_by_cfind_and_cget(dimse_pacs, tmp_path):
    """``--priors-from dicom://AET@host:port``: the patient's earlier studies found by C-FIND,
    retrieved by C-GET and analysed with the same numbers as a plain analysis of their files,
    their results stored by C-STORE (one SR per prior), then read back from those SRs by the next
    run; the other patient of the same name is never used; an AE title the PACS does not know
    gets no priors and a reason, and the analysis still completes."""
    server, studies, root = dimse_pacs
    reference = {key: _analyze(root / key, tmp_path / f"plain-{key}") for key in ("a1", "a2")}
    source = ("--priors-from", f"dicom://{server.aet}@127.0.0.1:{server.dicom_port}", "--lookback-days", "60")
    result = _analyze(root / "a3", tmp_path / "a3", *source)
    priors = result["priors"]
    assert [p["study_instance_uid"] for p in priors] == [studies["a2"], studies["a1"]]
    assert [(p["days_before"], p["source"]) for p in priors] == [(8, FROM_ANALYSIS), (15, FROM_ANALYSIS)]
    for prior, key in zip(priors, ("a2", "a1"), strict=True):
        for name in ("burden_percent", "lung_volume_ml", "ggo_volume_ml", "high_opacity_volume_ml"):
            assert prior[name] == pytest.approx(reference[key][name], abs=1e-3), (key, name)
    assert result["change_since_prior"]["prior_study_instance_uid"] == studies["a2"]
    assert studies["b1"] not in json.dumps(result)
    assert [len(_srs(server, studies[k])) for k in ("a1", "a2", "b1")] == [1, 1, 0]

    instances = len(server.get("/instances"))
    again = _analyze(root / "a3", tmp_path / "again", *source)
    assert [p["source"] for p in again["priors"]] == [FROM_SR, FROM_SR]
    for first, second in zip(priors, again["priors"], strict=True):
        assert second["burden_percent"] == pytest.approx(first["burden_percent"], abs=1e-3)
    assert len(server.get("/instances")) == instances  # nothing analysed or stored again

    from lungburden.dicom_io.volume import load_files
    from lungburden.segmentation.registry import get_segmenter

    config = config_from_mapping({"followup": {"enabled": True, "dimse": {
        "name": "pacs", "host": "127.0.0.1", "port": server.dicom_port, "ae_title": server.aet,
        "calling_ae_title": "STRANGER"}}})
    refused = PriorFinder(config.followup, config.selection, "threshold")(
        load_files(sorted((root / "a3").glob("CT*.dcm"))), get_segmenter("threshold").info)
    assert refused.priors == (), refused
    assert "priors not available: DimseError: C-FIND at STUDY level failed" in refused.note, refused.note


@pytest.mark.integration
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed")
def test_priors_by_cmove(dimse_pacs, tmp_path):
    """``followup.move_to``: the same priors retrieved by C-MOVE to lungburden's receiver (a PACS
    without C-GET): analysed with the numbers of a plain analysis and stored, then read from their
    SRs; the receiver takes only the series being retrieved and is stopped after the search."""
    from lungburden.dicom_io.volume import load_files
    from lungburden.segmentation.registry import get_segmenter

    server, studies, root = dimse_pacs
    for key in ("a1", "a2"):  # no lungburden results yet, whichever test ran before
        for series in server.series_in_study(studies[key]):
            if series["MainDicomTags"].get("Modality") != "CT":
                server.delete(f"/series/{series['ID']}")
    config = config_from_mapping({"followup": {
        "enabled": True, "lookback_days": 60,
        "dimse": {"name": "pacs", "host": "127.0.0.1", "port": server.dicom_port, "ae_title": server.aet},
        "move_to": {"ae_title": "LBPRIORS", "port": server.receiver_port, "host": "127.0.0.1"}}})
    finder = PriorFinder(config.followup, config.selection, "threshold")
    volume = load_files(sorted((root / "a3").glob("CT*.dcm")))
    info = get_segmenter("threshold").info
    first = finder(volume, info)
    assert [p.study_instance_uid for p in first.priors] == [studies["a2"], studies["a1"]], first
    assert [p.source for p in first.priors] == [FROM_ANALYSIS, FROM_ANALYSIS] and finder.last.analysed == 2
    for prior, key in zip(first.priors, ("a2", "a1"), strict=True):
        plain = _analyze(root / key, tmp_path / f"plain-{key}")
        assert prior.burden_percent == pytest.approx(plain["burden_percent"], abs=1e-3), key
    assert [len(_srs(server, studies[k])) for k in ("a1", "a2", "b1")] == [1, 1, 0]
    again = finder(volume, info)
    assert [p.source for p in again.priors] == [FROM_SR, FROM_SR] and finder.last.analysed == 0
    # The receiver runs only during a search: nothing listens on its port any more (closed
    # connections may linger in TIME_WAIT, which SO_REUSEADDR allows; a listener would not).
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.receiver_port))


def test_move_receiver_takes_only_the_series_being_retrieved(tmp_path):
    """The C-MOVE receiver refuses a C-STORE that no retrieval waits for (any peer can reach its
    port while a search runs)."""
    from pynetdicom import AE

    from lungburden.config.schema import DimseDestination, MoveReceiver
    from lungburden.followup.dimse import DimseQueryRetrieve

    files = write_phantom(tmp_path / "ct", seed=37, slices=16, size=64, burden_percent=0.0)
    port = free_port()
    scu = DimseQueryRetrieve(DimseDestination("pacs", "127.0.0.1", free_port(), "PACS"), "LUNGBURDEN", 10,
                             MoveReceiver("LBPRIORS", port, "127.0.0.1"))
    scu.start_receiver()
    try:
        ds = pydicom.dcmread(files[0])
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="LBPRIORS")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0xA700
    finally:
        scu.close()
