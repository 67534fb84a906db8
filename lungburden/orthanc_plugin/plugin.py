"""lungburden inside Orthanc: the script that Orthanc's Python plugin loads (``"PythonScript"``).

This file runs in Orthanc's own Python interpreter (Debian's ``orthanc-python`` embeds the
system Python 3.11, not a virtual environment). It therefore uses the standard library only and
never imports lungburden, numpy or torch. It finds the installed package through the
interpreter named by ``LungBurden.Python`` (the virtual environment where lungburden is
installed; ``lungburden orthanc-config`` fills it in), which runs the worker process::

    <Python> -m lungburden.orthanc_plugin.worker --work-dir <WorkDir>

Division of labour (Orthanc plugin rules: never block the change callback, never call the REST
API from it, keep heavy work out of Orthanc's interpreter lock):

- the change callback only puts ``STABLE_SERIES`` events on an in-memory queue;
- a dispatcher thread writes each event as a small JSON file to ``<WorkDir>/inbox``;
- a supervisor thread runs the worker, relays its log lines into Orthanc's log, and restarts it
  with a back-off when it exits (a crash of the worker never affects Orthanc);
- the worker reads the series through Orthanc's REST API, runs the shared pipeline, stores the
  SEG + SR with ``POST /instances`` and forwards them (see ``worker.py``); with
  ``"Engine": "celery"`` it sends each selected series to Celery workers instead, which read it
  by WADO-RS and store the results by STOW-RS (``celery_engine.py``);
- REST routes read the worker's job database (SQLite, read-only) and queue re-runs:
  ``GET /lungburden/status``, ``GET /lungburden/jobs``, ``GET /lungburden/jobs/{id}``,
  ``POST /lungburden/series/{orthanc-series-id}/rerun``. Orthanc authenticates them like the
  rest of its REST API (``AuthenticationEnabled``, on in ``lungburden orthanc-config``).

Configuration: the ``"LungBurden"`` section of Orthanc's configuration (docs/orthanc-plugin.md).
"""

from __future__ import annotations

import json
import os
import queue
import re
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import orthanc  # provided by Orthanc's Python plugin

# Orthanc puts this file's folder on sys.path: no module of this folder may be named like a
# standard-library module (tests/test_orthanc_plugin.py checks it).

#: The configuration section; the worker validates all of it (``settings.py``: the plugin keys and
#: the node's YAML sections selection, processing, export, destinations, logging), this script
#: reads Enabled, Python, PythonPath, WorkDir and OrthancUrl.
SECTION = "LungBurden"
# What this script shares with the worker, which cannot be imported here (test_orthanc_plugin.py
# checks that both sides agree):
#: Exit status of the worker for an invalid configuration (sysexits EX_CONFIG, as the node's
#: commands; ``lungburden.exit_codes``): no restart loop.
EXIT_CONFIG = 78
WORKER_MODULE = "lungburden.orthanc_plugin.worker"
INBOX = "inbox"
SETTINGS_FILE = "plugin-config.json"
DB_NAME = "lungburden.db"
AUTH_ENV = "LUNGBURDEN_ORTHANC_AUTHORIZATION"
_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
_LEVELS = {"DEBUG": orthanc.LogInfo, "INFO": orthanc.LogInfo, "WARNING": orthanc.LogWarning,
           "ERROR": orthanc.LogError, "CRITICAL": orthanc.LogError}


def _log(level: str, message: str) -> None:
    _LEVELS.get(level, orthanc.LogWarning)(f"LungBurden: {message}")


def _find_python(section: dict) -> str:
    """The interpreter that runs the worker: ``Python``, ``$LUNGBURDEN_PYTHON``, the enclosing venv, python3."""
    configured = section.get("Python") or os.environ.get("LUNGBURDEN_PYTHON")
    if configured:
        return str(configured)
    for parent in Path(__file__).resolve().parents:  # installed (not editable) into a venv
        if (parent / "pyvenv.cfg").is_file() and (parent / "bin" / "python").exists():
            return str(parent / "bin" / "python")
    return "python3"


class Plugin:
    """State of the plugin inside Orthanc: event queue, worker supervision, REST handlers."""

    def __init__(self, config: dict):
        self.section: dict = dict(config.get(SECTION) or {})
        self.orthanc_aet = str(config.get("DicomAet", "ORTHANC"))
        self.enabled = bool(self.section.get("Enabled", True))
        storage = Path(str(config.get("StorageDirectory", "OrthancStorage")))
        self.work_dir = Path(str(self.section.get("WorkDir") or storage / "lungburden")).absolute()
        self.inbox = self.work_dir / INBOX
        self.db_path = self.work_dir / DB_NAME
        self.python = _find_python(self.section)
        scheme = "https" if config.get("SslEnabled") else "http"
        self.orthanc_url = str(self.section.get("OrthancUrl") or f"{scheme}://127.0.0.1:{config.get('HttpPort', 8042)}")
        self.dicomweb_root = str((config.get("DicomWeb") or {}).get("Root") or "/dicom-web/")
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.restart_requested = threading.Event()
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit: dict | None = None
        self.config_error: str | None = None
        self.started_at: float | None = None

    # -- start / stop ----------------------------------------------------------------------------
    def start(self) -> None:
        """Create the work folders and start the dispatcher and supervisor threads (non-blocking)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        settings = {
            "orthanc_url": self.orthanc_url,
            "orthanc_pid": os.getpid(),
            "orthanc_aet": self.orthanc_aet,
            "dicomweb_root": self.dicomweb_root,
            "lungburden": self.section,
        }
        path = self.work_dir / SETTINGS_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold destination passwords
        with os.fdopen(fd, "w") as f:
            json.dump(settings, f, indent=2)
        os.replace(tmp, path)
        threading.Thread(target=self._dispatch, name="lungburden-dispatch", daemon=True).start()
        threading.Thread(target=self._supervise, name="lungburden-supervisor", daemon=True).start()
        _log("WARNING", f"enabled; worker {self.python} -m {WORKER_MODULE}, work dir {self.work_dir}")

    def stop(self) -> None:
        """Ask the worker to stop (SIGTERM); returns at once."""
        self.stopping.set()
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()

    # -- events ----------------------------------------------------------------------------------
    def on_change(self, change_type: int, level: int, resource_id: str) -> None:
        """Orthanc's change callback: O(1), no I/O, no REST call."""
        if change_type == orthanc.ChangeType.STABLE_SERIES:
            self.events.put({"orthanc_series_id": resource_id, "event_at": time.time(), "reason": "stable"})
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            self.stop()

    def queue_event(self, event: dict) -> None:
        """Write one event to the inbox (atomic rename; the worker ingests and deletes it)."""
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_text(json.dumps(event))
        os.replace(tmp, self.inbox / name)

    def _dispatch(self) -> None:
        while True:
            event = self.events.get()
            try:
                self.queue_event(event)
            except Exception as exc:  # noqa: BLE001 - never let the thread die
                _log("ERROR", f"cannot queue series {event.get('orthanc_series_id')}: {exc}")

    # -- worker supervision ----------------------------------------------------------------------
    def _worker_env(self) -> dict:
        env = dict(os.environ)
        env[AUTH_ENV] = orthanc.GenerateRestApiAuthorizationToken()
        env["PYTHONUNBUFFERED"] = "1"
        extra = self.section.get("PythonPath") or []
        if isinstance(extra, str):
            extra = [extra]
        if extra:
            env["PYTHONPATH"] = os.pathsep.join([*map(str, extra), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def _supervise(self) -> None:
        delay = 1.0
        while not self.stopping.is_set():
            command = [self.python, "-m", WORKER_MODULE, "--work-dir", str(self.work_dir)]
            started = time.monotonic()
            try:
                proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env=self._worker_env(), cwd=str(self.work_dir),
                                        close_fds=True, start_new_session=True)
            except OSError as exc:
                self.config_error = f"cannot start the worker with {self.python!r}: {exc} (set LungBurden.Python)"
                _log("ERROR", self.config_error)
                self._wait_for_restart()
                continue
            self.process, self.started_at, self.config_error = proc, time.time(), None
            tail: list[str] = []
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                level, _, rest = line.partition(" ")
                if level in _LEVELS:
                    _log(level, f"worker: {rest}")
                else:
                    _log("WARNING", f"worker: {line}")
                tail = (tail + [line])[-5:]
            rc = proc.wait()
            self.last_exit = {"returncode": rc, "at": time.time(), "last_lines": tail}
            if self.stopping.is_set():
                break
            missing = any("No module named" in line for line in tail)
            if rc == EXIT_CONFIG or missing:
                self.config_error = ("invalid configuration: " if rc == EXIT_CONFIG else
                                     f"{self.python} cannot import lungburden (set LungBurden.Python): ")
                self.config_error += " / ".join(tail)
                _log("ERROR", f"worker stopped: {self.config_error}; fix the LungBurden section and restart "
                              "Orthanc (or POST /lungburden/worker/restart)")
                self._wait_for_restart()
                continue
            self.restarts += 1
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 60.0)
            _log("ERROR", f"worker exited with status {rc}; restarting in {delay:.0f} s")
            self.stopping.wait(delay)

    def _wait_for_restart(self) -> None:
        self.process = None
        while not self.stopping.is_set() and not self.restart_requested.wait(1.0):
            pass
        self.restart_requested.clear()

    def restart_worker(self) -> None:
        """Restart the worker (after a configuration error or on request)."""
        self.restart_requested.set()
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()

    # -- job database (read-only) ----------------------------------------------------------------
    def _query(self, sql: str, params: tuple = ()) -> list[dict]:
        if not self.db_path.exists():
            return []
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            con.row_factory = sqlite3.Row
            return [dict(r) for r in con.execute(sql, params).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            con.close()

    def jobs(self, job_id: int | None = None, states: list[str] | None = None, limit: int = 100) -> list[dict]:
        """Jobs, newest first, with their deliveries and Orthanc identifiers (same fields as the node)."""
        sql = ("SELECT j.*, o.orthanc_series_id, o.orthanc_study_id, o.event_at, o.stored_at, o.seg_orthanc_id, "
               "o.sr_orthanc_id FROM jobs j LEFT JOIN orthanc_jobs o ON o.job_id = j.id WHERE 1=1")
        params: list = []
        if job_id is not None:
            sql += " AND j.id = ?"
            params.append(job_id)
        if states:
            sql += f" AND j.state IN ({','.join('?' * len(states))})"
            params += list(states)
        rows = self._query(sql + f" ORDER BY j.id DESC LIMIT {int(limit)}", tuple(params))
        by_job: dict[int, list[dict]] = {}
        if rows:
            ids = [r["id"] for r in rows]
            for d in self._query(
                "SELECT job_id, destination, state, attempts, last_error, delivered_at FROM deliveries "
                f"WHERE job_id IN ({','.join('?' * len(ids))}) ORDER BY destination", tuple(ids)):
                by_job.setdefault(d.pop("job_id"), []).append(d)
        out = []
        for r in rows:
            deliveries = by_job.get(r["id"], [])
            stable_to_stored = (round(r["stored_at"] - r["event_at"], 2)
                                if r.get("stored_at") and r.get("event_at") else None)
            out.append({
                "id": r["id"], "state": r["state"], "reason": r["reason"],
                "study_instance_uid": r["study_instance_uid"], "series_instance_uid": r["series_instance_uid"],
                "version": r["version"], "instance_count": r["instance_count"],
                "instance_set_hash": r["instance_set_hash"], "model": r["model"], "attempts": r["attempts"],
                "created_at": r["created_at"], "started_at": r["started_at"], "finished_at": r["finished_at"],
                "result": json.loads(r["result"]) if r.get("result") else None,
                "deliveries": deliveries,
                "orthanc": {
                    "series": r.get("orthanc_series_id"), "study": r.get("orthanc_study_id"),
                    "seg": r.get("seg_orthanc_id"), "sr": r.get("sr_orthanc_id"),
                    "event_at": r.get("event_at"), "stored_at": r.get("stored_at"),
                    "stable_to_stored_seconds": stable_to_stored,
                },
            })
        return out

    def status(self) -> dict:
        proc = self.process
        counts = {r["state"]: r["n"] for r in self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
        pending = len([p for p in self.inbox.glob("*.json")]) if self.inbox.is_dir() else 0
        return {
            "enabled": self.enabled,
            "engine": str(self.section.get("Engine") or "local"),
            "work_dir": str(self.work_dir),
            "python": self.python,
            "worker": {
                "running": proc is not None and proc.poll() is None,
                "pid": proc.pid if proc is not None and proc.poll() is None else None,
                "started_at": self.started_at,
                "restarts": self.restarts,
                "last_exit": self.last_exit,
                "error": self.config_error,
            },
            "inbox": pending,
            "jobs": counts,
        }


def _answer(output, body: object, status: int = 200) -> None:
    text = json.dumps(body, indent=2)
    if status == 200:
        output.AnswerBuffer(text, "application/json")
    else:  # orthanc-python 4.0: an error status carries no body; the details go to Orthanc's log
        output.SetHttpErrorDetails(str(body.get("error", text)) if isinstance(body, dict) else text, True)
        output.SendHttpStatusCode(status)


def _rest(method: str):
    """Wrap a REST handler of one HTTP method: 405 for the others, JSON errors instead of exceptions
    escaping into Orthanc."""

    def decorate(handler):
        def wrapped(output, uri: str, **request) -> None:
            try:
                if request["method"] != method:
                    output.SendMethodNotAllowed(method)
                    return
                handler(output, uri, **request)
            except Exception as exc:  # noqa: BLE001 - a REST error must not propagate
                _log("ERROR", f"{request.get('method')} {uri} failed: {type(exc).__name__}: {exc}")
                _answer(output, {"error": f"{type(exc).__name__}: {exc}"}, 500)

        return wrapped

    return decorate


@_rest("GET")
def _on_status(output, uri: str, **request) -> None:
    _answer(output, PLUGIN.status() if PLUGIN else {"enabled": False})


@_rest("GET")
def _on_jobs(output, uri: str, **request) -> None:
    assert PLUGIN is not None
    group = (request.get("groups") or [""])[0] or ""
    args = request.get("get") or {}
    if group:
        jobs = PLUGIN.jobs(job_id=int(group.strip("/")))
        if not jobs:
            _answer(output, {"error": f"no job {group.strip('/')}"}, 404)
            return
        _answer(output, jobs[0])
        return
    limit = max(1, min(int(args.get("limit", 100)), 10000))
    states = [s for s in str(args.get("state") or "").split(",") if s]
    _answer(output, {"jobs": PLUGIN.jobs(states=states, limit=limit)})


@_rest("POST")
def _on_rerun(output, uri: str, **request) -> None:
    assert PLUGIN is not None
    series_id = request["groups"][0]
    if not _ORTHANC_ID.match(series_id):
        _answer(output, {"error": f"{series_id!r} is not an Orthanc series identifier"}, 400)
        return
    try:
        orthanc.RestApiGet(f"/series/{series_id}")
    except orthanc.OrthancException:
        _answer(output, {"error": f"no series {series_id} in Orthanc"}, 404)
        return
    PLUGIN.queue_event({"orthanc_series_id": series_id, "event_at": time.time(), "reason": "rerun"})
    _log("WARNING", f"re-run of Orthanc series {series_id} requested")
    _answer(output, {"queued": True, "series": series_id})


@_rest("POST")
def _on_restart(output, uri: str, **request) -> None:
    assert PLUGIN is not None
    PLUGIN.restart_worker()
    _answer(output, {"restarting": True})


def _on_change(change_type: int, level: int, resource_id: str) -> None:
    if PLUGIN is not None:
        PLUGIN.on_change(change_type, level, resource_id)


def _load() -> Plugin | None:
    try:
        plugin = Plugin(json.loads(orthanc.GetConfiguration()))
    except Exception as exc:  # noqa: BLE001 - a bad configuration must not stop Orthanc
        _log("ERROR", f"disabled: cannot read the configuration ({type(exc).__name__}: {exc})")
        return None
    if not plugin.enabled:
        _log("WARNING", "disabled (LungBurden.Enabled is false)")
        return plugin
    try:
        plugin.start()
    except Exception as exc:  # noqa: BLE001
        _log("ERROR", f"disabled: cannot start ({type(exc).__name__}: {exc})")
        return None
    orthanc.RegisterOnChangeCallback(_on_change)
    orthanc.RegisterRestCallback("/lungburden/jobs(/[0-9]+)?", _on_jobs)
    orthanc.RegisterRestCallback("/lungburden/series/([^/]+)/rerun", _on_rerun)
    orthanc.RegisterRestCallback("/lungburden/worker/restart", _on_restart)
    return plugin


PLUGIN: Plugin | None = None
if not getattr(orthanc, "LUNGBURDEN_NO_AUTOLOAD", False):  # set by unit tests that import this file
    PLUGIN = _load()
    orthanc.RegisterRestCallback("/lungburden/status", _on_status)
