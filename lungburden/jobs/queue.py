"""The node's durable state: received instances, series completion, jobs and deliveries (SQLite).

One database file (``<storage_dir>/lungburden.db``, WAL journal by default) is shared by the SCP
threads, the series-completion monitor, the worker processes, the exporter and the CLI
(``lungburden jobs`` / ``retry``). Every state change is one short ``BEGIN IMMEDIATE``
transaction, so claims are atomic across processes and nothing is lost on ``kill -9``.

Job states (docs/node.md, "Queue states")::

    skipped                       selection rules did not match (reason says which); never processed
    queued ──► running ──► exporting ──► done
                 │             └──────► dead     a destination failed max_attempts times (retriable)
                 └──► failed                     the pipeline rejected the series or raised (retriable)
    queued ──► superseded                         newer instances of the series arrived before it started

Delivery states (one row per job and destination): ``pending`` → ``sending`` → ``done`` | ``dead``;
``pending`` or ``dead`` → ``superseded`` when a later version of the series was analysed first.
Table ``rejections`` records which delivered results were retracted at which destination by an
IHE IOCM rejection note (:mod:`lungburden.results.kos`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DB_NAME = "lungburden.db"

#: Job states, in the order ``lungburden jobs`` summarises them.
JOB_STATES = ("queued", "running", "exporting", "done", "failed", "dead", "skipped", "superseded")
TERMINAL_STATES = frozenset({"done", "failed", "dead", "skipped", "superseded"})
DELIVERY_STATES = ("pending", "sending", "done", "dead", "superseded")

#: A job whose worker died this many times is failed instead of re-queued again (poison input).
MAX_WORKER_DEATHS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    path                TEXT NOT NULL,
    received_at         REAL NOT NULL,
    source              TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    state               TEXT NOT NULL,          -- receiving | complete
    first_received      REAL NOT NULL,
    last_received       REAL NOT NULL,
    received_count      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_instance_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    version             INTEGER NOT NULL,
    instance_set_hash   TEXT NOT NULL,
    instance_count      INTEGER NOT NULL,
    model               TEXT NOT NULL,
    state               TEXT NOT NULL,
    reason              TEXT,
    files               TEXT NOT NULL,          -- JSON list of spooled paths
    result_dir          TEXT,
    result              TEXT,                   -- JSON: UIDs and numbers of result.json
    attempts            INTEGER NOT NULL DEFAULT 0,
    owner               TEXT,
    lease_until         REAL,
    last_instance_at    REAL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    supersedes          INTEGER,
    UNIQUE (series_instance_uid, instance_set_hash, model)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id              INTEGER NOT NULL REFERENCES jobs(id),
    destination         TEXT NOT NULL,
    state               TEXT NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL,
    last_error          TEXT,
    owner               TEXT,
    lease_until         REAL,
    updated_at          REAL NOT NULL,
    delivered_at        REAL,
    PRIMARY KEY (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS rejections (
    job_id              INTEGER NOT NULL REFERENCES jobs(id),   -- the job whose results were retracted
    destination         TEXT NOT NULL,
    by_job_id           INTEGER NOT NULL,                       -- the version that superseded them
    note_sop_instance_uid TEXT NOT NULL,
    sent_at             REAL NOT NULL,
    PRIMARY KEY (job_id, destination)
);
"""


def instance_set_hash(sop_instance_uids: Iterable[str]) -> str:
    """SHA-256 of the sorted, de-duplicated SOP Instance UIDs: the identity of a series version."""
    digest = hashlib.sha256()
    for uid in sorted(set(sop_instance_uids)):
        digest.update(uid.encode("ascii", "replace") + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class Delivery:
    job_id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    delivered_at: float | None


@dataclass(frozen=True)
class Job:
    """One version of one series to analyse (a row of ``jobs``)."""

    id: int
    study_instance_uid: str
    series_instance_uid: str
    version: int
    instance_set_hash: str
    instance_count: int
    model: str
    state: str
    reason: str | None
    files: tuple[Path, ...]
    result_dir: Path | None
    result: dict | None
    attempts: int
    owner: str | None
    last_instance_at: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    supersedes: int | None
    deliveries: tuple[Delivery, ...] = field(default=())

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "state": self.state,
            "reason": self.reason,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "version": self.version,
            "supersedes": self.supersedes,
            "instance_count": self.instance_count,
            "instance_set_hash": self.instance_set_hash,
            "model": self.model,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "result": self.result,
            "deliveries": [
                {
                    "destination": d.destination,
                    "state": d.state,
                    "attempts": d.attempts,
                    "next_attempt_at": d.next_attempt_at if d.state == "pending" else None,
                    "last_error": d.last_error,
                    "delivered_at": d.delivered_at,
                }
                for d in self.deliveries
            ],
        }


@dataclass(frozen=True)
class SeriesState:
    series_instance_uid: str
    study_instance_uid: str
    state: str
    first_received: float
    last_received: float
    received_count: int


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    path: Path
    received_at: float


def _owner() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process named by an owner string (``host:pid``) still runs on this host."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != os.uname().nodename:
        return True  # another host: rely on the lease
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    try:  # a killed process stays a zombie until its new parent reaps it
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


class JobStore:
    """Thread-safe access to the node database (one SQLite connection per thread)."""

    def __init__(self, path: Path, journal_mode: str = "WAL"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.journal_mode = journal_mode
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    @classmethod
    def for_storage(cls, storage_dir: Path, journal_mode: str = "WAL") -> JobStore:
        return cls(Path(storage_dir) / DB_NAME, journal_mode)

    # -- connection handling -------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            # Owner-only database (jobs name UIDs and hosts); SQLite gives its -wal/-shm files the
            # same permissions.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA journal_mode={self.journal_mode}")
            wal = self.journal_mode.upper() == "WAL"
            conn.execute("PRAGMA synchronous=NORMAL" if wal else "PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction (write lock taken at once; atomic across processes)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def query(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- instances and series ------------------------------------------------------------------
    def record_instance(
        self,
        sop_instance_uid: str,
        series_instance_uid: str,
        study_instance_uid: str,
        sop_class_uid: str,
        path: Path,
        source: str,
        now: float | None = None,
    ) -> None:
        """Register a spooled instance and (re)open its series for completion."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "INSERT INTO instances VALUES (?,?,?,?,?,?,?) ON CONFLICT(sop_instance_uid) DO UPDATE SET "
                "series_instance_uid=excluded.series_instance_uid, study_instance_uid=excluded.study_instance_uid,"
                " sop_class_uid=excluded.sop_class_uid, path=excluded.path, received_at=excluded.received_at,"
                " source=excluded.source",
                (sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid, str(path), now, source),
            )
            db.execute(
                "INSERT INTO series VALUES (?,?,'receiving',?,?,1) ON CONFLICT(series_instance_uid) DO UPDATE SET "
                "state='receiving', last_received=excluded.last_received, received_count=received_count+1",
                (series_instance_uid, study_instance_uid, now, now),
            )

    def known_paths(self) -> set[str]:
        return {r["path"] for r in self.query("SELECT path FROM instances")}

    def instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        rows = self.query(
            "SELECT * FROM instances WHERE series_instance_uid=? ORDER BY sop_instance_uid", (series_instance_uid,)
        )
        return [
            InstanceRecord(r["sop_instance_uid"], r["series_instance_uid"], r["study_instance_uid"],
                           r["sop_class_uid"], Path(r["path"]), r["received_at"])
            for r in rows
        ]

    def series(self, series_instance_uid: str) -> SeriesState | None:
        rows = self.query("SELECT * FROM series WHERE series_instance_uid=?", (series_instance_uid,))
        return SeriesState(*rows[0]) if rows else None

    def study_series(self, study_instance_uid: str) -> list[SeriesState]:
        rows = self.query("SELECT * FROM series WHERE study_instance_uid=? ORDER BY first_received",
                          (study_instance_uid,))
        return [SeriesState(*r) for r in rows]

    def quiet_series(self, quiet_seconds: float, now: float | None = None) -> list[SeriesState]:
        """Receiving series with no new instance in them or in their study for ``quiet_seconds``."""
        now = time.time() if now is None else now
        rows = self.query(
            "SELECT s.* FROM series s WHERE s.state='receiving' AND s.last_received <= ? AND "
            "(SELECT MAX(t.last_received) FROM series t WHERE t.study_instance_uid=s.study_instance_uid) <= ? "
            "ORDER BY s.first_received",
            (now - quiet_seconds, now - quiet_seconds),
        )
        return [SeriesState(*r) for r in rows]

    def receiving_series(self) -> list[SeriesState]:
        return [SeriesState(*r) for r in self.query("SELECT * FROM series WHERE state='receiving'")]

    def touch_receiving(self, now: float | None = None) -> int:
        """Restart the quiet timer of every receiving series (after a restart: give senders time to retry)."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            return db.execute("UPDATE series SET last_received=? WHERE state='receiving'", (now,)).rowcount

    def mark_series_complete(self, series_instance_uid: str, last_received: float) -> bool:
        """Close a series unless an instance arrived after ``last_received`` (then it stays open)."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE series SET state='complete' WHERE series_instance_uid=? AND last_received<=?",
                (series_instance_uid, last_received),
            )
            return cur.rowcount == 1

    # -- jobs ----------------------------------------------------------------------------------
    def _job(self, row: sqlite3.Row, deliveries: Sequence[Delivery] = ()) -> Job:
        return Job(
            id=row["id"],
            study_instance_uid=row["study_instance_uid"],
            series_instance_uid=row["series_instance_uid"],
            version=row["version"],
            instance_set_hash=row["instance_set_hash"],
            instance_count=row["instance_count"],
            model=row["model"],
            state=row["state"],
            reason=row["reason"],
            files=tuple(Path(p) for p in json.loads(row["files"])),
            result_dir=Path(row["result_dir"]) if row["result_dir"] else None,
            result=json.loads(row["result"]) if row["result"] else None,
            attempts=row["attempts"],
            owner=row["owner"],
            last_instance_at=row["last_instance_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            supersedes=row["supersedes"],
            deliveries=tuple(deliveries),
        )

    def job(self, job_id: int) -> Job | None:
        rows = self.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return self._job(rows[0], self.deliveries(job_id)) if rows else None

    def jobs(self, states: Sequence[str] | None = None, limit: int | None = None,
             series_instance_uid: str | None = None) -> list[Job]:
        sql, params = "SELECT * FROM jobs WHERE 1=1", []
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            params += list(states)
        if series_instance_uid:
            sql += " AND series_instance_uid=?"
            params.append(series_instance_uid)
        sql += " ORDER BY id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = self.query(sql, params)
        by_job: dict[int, list[Delivery]] = {}
        if rows:
            ids = [r["id"] for r in rows]
            for d in self.query(
                f"SELECT * FROM deliveries WHERE job_id IN ({','.join('?' * len(ids))}) ORDER BY destination", ids
            ):
                by_job.setdefault(d["job_id"], []).append(self._delivery(d))
        return [self._job(r, by_job.get(r["id"], ())) for r in rows]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(JOB_STATES, 0)
        for r in self.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            out[r["state"]] = r["n"]
        return out

    def delivery_counts(self) -> dict[str, int]:
        out = dict.fromkeys(DELIVERY_STATES, 0)
        for r in self.query("SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state"):
            out[r["state"]] = r["n"]
        return out

    def find_job(self, series_instance_uid: str, instance_set_hash: str, model: str) -> Job | None:
        """The job of one series version (instance-set hash, see :func:`instance_set_hash`) and model."""
        rows = self.query("SELECT id FROM jobs WHERE series_instance_uid=? AND instance_set_hash=? AND model=?",
                          (series_instance_uid, instance_set_hash, model))
        return self.job(rows[0]["id"]) if rows else None

    def add_job(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        files: Sequence[Path],
        sop_instance_uids: Sequence[str],
        model: str,
        state: str = "queued",
        reason: str | None = None,
        last_instance_at: float | None = None,
    ) -> tuple[Job, bool]:
        """Create the job of a series version; ``(existing job, False)`` if this version already has one.

        A new ``queued`` version supersedes the older versions of the series that have not started.
        """
        digest = instance_set_hash(sop_instance_uids)
        now = time.time()
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE series_instance_uid=? AND instance_set_hash=? AND model=?",
                (series_instance_uid, digest, model),
            ).fetchall()
            if rows:
                existing = rows[0]["id"]
                created = False
            else:
                prev = db.execute(
                    "SELECT id, version FROM jobs WHERE series_instance_uid=? AND model=? "
                    "ORDER BY version DESC LIMIT 1",
                    (series_instance_uid, model),
                ).fetchall()
                version = prev[0]["version"] + 1 if prev else 1
                supersedes = prev[0]["id"] if prev else None
                cur = db.execute(
                    "INSERT INTO jobs (study_instance_uid, series_instance_uid, version, instance_set_hash,"
                    " instance_count, model, state, reason, files, last_instance_at, created_at, updated_at,"
                    " supersedes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (study_instance_uid, series_instance_uid, version, digest, len(set(sop_instance_uids)), model,
                     state, reason, json.dumps([str(p) for p in files]), last_instance_at, now, now, supersedes),
                )
                existing = cur.lastrowid
                created = True
                if state == "queued":
                    db.execute(
                        "UPDATE jobs SET state='superseded', reason=?, updated_at=? WHERE series_instance_uid=? "
                        "AND model=? AND state='queued' AND id<>?",
                        (f"superseded by job {existing} (version {version}: more instances arrived)", now,
                         series_instance_uid, model, existing),
                    )
        job = self.job(existing)
        assert job is not None
        return job, created

    def claim_job(self, owner: str | None = None, lease_seconds: float = 120.0,
                  job_ids: Sequence[int] | None = None) -> Job | None:
        """Atomically take the oldest queued job (optionally among ``job_ids``) for this process."""
        owner = owner or _owner()
        now = time.time()
        with self.transaction() as db:
            sql = "SELECT id FROM jobs WHERE state='queued'"
            params: list = []
            if job_ids is not None:
                if not job_ids:
                    return None
                sql += f" AND id IN ({','.join('?' * len(job_ids))})"
                params += list(job_ids)
            rows = db.execute(sql + " ORDER BY id LIMIT 1", params).fetchall()
            if not rows:
                return None
            job_id = rows[0]["id"]
            db.execute(
                "UPDATE jobs SET state='running', owner=?, lease_until=?, started_at=?, updated_at=?, "
                "attempts=attempts+1, reason=NULL WHERE id=?",
                (owner, now + lease_seconds, now, now, job_id),
            )
        return self.job(job_id)

    def heartbeat(self, job_id: int, lease_seconds: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET lease_until=? WHERE id=? AND state='running'",
                       (time.time() + lease_seconds, job_id))

    def job_succeeded(self, job_id: int, result_dir: Path, result: dict, destinations: Sequence[str],
                      reason: str | None = None) -> Job:
        """Record the outputs and create one pending delivery per destination (state ``exporting``).

        ``reason``: why the outputs hold no measurements (a result refused by the quality checks
        and reported by an SR that says so)."""
        now = time.time()
        with self.transaction() as db:
            state = "exporting" if destinations else "done"
            db.execute(
                "UPDATE jobs SET state=?, reason=?, result_dir=?, result=?, owner=NULL, lease_until=NULL, "
                "finished_at=?, updated_at=? WHERE id=?",
                (state, reason[:2000] if reason else None, str(result_dir), json.dumps(result),
                 now if state == "done" else None, now, job_id),
            )
            for name in destinations:
                db.execute(
                    "INSERT INTO deliveries (job_id, destination, state, attempts, next_attempt_at, updated_at) "
                    "VALUES (?,?,'pending',0,?,?) ON CONFLICT(job_id, destination) DO UPDATE SET state='pending', "
                    "attempts=0, next_attempt_at=excluded.next_attempt_at, last_error=NULL, "
                    "updated_at=excluded.updated_at WHERE state<>'done'",
                    (job_id, name, now, now),
                )
            row = db.execute("SELECT series_instance_uid, model, version FROM jobs WHERE id=?", (job_id,)).fetchone()
            older = [r["id"] for r in db.execute(
                "SELECT DISTINCT j.id FROM jobs j JOIN deliveries d ON d.job_id=j.id WHERE j.series_instance_uid=? "
                "AND j.model=? AND j.version<? AND d.state IN ('pending','dead')",
                (row["series_instance_uid"], row["model"], row["version"]))]
            for old in older:  # never deliver results that a newer version already replaces
                db.execute("UPDATE deliveries SET state='superseded', last_error=?, owner=NULL, updated_at=? "
                           "WHERE job_id=? AND state IN ('pending','dead')",
                           (f"not delivered: superseded by job {job_id} (version {row['version']})", now, old))
                self._settle_job(db, old, now, superseded_by=job_id)
        job = self.job(job_id)
        assert job is not None
        return job

    def job_failed(self, job_id: int, reason: str) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state='failed', reason=?, owner=NULL, lease_until=NULL, finished_at=?, updated_at=? "
                "WHERE id=?",
                (reason[:2000], now, now, job_id),
            )

    def release_job(self, job_id: int, reason: str) -> None:
        """Hand a running job back to the queue without counting the attempt (orderly stop)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state='queued', reason=?, owner=NULL, lease_until=NULL, "
                "attempts=MAX(attempts-1, 0), updated_at=? WHERE id=? AND state='running'",
                (reason, time.time(), job_id),
            )

    def requeue_lost(self, now: float | None = None, check_pids: bool = True) -> list[int]:
        """Re-queue running jobs (and sending deliveries) whose process is gone or whose lease expired.

        A job whose worker died :data:`MAX_WORKER_DEATHS` times is failed instead (poison input).
        """
        now = time.time() if now is None else now
        requeued = []
        with self.transaction() as db:
            for r in db.execute("SELECT id, owner, lease_until, attempts FROM jobs WHERE state='running'").fetchall():
                lost = (r["lease_until"] or 0) < now or (check_pids and not owner_alive(r["owner"]))
                if not lost:
                    continue
                if r["attempts"] >= MAX_WORKER_DEATHS:
                    db.execute(
                        "UPDATE jobs SET state='failed', reason=?, owner=NULL, updated_at=? WHERE id=?",
                        (f"the worker process died {r['attempts']} times while processing this series", now, r["id"]),
                    )
                else:
                    db.execute(
                        "UPDATE jobs SET state='queued', reason='re-queued: worker process lost', owner=NULL, "
                        "lease_until=NULL, updated_at=? WHERE id=?",
                        (now, r["id"]),
                    )
                requeued.append(r["id"])
            for r in db.execute(
                "SELECT job_id, destination, owner, lease_until FROM deliveries WHERE state='sending'"
            ).fetchall():
                if (r["lease_until"] or 0) < now or (check_pids and not owner_alive(r["owner"])):
                    db.execute(
                        "UPDATE deliveries SET state='pending', owner=NULL, next_attempt_at=?, updated_at=? "
                        "WHERE job_id=? AND destination=?",
                        (now, now, r["job_id"], r["destination"]),
                    )
        return requeued

    # -- deliveries ----------------------------------------------------------------------------
    @staticmethod
    def _delivery(r: sqlite3.Row) -> Delivery:
        return Delivery(r["job_id"], r["destination"], r["state"], r["attempts"], r["next_attempt_at"],
                        r["last_error"], r["delivered_at"])

    def deliveries(self, job_id: int) -> list[Delivery]:
        return [self._delivery(r) for r in
                self.query("SELECT * FROM deliveries WHERE job_id=? ORDER BY destination", (job_id,))]

    def claim_delivery(self, owner: str | None = None, lease_seconds: float = 300.0,
                       job_ids: Sequence[int] | None = None, destinations: Sequence[str] | None = None
                       ) -> Delivery | None:
        """Atomically take the most overdue pending delivery."""
        owner = owner or _owner()
        now = time.time()
        with self.transaction() as db:
            sql = "SELECT job_id, destination FROM deliveries WHERE state='pending' AND next_attempt_at<=?"
            params: list = [now]
            if job_ids is not None:
                sql += f" AND job_id IN ({','.join('?' * len(job_ids))})"
                params += list(job_ids)
            if destinations is not None:
                sql += f" AND destination IN ({','.join('?' * len(destinations))})"
                params += list(destinations)
            rows = db.execute(sql + " ORDER BY next_attempt_at, job_id LIMIT 1", params).fetchall()
            if not rows:
                return None
            job_id, dest = rows[0]["job_id"], rows[0]["destination"]
            db.execute(
                "UPDATE deliveries SET state='sending', owner=?, lease_until=?, updated_at=? "
                "WHERE job_id=? AND destination=?",
                (owner, now + lease_seconds, now, job_id, dest),
            )
            row = db.execute("SELECT * FROM deliveries WHERE job_id=? AND destination=?", (job_id, dest)).fetchone()
        return self._delivery(row)

    def next_delivery_due(self) -> float | None:
        rows = self.query("SELECT MIN(next_attempt_at) AS t FROM deliveries WHERE state='pending'")
        return rows[0]["t"] if rows else None

    def delivery_succeeded(self, job_id: int, destination: str) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state='done', owner=NULL, last_error=NULL, delivered_at=?, updated_at=? "
                "WHERE job_id=? AND destination=?",
                (now, now, job_id, destination),
            )
            self._settle_job(db, job_id, now)

    def delivery_failed(self, job_id: int, destination: str, error: str, max_attempts: int, delay: float) -> str:
        """Count a failed attempt; back off, or dead-letter after ``max_attempts``. Returns the new state."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT attempts FROM deliveries WHERE job_id=? AND destination=?",
                             (job_id, destination)).fetchone()
            attempts = (row["attempts"] if row else 0) + 1
            state = "dead" if attempts >= max_attempts else "pending"
            db.execute(
                "UPDATE deliveries SET state=?, attempts=?, last_error=?, next_attempt_at=?, owner=NULL, "
                "updated_at=? WHERE job_id=? AND destination=?",
                (state, attempts, error[:2000], now + delay, now, job_id, destination),
            )
            self._settle_job(db, job_id, now)
        return state

    @staticmethod
    def _settle_job(db: sqlite3.Connection, job_id: int, now: float, superseded_by: int | None = None) -> None:
        states = {r["state"] for r in db.execute("SELECT state FROM deliveries WHERE job_id=?", (job_id,))}
        if states == {"superseded"}:
            db.execute("UPDATE jobs SET state='superseded', reason=?, finished_at=?, updated_at=? "
                       "WHERE id=? AND state IN ('exporting','dead')",
                       (f"superseded by job {superseded_by} before delivery", now, now, job_id))
        elif states and states <= {"done", "superseded"}:
            db.execute("UPDATE jobs SET state='done', reason=CASE WHEN reason LIKE 'no measurements:%' "
                       "THEN reason END, finished_at=?, updated_at=? "
                       "WHERE id=? AND state IN ('exporting','dead')", (now, now, job_id))
        elif "dead" in states and not states & {"pending", "sending"}:
            dead = [r["destination"] for r in
                    db.execute("SELECT destination FROM deliveries WHERE job_id=? AND state='dead'", (job_id,))]
            db.execute("UPDATE jobs SET state='dead', reason=?, updated_at=? WHERE id=?",
                       (f"delivery to {', '.join(dead)} failed too often (dead letter; `lungburden retry {job_id}`)",
                        now, job_id))

    def unrejected_earlier_versions(self, job: Job, destination: str) -> list[Job]:
        """Earlier versions of ``job``'s series whose results ``destination`` holds (delivery done)
        and that no rejection note has retracted there yet."""
        rows = self.query(
            "SELECT j.id FROM jobs j JOIN deliveries d ON d.job_id=j.id AND d.destination=? "
            "WHERE j.series_instance_uid=? AND j.model=? AND j.version<? AND d.state='done' AND j.result IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM rejections r WHERE r.job_id=j.id AND r.destination=?) ORDER BY j.version",
            (destination, job.series_instance_uid, job.model, job.version, destination),
        )
        return [j for r in rows if (j := self.job(r["id"])) is not None]

    def record_rejections(self, job_ids: Sequence[int], destination: str, by_job_id: int, note_uid: str) -> None:
        """Remember that a rejection note retracted the results of ``job_ids`` at ``destination``."""
        now = time.time()
        with self.transaction() as db:
            for job_id in job_ids:
                db.execute("INSERT OR REPLACE INTO rejections VALUES (?,?,?,?,?)",
                           (job_id, destination, by_job_id, note_uid, now))

    def rejections(self, job_id: int) -> list[dict]:
        """Where the results of ``job_id`` were retracted: destination, by which job, note UID, time."""
        return [dict(r) for r in self.query("SELECT * FROM rejections WHERE job_id=? ORDER BY destination", (job_id,))]

    def destination_counts(self) -> dict[str, dict[str, int]]:
        """Per destination: number of deliveries in each state."""
        out: dict[str, dict[str, int]] = {}
        for r in self.query("SELECT destination, state, COUNT(*) AS n FROM deliveries GROUP BY destination, state"):
            out.setdefault(r["destination"], dict.fromkeys(DELIVERY_STATES, 0))[r["state"]] = r["n"]
        return out

    def retry(self, job_ids: Sequence[int] | None = None, states: Sequence[str] = ("dead", "failed")) -> list[int]:
        """Make dead deliveries pending again (attempts reset) and re-queue failed/skipped jobs."""
        now = time.time()
        done = []
        with self.transaction() as db:
            sql = f"SELECT id, state FROM jobs WHERE state IN ({','.join('?' * len(states))})"
            params: list = list(states)
            if job_ids is not None:
                sql += f" AND id IN ({','.join('?' * len(job_ids))})"
                params += list(job_ids)
            for r in db.execute(sql, params).fetchall():
                if r["state"] == "dead":
                    db.execute(
                        "UPDATE deliveries SET state='pending', attempts=0, next_attempt_at=?, updated_at=? "
                        "WHERE job_id=? AND state='dead'",
                        (now, now, r["id"]),
                    )
                    db.execute("UPDATE jobs SET state='exporting', reason='retried by operator', updated_at=? "
                               "WHERE id=?", (now, r["id"]))
                else:
                    db.execute(
                        "UPDATE jobs SET state='queued', reason='retried by operator', attempts=0, updated_at=? "
                        "WHERE id=?",
                        (now, r["id"]),
                    )
                done.append(r["id"])
        return done

    def rerun_job(self, job_id: int, files: Sequence[Path], reason: str = "retried by operator") -> bool:
        """Re-queue a finished job (any terminal state) to be processed again from ``files``.

        One transaction: its deliveries are dropped (the new outputs get new ones when the analysis
        succeeds) and its spooled files replaced. ``False`` (nothing changed) if the job is unknown or
        not in a terminal state (queued, running or exporting).
        """
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] not in TERMINAL_STATES:
                return False
            db.execute("DELETE FROM deliveries WHERE job_id=?", (job_id,))
            db.execute(
                "UPDATE jobs SET state='queued', reason=?, attempts=0, files=?, owner=NULL, lease_until=NULL, "
                "updated_at=? WHERE id=?",
                (reason, json.dumps([str(p) for p in files]), now, job_id),
            )
        return True

    def finished_series_before(self, cutoff: float) -> list[SeriesState]:
        """Complete series older than ``cutoff`` whose jobs are all terminal (retention clean-up)."""
        rows = self.query(
            "SELECT s.* FROM series s WHERE s.state='complete' AND s.last_received < ? AND NOT EXISTS "
            "(SELECT 1 FROM jobs j WHERE j.series_instance_uid=s.series_instance_uid AND j.state IN "
            "('queued','running','exporting'))",
            (cutoff,),
        )
        return [SeriesState(*r) for r in rows]

    def forget_instances(self, series_instance_uid: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM instances WHERE series_instance_uid=?", (series_instance_uid,))
            db.execute("UPDATE series SET state='purged' WHERE series_instance_uid=?", (series_instance_uid,))
