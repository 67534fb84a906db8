"""The results table of a batch: one row per series considered, CSV or Parquet (pyarrow).

Columns: :data:`COLUMNS` (UIDs, acquisition date, kernel, slice thickness, every quantity of
result.json, model name/version/weights hash, status ``done``/``skipped``/``failed`` and the
reason, and with priors :data:`PRIOR_COLUMNS`). No patient data. A CSV table grows by one
appended line per finished series (a crash loses nothing written); at the end of a run it is
rewritten with the last row of each series.
A Parquet table is rewritten periodically and at the end (each time atomically, by rename).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from lungburden.quantify import Quantities

QUANTITY_COLUMNS = tuple(f.name for f in fields(Quantities))
#: Quantities that are not numbers (e.g. per-zone values) are stored as JSON text.
JSON_COLUMNS = frozenset(f.name for f in fields(Quantities) if "float" not in str(f.type) and "int" not in str(f.type))
COLUMNS = (
    "study_instance_uid", "series_instance_uid", "status", "reason", "acquisition_date", "kernel",
    "slice_thickness_mm", "instances", *QUANTITY_COLUMNS, "model", "model_version", "weights", "weights_sha256",
    "seg_series_instance_uid", "seg_sop_instance_uid", "sr_series_instance_uid", "sr_sop_instance_uid", "stored",
    "retryable", "worker", "seconds", "finished_at",
)
#: Follow-up (``lungburden batch --priors``): how many priors were used, the most recent one's
#: Study Instance UID and Study Date, the change of burden since it (points; current minus prior)
#: and why there are none. Empty for a series analysed without priors. Last, so that a table
#: written before them is resumed with its columns in place.
PRIOR_COLUMNS = ("prior_count", "prior_study_instance_uid", "prior_study_date", "change_burden_points",
                 "priors_note")
COLUMNS = (*COLUMNS, *PRIOR_COLUMNS)
FLOAT_COLUMNS = frozenset({"slice_thickness_mm", "seconds", "change_burden_points", *QUANTITY_COLUMNS}) - JSON_COLUMNS
INT_COLUMNS = frozenset({"instances", "prior_count"})
BOOL_COLUMNS = frozenset({"stored", "retryable"})
STATUSES = ("done", "skipped", "failed")


def prior_columns(result: dict) -> dict:
    """The :data:`PRIOR_COLUMNS` of a result document (none when its priors were not searched)."""
    if "priors" not in result:
        return {}
    priors, change = result["priors"], result.get("change_since_prior")
    latest = priors[0] if priors else {}
    return {"prior_count": len(priors), "prior_study_instance_uid": latest.get("study_instance_uid"),
            "prior_study_date": latest.get("study_date"),
            "change_burden_points": change["burden_points"] if change else None,
            "priors_note": result.get("priors_note")}


def _typed(row: dict) -> dict:
    out: dict = {}
    for name in COLUMNS:
        value = row.get(name)
        if value is None or (isinstance(value, str) and value == ""):
            out[name] = None
        elif name in JSON_COLUMNS:
            out[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        elif name in FLOAT_COLUMNS:
            out[name] = float(value)
        elif name in INT_COLUMNS:
            out[name] = int(float(value))
        elif name in BOOL_COLUMNS:
            out[name] = value if isinstance(value, bool) else str(value).lower() == "true"
        else:
            out[name] = str(value)
    return out


class ResultsTable:
    """Rows by Series Instance UID (the last written wins), persisted at ``path`` (.csv or .parquet)."""

    def __init__(self, path: Path, flush_interval_s: float = 30.0):
        self.path = Path(path)
        self.parquet = self.path.suffix.lower() in (".parquet", ".pq")
        if not self.parquet and self.path.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise ValueError(f"{self.path}: the table must end in .csv or .parquet")
        self.rows: dict[str, dict] = {}
        self.flush_interval_s = flush_interval_s
        self._flushed = time.monotonic()
        if self.path.exists():
            self.rows = {r["series_instance_uid"]: r for r in self._read()}

    def _read(self) -> list[dict]:
        if self.parquet:
            import pyarrow.parquet as pq

            return [_typed(r) for r in pq.read_table(self.path).to_pylist()]
        with self.path.open(newline="") as f:
            return [_typed(r) for r in csv.DictReader(f)]

    def get(self, series_uid: str) -> dict | None:
        return self.rows.get(series_uid)

    def add(self, row: dict) -> None:
        """Record a row; CSV: appended now; Parquet: written at the next :meth:`flush` due."""
        row = _typed(row)
        self.rows[row["series_instance_uid"]] = row
        if self.parquet:
            if time.monotonic() - self._flushed > self.flush_interval_s:
                self.write()
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def write(self) -> None:
        """Rewrite the whole table (one row per series), atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        rows = list(self.rows.values())
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([(name, pa.float64() if name in FLOAT_COLUMNS else pa.int64() if name in INT_COLUMNS
                                 else pa.bool_() if name in BOOL_COLUMNS else pa.string()) for name in COLUMNS])
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        else:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
        tmp.replace(self.path)
        self._flushed = time.monotonic()

    def counts(self, series_uids: Iterable[str] | None = None) -> dict[str, int]:
        wanted = None if series_uids is None else set(series_uids)
        out = dict.fromkeys(STATUSES, 0)
        for uid, row in self.rows.items():
            if wanted is None or uid in wanted:
                out[row["status"]] = out.get(row["status"], 0) + 1
        return out
