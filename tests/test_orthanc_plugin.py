"""The Orthanc Python plugin: configuration, the stdlib-only script, and a real Orthanc running it.

Integration tests start Orthanc (Debian package) from the configuration printed by
``lungburden orthanc-config``, send phantom series with DCMTK ``storescu`` and wait for the SEG +
SR the plugin's worker stores into the source study.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pydicom
import pytest
import requests
from archive_helpers import ArchiveWorker, RedisServer, redis_available
from ct_builders import write_phantom
from node_helpers import sr_numbers, storescu
from orthanc import PYTHON_PLUGIN, OrthancServer, find_plugin, orthanc_available
from pydicom.uid import MRImageStorage, generate_uid

from lungburden.archive.tasks import PASSWORD_ENV, USERNAME_ENV
from lungburden.config.loader import ConfigError
from lungburden.dicom_node.demo import dcmtk_tool
from lungburden.orthanc_plugin.settings import parse_section

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SCRIPT = REPO / "lungburden" / "orthanc_plugin" / "plugin.py"
MODEL = "threshold"
WAIT_S = 120.0

HAVE_ORTHANC_PLUGIN = orthanc_available() and find_plugin(PYTHON_PLUGIN) is not None and dcmtk_tool("storescu")
needs_orthanc = pytest.mark.skipif(not HAVE_ORTHANC_PLUGIN,
                                   reason="needs Debian packages orthanc, orthanc-dicomweb, orthanc-python, dcmtk")


# -- configuration and the plugin script (no Orthanc) --------------------------------------------

def _cli_config(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "lungburden.cli", "orthanc-config", *args], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return json.loads(out)


def test_orthanc_config_command_prints_a_complete_configuration(tmp_path):
    config = _cli_config("--http-port", "18999", "--dicom-port", "14999", "--storage", str(tmp_path / "db"),
                         "--aet", "PACS1")
    assert (config["HttpPort"], config["DicomPort"], config["DicomAet"]) == (18999, 14999, "PACS1")
    assert config["StorageDirectory"] == config["IndexDirectory"] == str(tmp_path / "db")
    assert [Path(p).name for p in config["Plugins"]] == ["libOrthancDicomWeb.so", "libOrthancPython.so"]
    assert Path(config["PythonScript"]) == PLUGIN_SCRIPT
    section = config["LungBurden"]
    assert section["Python"] == sys.executable and section["WorkDir"] == str(tmp_path / "db" / "lungburden")
    settings = parse_section(section, tmp_path / "work", "http://127.0.0.1:18999", orthanc_aet="PACS1")
    assert settings.config.selection.min_slices == 16 and settings.config.node.ae_title == "PACS1"
    assert settings.config.node.retention_hours == 24 and settings.replace_previous
    # the REST API (and the plugin's routes) need credentials: a generated user unless --user
    assert config["AuthenticationEnabled"] is True and config["RemoteAccessAllowed"] is False
    assert list(config["RegisteredUsers"]) == ["lungburden"] and len(config["RegisteredUsers"]["lungburden"]) >= 32


def test_section_errors_name_every_bad_key(tmp_path):
    section = {"Python": 3, "ForwardToModalities": "PACS", "Unknwn": 1, "http": {"port": 1},
               "selection": {"min_slices": "many"}, "node": {"port": 104}}
    with pytest.raises(ConfigError) as err:
        parse_section(section, tmp_path, "http://127.0.0.1:8042")
    text = str(err.value)
    for key in ("LungBurden.Python", "LungBurden.ForwardToModalities", "LungBurden.Unknwn", "LungBurden.http",
                "LungBurden.node.port"):
        assert key in text
    with pytest.raises(ConfigError, match="selection.min_slices"):
        parse_section({"selection": {"min_slices": "many"}}, tmp_path, "http://127.0.0.1:8042")


def test_engine_keys_are_validated(tmp_path):
    """``Engine``, ``Broker``, ``DicomWebUrl``: defaults, and every bad key named at once."""
    local = parse_section({}, tmp_path, "http://127.0.0.1:8042")
    assert (local.engine, local.broker, local.dicomweb_url) == ("local", None, "http://127.0.0.1:8042/dicom-web")
    celery = parse_section({"Engine": "celery", "Broker": "redis://broker:6379/0", "Queue": "ct",
                            "DicomWebUrl": "https://orthanc.example.org/dicom-web/"}, tmp_path, "http://127.0.0.1:8042")
    assert (celery.engine, celery.broker, celery.queue) == ("celery", "redis://broker:6379/0", "ct")
    assert celery.dicomweb_url == "https://orthanc.example.org/dicom-web"
    with pytest.raises(ConfigError, match=r"LungBurden.Broker.*required with Engine celery"):
        parse_section({"Engine": "celery"}, tmp_path, "http://127.0.0.1:8042")
    with pytest.raises(ConfigError, match="LungBurden.Engine.*must be one of local, celery"):
        parse_section({"Engine": "remote"}, tmp_path, "http://127.0.0.1:8042")
    with pytest.raises(ConfigError) as err:
        parse_section({"Engine": "celery", "Broker": "broker:6379", "DicomWebUrl": "orthanc/dicom-web",
                       "destinations": [{"name": "out", "type": "folder", "path": str(tmp_path)}],
                       "processing": {"on_quality_failure": "sr"}}, tmp_path, "http://127.0.0.1:8042")
    text = str(err.value)
    for key in ("LungBurden.Broker", "LungBurden.DicomWebUrl", "LungBurden.destinations",
                "LungBurden.processing.on_quality_failure"):
        assert key in text
    assert "redis://" in text and "does not apply with Engine celery" in text


def test_celery_dispatcher_keeps_the_job_while_the_broker_is_down_and_records_a_failure(tmp_path):
    """The broker refuses: the job goes back to ``queued`` with the reason; sent later, a ``failed``
    outcome fails it with the worker's reason (no Orthanc, no broker: a stand-in Celery app)."""
    from lungburden.archive.tasks import SeriesOutcome
    from lungburden.jobs.queue import JobStore
    from lungburden.orthanc_plugin.celery_engine import CeleryDispatcher

    class App:
        def __init__(self):
            self.sent: list[dict] = []
            self.backend = types.SimpleNamespace(get_task_meta=lambda task_id: {"status": "SUCCESS", "result": (
                SeriesOutcome("1.2.3", "1.2.3.4", "failed", "contains no lungs", worker="gpu1:7").to_json())})

        def send_task(self, name, args, queue):
            if not self.sent:
                self.sent.append({})
                raise ConnectionError("refused")
            self.sent.append(args[0])
            return types.SimpleNamespace(id="task-1")

        def AsyncResult(self, task_id):  # noqa: N802 - Celery's name
            return types.SimpleNamespace(forget=lambda: None)

    config = parse_section({"Engine": "celery", "Broker": "redis://:secret@broker:6379/0",
                            "processing": {"model": MODEL}}, tmp_path / "work", "http://127.0.0.1:8042").config
    store = JobStore.for_storage(config.storage_dir)
    job, _ = store.add_job("1.2.3", "1.2.3.4", [], ["1.2.3.4.5"], MODEL)
    app = App()
    dispatcher = CeleryDispatcher(config, store, "redis://:secret@broker:6379/0", "http://orthanc:8042/dicom-web",
                                  destinations=lambda: ["orthanc:store"], result_dir=lambda j: tmp_path / "r",
                                  app=app)
    assert dispatcher.send_queued() == 0
    waiting = store.job(job.id)
    assert waiting.state == "queued" and "Celery broker redis://broker:6379/0 unreachable" in waiting.reason
    assert "secret" not in waiting.reason and dispatcher.send_queued() == 0  # backing off
    dispatcher.retry_at = 0.0
    assert dispatcher.send_queued() == 1
    task = app.sent[-1]
    assert (task["url"], task["series_instance_uid"], task["model"], task["store"]) == (
        "http://orthanc:8042/dicom-web", "1.2.3.4", MODEL, True)
    assert store.job(job.id).state == "running" and store.job(job.id).reason.startswith("enqueued as Celery task")
    assert dispatcher.collect() == 1
    failed = store.job(job.id)
    assert failed.state == "failed" and failed.reason == "contains no lungs (Celery worker gpu1:7)"


def test_weights_key_selects_the_network_weights(tmp_path):
    """``"Weights"`` is the plugin's spelling of the node's ``processing.weights``."""
    from lungburden.segmentation.convlstm import DEFAULT_WEIGHTS

    settings = parse_section({"Weights": str(DEFAULT_WEIGHTS)}, tmp_path / "work", "http://127.0.0.1:8042")
    assert settings.config.processing.weights == DEFAULT_WEIGHTS
    with pytest.raises(ConfigError, match="processing.weights"):
        parse_section({"Weights": str(tmp_path / "missing.pt")}, tmp_path / "work", "http://127.0.0.1:8042")


def test_plugin_script_imports_the_standard_library_only():
    tree = ast.parse(PLUGIN_SCRIPT.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    assert modules - set(sys.stdlib_module_names) - {"__future__"} == {"orthanc"}
    for path in PLUGIN_SCRIPT.parent.glob("*.py"):  # Orthanc puts this folder on sys.path
        assert path.stem not in sys.stdlib_module_names


def _fake_orthanc() -> types.ModuleType:
    fake = types.ModuleType("orthanc")
    fake.LUNGBURDEN_NO_AUTOLOAD = True
    fake.ChangeType = types.SimpleNamespace(STABLE_SERIES=1, ORTHANC_STOPPED=2)
    fake.LogInfo = fake.LogWarning = fake.LogError = lambda message: None
    return fake


def _load_plugin_script(monkeypatch) -> types.ModuleType:
    """plugin.py as Orthanc's Python loads it, with a fake ``orthanc`` module (nothing registered)."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "orthanc", _fake_orthanc())
    spec = importlib.util.spec_from_file_location("lungburden_plugin_under_test", PLUGIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugin_script_and_worker_agree(monkeypatch):
    """What plugin.py cannot import from lungburden it repeats: the two sides must say the same."""
    from lungburden import exit_codes
    from lungburden.jobs import queue as jobs
    from lungburden.orthanc_plugin import settings, worker

    script = _load_plugin_script(monkeypatch)
    assert script.EXIT_CONFIG == exit_codes.EXIT_CONFIG
    assert script.WORKER_MODULE == worker.__name__
    assert script.INBOX == worker.INBOX
    assert script.SETTINGS_FILE == settings.SETTINGS_FILE
    assert script.AUTH_ENV == settings.AUTH_ENV
    assert script.DB_NAME == jobs.DB_NAME


def test_change_callback_only_queues(tmp_path, monkeypatch):
    module = _load_plugin_script(monkeypatch)
    plugin = module.Plugin({"StorageDirectory": str(tmp_path), "LungBurden": {"Python": "/nonexistent"}})
    start = time.perf_counter()
    for i in range(1000):
        plugin.on_change(1, 0, f"series-{i}")
    assert time.perf_counter() - start < 0.5
    assert not plugin.inbox.exists()  # no I/O in the callback: the dispatcher thread writes the inbox
    assert plugin.events.qsize() == 1000
    plugin.inbox.mkdir(parents=True)
    plugin.queue_event(plugin.events.get())
    assert len(list(plugin.inbox.glob("*.json"))) == 1
    assert plugin.jobs() == [] and plugin.status()["inbox"] == 1


class FakeOrthanc:
    """The REST calls the worker makes, served from files (no Orthanc process)."""

    def __init__(self, files: list[Path]):
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        self.series_uid, self.study_uid = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
        self.files = {f"i{k}": f for k, f in enumerate(files)}
        self.sops = {k: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for k, f in self.files.items()}
        self.stored: dict[str, bytes] = {}
        self.downloads = 0

    def get_json(self, path: str):
        if path == "/series/s1":
            return {"MainDicomTags": {"SeriesInstanceUID": self.series_uid, "Modality": "CT"}, "ParentStudy": "t1"}
        if path == "/studies/t1":
            return {"MainDicomTags": {"StudyInstanceUID": self.study_uid}}
        if path == "/series/s1/instances":
            return [{"ID": k, "MainDicomTags": {"SOPInstanceUID": sop}} for k, sop in self.sops.items()]
        raise AssertionError(path)

    def get_bytes(self, path: str) -> bytes:
        self.downloads += 1
        return self.files[path.split("/")[2]].read_bytes()

    def store_instance(self, data: bytes) -> str:
        oid = "out-" + str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        self.stored[oid] = data
        return oid

    def delete(self, path: str) -> bool:
        return self.stored.pop(path.split("/")[2], None) is not None


def test_worker_without_orthanc_dedupes_purges_and_reruns(tmp_path):
    from lungburden.orthanc_plugin.worker import OrthancWorker

    fake = FakeOrthanc(write_phantom(tmp_path / "ph", seed=14, slices=20, slice_spacing_mm=5.0))
    settings = parse_section({"processing": {"model": MODEL}}, tmp_path / "work", "http://127.0.0.1:1")
    worker = OrthancWorker(settings, client=fake)  # type: ignore[arg-type]

    def event(reason: str) -> None:
        (worker.inbox / f"{time.time_ns()}.json").write_text(
            json.dumps({"orthanc_series_id": "s1", "event_at": time.time(), "reason": reason}))
        assert worker.ingest_inbox() == 1

    def run() -> dict:
        assert worker.engine.runner.run_next()
        while worker.engine.exporter.deliver_one():
            pass
        (job,) = worker.store.jobs()
        assert job.state == "done", job
        return worker.links.get(job.id)

    event("stable")
    first = run()
    extras = worker.links.extra_ids(first["job_id"])  # SC images and PDF report
    assert len(extras) >= 7
    assert set(fake.stored) == {first["seg_orthanc_id"], first["sr_orthanc_id"], *extras} and fake.downloads == 20
    event("stable")  # re-stabilised, unchanged: nothing to do
    assert worker.engine.runner.run_next() is False and fake.downloads == 20 and len(worker.store.jobs()) == 1
    (job,) = worker.store.jobs()
    assert worker.engine.purge(time.time() + 10) == 1
    assert not any(worker.spool.root.rglob("*.dcm")) and not job.result_dir.exists()
    event("rerun")  # reads the series again
    second = run()
    assert fake.downloads == 40 and len(worker.store.jobs()) == 1
    assert set(fake.stored) == {second["seg_orthanc_id"], second["sr_orthanc_id"],  # the earlier ones replaced
                                *worker.links.extra_ids(second["job_id"])}
    assert worker.links.is_output_series(str(pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(fake.stored[second["sr_orthanc_id"]])).SeriesInstanceUID))
    assert worker.links.is_output_series(str(pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(fake.stored[worker.links.extra_ids(second["job_id"])[0]])).SeriesInstanceUID))


# -- a real Orthanc with the plugin ----------------------------------------------------------------

def _series_and_study(path: Path) -> tuple[str, str]:
    """Series and Study Instance UID of a DICOM file."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return str(header.SeriesInstanceUID), str(header.StudyInstanceUID)


class PluginOrthanc:
    """An Orthanc started from ``lungburden orthanc-config``, plus helpers to drive the plugin."""

    def __init__(self, workdir: Path, section_overrides: dict | None = None, extra_config: dict | None = None):
        self.server = OrthancServer(workdir / "orthanc", dicomweb=False)
        config = _cli_config("--http-port", str(self.server.http_port), "--dicom-port", str(self.server.dicom_port),
                             "--storage", str(self.server.workdir / "storage"), "--aet", "ORTHANC",
                             "--stable-age", "1", "--model", MODEL)
        config["Plugins"] = [p for p in config["Plugins"] if Path(p).exists()]
        config["LungBurden"]["logging"]["file"] = str(workdir / "worker.log")
        config["LungBurden"]["export"]["backoff_initial_seconds"] = 0.5
        for key, value in (section_overrides or {}).items():
            config["LungBurden"][key] = value
        self.server.config.update(config)
        self.server.config.update(extra_config or {})
        self.worker_log = workdir / "worker.log"

    def start(self) -> PluginOrthanc:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("auth", self.server.auth)
        return requests.request(method, self.server.url + path, timeout=30, **kwargs)

    def status(self) -> dict:
        return self.api("GET", "/lungburden/status").json()

    def jobs(self, series_uid: str | None = None) -> list[dict]:
        jobs = self.api("GET", "/lungburden/jobs").json()["jobs"]
        return [j for j in jobs if series_uid is None or j["series_instance_uid"] == series_uid]

    def healthy(self) -> bool:
        return self.server.running and self.api("GET", "/system").ok

    def send(self, files: list[Path]) -> None:
        storescu(self.server.dicom_port, files, called="ORTHANC").check_returncode()

    def restabilise(self, files: list[Path], orthanc_series_id: str) -> None:
        """Send a series again and queue the STABLE_SERIES event Orthanc gives an unchanged series
        (what the plugin writes); returns once the worker has taken every event."""
        self.send(files)
        inbox = Path(self.status()["work_dir"]) / "inbox"
        (inbox / "0-restabilised.json").write_text(json.dumps(
            {"orthanc_series_id": orthanc_series_id, "event_at": time.time(), "reason": "stable"}))
        deadline = time.monotonic() + 15
        while (self.status()["inbox"] or time.monotonic() < deadline - 12) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)

    def logs(self) -> str:
        worker = self.worker_log.read_text(errors="replace") if self.worker_log.exists() else ""
        return f"--- Orthanc log ---\n{self.server.log_text()[-4000:]}\n--- worker log ---\n{worker[-4000:]}"

    def wait_job(self, series_uid: str, states: tuple[str, ...] = ("done",), after_id: int = 0,
                 timeout: float = WAIT_S, min_finished_at: float = 0.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for job in self.jobs(series_uid):
                if (job["id"] > after_id and job["state"] in states
                        and (job["finished_at"] or job["created_at"]) >= min_finished_at):
                    return job
            time.sleep(0.2)
        raise AssertionError(f"no job in {states} for series {series_uid} after {timeout} s: "
                             f"{self.jobs(series_uid)}\n{self.logs()}")

    def study_outputs(self, study_uid: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"SEG": [], "SR": [], "OT": [], "DOC": []}
        for series in self.server.series_in_study(study_uid):
            modality = series["MainDicomTags"].get("Modality")
            if modality in out:
                out[modality] += series["Instances"]
        return out


def _rewrite(files: list[Path], out_dir: Path, **changes) -> list[Path]:
    """Copies of a series in a new study (new study, frame of reference, series and SOP UIDs) with changes."""
    out_dir.mkdir(parents=True)
    study_uid, frame_uid, series_uid = generate_uid(), generate_uid(), generate_uid()
    written = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesInstanceUID = study_uid, frame_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for key, value in changes.items():
            setattr(ds, key, value)
        if "SOPClassUID" in changes:
            ds.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
        written.append(out_dir / f.name)
        ds.save_as(written[-1], enforce_file_format=True)
    return written


@pytest.fixture(scope="module")
def plugin_orthanc(tmp_path_factory):
    if not HAVE_ORTHANC_PLUGIN:
        pytest.skip("needs Debian packages orthanc, orthanc-dicomweb, orthanc-python, dcmtk")
    workdir = tmp_path_factory.mktemp("plugin-orthanc")
    pacs = OrthancServer(workdir / "pacs", aet="PACS").start()  # the forwarding target
    orthanc = PluginOrthanc(
        workdir,
        section_overrides={"ForwardToModalities": ["pacs"], "ForwardToDicomWebServers": ["web"],
                           "destinations": [{"name": "archive", "type": "folder", "path": str(workdir / "archive")}]},
        extra_config={"DicomModalities": {"pacs": ["PACS", "127.0.0.1", pacs.dicom_port]},
                      "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"web": [pacs.dicomweb_url]}}},
    ).start()
    orthanc.pacs, orthanc.archive = pacs, workdir / "archive"
    deadline = time.monotonic() + 30
    while not orthanc.status()["worker"]["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    yield orthanc
    orthanc.stop()
    pacs.stop()


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory) -> list[Path]:
    return write_phantom(tmp_path_factory.mktemp("phantom") / "series", seed=11, slices=32, slice_spacing_mm=5.0)


@needs_orthanc
@pytest.mark.integration
def test_stable_series_gets_seg_and_sr_equal_to_analyze(plugin_orthanc, phantom_series, tmp_path):
    series_uid, study_uid = _series_and_study(phantom_series[0])
    plugin_orthanc.send(phantom_series)
    job = plugin_orthanc.wait_job(series_uid)
    assert job["orthanc"]["stable_to_stored_seconds"] is not None
    assert job["orthanc"]["stable_to_stored_seconds"] < WAIT_S
    outputs = plugin_orthanc.study_outputs(study_uid)
    assert len(outputs["SEG"]) == 1 and len(outputs["SR"]) == 1, outputs
    assert {outputs["SEG"][0], outputs["SR"][0]} == {job["orthanc"]["seg"], job["orthanc"]["sr"]}
    assert 6 <= len(outputs["OT"]) <= 12 and len(outputs["DOC"]) == 1
    # forwarded by Orthanc (C-STORE, STOW-RS) and by the node's folder exporter
    assert sorted(d["destination"] for d in job["deliveries"]) == [
        "archive", "orthanc:dicomweb:web", "orthanc:modality:pacs", "orthanc:store"]
    assert all(d["state"] == "done" for d in job["deliveries"]), job["deliveries"]
    pacs_series = plugin_orthanc.pacs.series_in_study(study_uid)
    assert sorted(s["MainDicomTags"]["Modality"] for s in pacs_series) == ["DOC", "OT", "SEG", "SR"]
    archived = sorted(p.name for p in plugin_orthanc.archive.rglob("*.dcm"))
    assert archived == sorted(["seg.dcm", "sr.dcm", "report.dcm", *(f"sc_{n:02d}.dcm" for n in range(
        1, len(outputs["OT"]) + 1))])

    from lungburden.cli import main as cli_main

    assert cli_main(["analyze", str(phantom_series[0].parent), "--out", str(tmp_path / "cli"), "--model", MODEL]) == 0
    expected = json.loads((tmp_path / "cli" / "result.json").read_text())
    stored_sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        plugin_orthanc.server.instance_file(job["orthanc"]["sr"])))
    cli_sr = pydicom.dcmread(tmp_path / "cli" / "sr.dcm")
    numbers = sr_numbers(stored_sr)
    assert numbers and numbers == sr_numbers(cli_sr)
    assert job["result"]["burden_percent"] == pytest.approx(expected["burden_percent"])
    assert job["result"]["lung_volume_ml"] == pytest.approx(expected["lung_volume_ml"])
    assert str(stored_sr.StudyInstanceUID) == study_uid

    # GET /lungburden/jobs/{id} and errors of the REST routes
    assert plugin_orthanc.api("GET", f"/lungburden/jobs/{job['id']}").json()["id"] == job["id"]
    assert plugin_orthanc.api("GET", "/lungburden/jobs/99999").status_code == 404
    assert plugin_orthanc.api("POST", "/lungburden/series/not-an-id/rerun").status_code == 400
    assert plugin_orthanc.api("POST", "/lungburden/series/not-an-id/rerun", auth=None).status_code == 401
    assert plugin_orthanc.api("POST", f"/lungburden/series/{'0' * 8}{'-00000000' * 4}/rerun").status_code == 404


@needs_orthanc
@pytest.mark.integration
def test_resent_or_restabilised_series_makes_no_duplicates(plugin_orthanc, phantom_series):
    series_uid, study_uid = _series_and_study(phantom_series[0])
    job = plugin_orthanc.wait_job(series_uid)
    plugin_orthanc.restabilise(phantom_series, job["orthanc"]["series"])  # re-sent: same instances
    assert [j["id"] for j in plugin_orthanc.jobs(series_uid)] == [job["id"]]
    outputs = plugin_orthanc.study_outputs(study_uid)
    assert len(outputs["SEG"]) == 1 and len(outputs["SR"]) == 1, outputs


@needs_orthanc
@pytest.mark.integration
def test_rerun_replaces_the_results(plugin_orthanc, phantom_series):
    series_uid, study_uid = _series_and_study(phantom_series[0])
    before = plugin_orthanc.wait_job(series_uid)
    requested = time.time()
    answer = plugin_orthanc.api("POST", f"/lungburden/series/{before['orthanc']['series']}/rerun")
    assert answer.ok and answer.json()["queued"]
    after = plugin_orthanc.wait_job(series_uid, min_finished_at=requested)
    assert after["id"] == before["id"] and after["orthanc"]["event_at"] >= requested
    assert after["orthanc"]["stored_at"] >= requested
    outputs = plugin_orthanc.study_outputs(study_uid)
    assert len(outputs["SEG"]) == 1 and len(outputs["SR"]) == 1, outputs
    assert outputs["SR"] == [after["orthanc"]["sr"]]


@needs_orthanc
@pytest.mark.integration
def test_non_ct_and_malformed_series_leave_orthanc_healthy(plugin_orthanc, phantom_series, tmp_path):
    mr = _rewrite(phantom_series[:20], tmp_path / "mr", Modality="MR", SOPClassUID=MRImageStorage)
    gap = _rewrite(phantom_series[:12] + phantom_series[14:], tmp_path / "gap")  # two slices missing
    plugin_orthanc.send(mr)
    plugin_orthanc.send(gap)
    mr_uid = str(pydicom.dcmread(mr[0], stop_before_pixels=True).SeriesInstanceUID)
    gap_uid = str(pydicom.dcmread(gap[0], stop_before_pixels=True).SeriesInstanceUID)
    skipped = plugin_orthanc.wait_job(mr_uid, states=("skipped",))
    assert "modality MR" in skipped["reason"]
    failed = plugin_orthanc.wait_job(gap_uid, states=("failed",))
    assert gap_uid in failed["reason"] and "rejected" in failed["reason"]
    assert plugin_orthanc.healthy()
    assert plugin_orthanc.status()["worker"]["running"]
    for series in (mr, gap):
        study_uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
        assert plugin_orthanc.study_outputs(study_uid) == {"SEG": [], "SR": [], "OT": [], "DOC": []}
    log = plugin_orthanc.server.log_text()
    for uid, job in ((gap_uid, failed), (mr_uid, skipped)):  # the reasons reach Orthanc's log, by UID
        assert f"series {uid} not analysed (job {job['id']} {job['state']}): {job['reason']}" in log
    assert "PHANTOM" not in log and "PHANTOM" not in plugin_orthanc.logs()  # no patient name or ID


@needs_orthanc
@pytest.mark.integration
def test_worker_crash_is_survived_and_the_job_completes_once(plugin_orthanc, tmp_path):
    files = write_phantom(tmp_path / "crash", seed=12, slices=40, slice_spacing_mm=5.0)
    series_uid, study_uid = _series_and_study(files[0])
    restarts = plugin_orthanc.status()["worker"]["restarts"]
    plugin_orthanc.send(files)
    plugin_orthanc.wait_job(series_uid, states=("running",), timeout=60)
    pid = plugin_orthanc.status()["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert plugin_orthanc.healthy()
    job = plugin_orthanc.wait_job(series_uid)
    status = plugin_orthanc.status()
    assert status["worker"]["restarts"] == restarts + 1 and status["worker"]["pid"] != pid
    assert status["worker"]["last_exit"]["returncode"] == -signal.SIGKILL
    assert job["attempts"] == 2
    outputs = plugin_orthanc.study_outputs(study_uid)
    assert len(outputs["SEG"]) == 1 and len(outputs["SR"]) == 1, outputs


@needs_orthanc
@pytest.mark.integration
def test_invalid_configuration_is_reported_and_orthanc_keeps_running(tmp_path, phantom_series):
    orthanc = PluginOrthanc(tmp_path, {"selection": {"min_slices": "many"}}).start()
    try:
        deadline = time.monotonic() + 30
        while not orthanc.status()["worker"]["error"] and time.monotonic() < deadline:
            time.sleep(0.2)
        status = orthanc.status()
        assert "selection.min_slices" in status["worker"]["error"] and not status["worker"]["running"]
        orthanc.send(phantom_series[:4])
        deadline = time.monotonic() + 20
        while not orthanc.status()["inbox"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert orthanc.status()["inbox"] == 1  # the STABLE_SERIES event is kept for a fixed worker
        assert orthanc.healthy()
    finally:
        orthanc.stop()


@needs_orthanc
@pytest.mark.integration
def test_late_instances_make_a_new_version_that_replaces_the_results(plugin_orthanc, tmp_path):
    files = write_phantom(tmp_path / "late", seed=13, slices=24, slice_spacing_mm=5.0)
    series_uid, study_uid = _series_and_study(files[0])
    plugin_orthanc.send(files[:18])
    first = plugin_orthanc.wait_job(series_uid)
    plugin_orthanc.send(files[18:])
    second = plugin_orthanc.wait_job(series_uid, after_id=first["id"])
    assert (first["version"], first["instance_count"]) == (1, 18)
    assert (second["version"], second["instance_count"]) == (2, 24)
    outputs = plugin_orthanc.study_outputs(study_uid)
    assert (outputs["SEG"], outputs["SR"]) == ([second["orthanc"]["seg"]], [second["orthanc"]["sr"]])
    assert 6 <= len(outputs["OT"]) <= 12 and len(outputs["DOC"]) == 1  # SC and PDF of version 1 replaced too


@needs_orthanc
@pytest.mark.integration
@pytest.mark.skipif(not redis_available(), reason="needs redis-server")
def test_celery_engine_hands_the_series_to_an_archive_worker(tmp_path, phantom_series):
    """``"Engine": "celery"``: the broker is down at first (the job waits, queued, with the reason),
    then a ``lungburden worker`` fetches the series by WADO-RS and stores one SEG + SR by STOW-RS;
    the plugin records the outcome, forwards the results and ignores the re-sent series."""
    series_uid, study_uid = _series_and_study(phantom_series[0])
    redis = RedisServer(tmp_path / "redis")  # not started yet
    pacs = OrthancServer(tmp_path / "pacs", aet="PACS", dicomweb=False).start()
    orthanc = PluginOrthanc(tmp_path, {"Engine": "celery", "Broker": redis.url, "ForwardToModalities": ["pacs"]},
                            extra_config={"DicomModalities": {"pacs": ["PACS", "127.0.0.1", pacs.dicom_port]}})
    user, password = orthanc.server.auth
    worker = ArchiveWorker(tmp_path / "workers", redis.url, "w1", env={USERNAME_ENV: user, PASSWORD_ENV: password})
    try:
        orthanc.start()
        assert orthanc.status()["engine"] == "celery"
        orthanc.send(phantom_series)
        deadline = time.monotonic() + 60
        while not any("unreachable" in (j["reason"] or "") for j in orthanc.jobs(series_uid)):
            assert time.monotonic() < deadline, f"{orthanc.jobs(series_uid)}\n{orthanc.logs()}"
            time.sleep(0.2)
        (waiting,) = orthanc.jobs(series_uid)
        assert waiting["state"] == "queued" and f"Celery broker {redis.url} unreachable" in waiting["reason"]
        assert orthanc.healthy()
        redis.start()
        worker.start()
        job = orthanc.wait_job(series_uid)
        task_id = job["result"]["celery_task_id"]
        assert re.search(rf"analyse_series\[{task_id}\] succeeded", worker.log_text()), worker.log_text()[-3000:]
        assert job["result"]["worker"] and job["result"]["burden_percent"] > 0
        outputs = orthanc.study_outputs(study_uid)
        assert len(outputs["SEG"]) == 1 and len(outputs["SR"]) == 1, outputs
        assert {outputs["SEG"][0], outputs["SR"][0]} == {job["orthanc"]["seg"], job["orthanc"]["sr"]}
        assert sorted((d["destination"], d["state"]) for d in job["deliveries"]) == [
            ("orthanc:modality:pacs", "done"), ("orthanc:store", "done")]
        assert {"SEG", "SR"} <= {s["MainDicomTags"]["Modality"] for s in pacs.series_in_study(study_uid)}
        sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.server.instance_file(job["orthanc"]["sr"])))
        assert str(sr.SOPInstanceUID) == job["result"]["sr_sop_instance_uid"] and sr_numbers(sr)

        orthanc.restabilise(phantom_series, job["orthanc"]["series"])  # re-sent, unchanged
        assert [j["id"] for j in orthanc.jobs()] == [job["id"]]  # and no job for the results' own series
        assert orthanc.study_outputs(study_uid) == outputs
        assert worker.log_text().count("analyse_series[") == 2  # received, succeeded: one task
    finally:
        worker.stop()
        orthanc.stop()
        redis.stop()
        pacs.stop()
