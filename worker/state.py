"""System of record: instances, series, jobs and deliveries; SQLite by default, PostgreSQL when given a URL."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.jobs import JobState, SeriesJob, SeriesState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_key TEXT PRIMARY KEY, series_key TEXT NOT NULL, study_key TEXT NOT NULL,
    path TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_key);
CREATE TABLE IF NOT EXISTS series (
    series_key TEXT PRIMARY KEY, study_key TEXT NOT NULL, state TEXT NOT NULL,
    last_received_at DOUBLE PRECISION NOT NULL, released_at DOUBLE PRECISION,
    calling_ae TEXT NOT NULL, called_ae TEXT NOT NULL,
    header TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', updated_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, series_key TEXT NOT NULL, study_key TEXT NOT NULL, model TEXT NOT NULL,
    manifest TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0, created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
    delivery_failures INTEGER NOT NULL DEFAULT 0, owner TEXT NOT NULL DEFAULT '',
    due_at DOUBLE PRECISION NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL, file TEXT NOT NULL, destination TEXT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL, detail TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (job_id, file));
"""

# columns added after the first release: (table, column, definition), applied to databases made before them
_ADDED_COLUMNS = (
    ("jobs", "owner", "TEXT NOT NULL DEFAULT ''"),                 # worker process running the job (host:pid)
    ("jobs", "due_at", "DOUBLE PRECISION NOT NULL DEFAULT 0"),    # when a retrying job is enqueued again
    ("jobs", "revision", "INTEGER NOT NULL DEFAULT 1"),            # 1 + earlier jobs of its series and model
    ("jobs", "supersedes", "TEXT NOT NULL DEFAULT ''"),            # job whose delivered results this one replaces
    ("jobs", "superseded_by", "TEXT NOT NULL DEFAULT ''"),         # delivered job whose results replaced this one's
)
_ENDED = (JobState.DELIVERED.value, JobState.FAILED.value, JobState.DEAD.value)


def _held_elsewhere(holder: str, owner: str, renewed_at: float, now: float, lease_s: float,
                    alive: Callable[[str], bool]) -> bool:
    """Another process holds the job's lease: it renewed within `lease_s` and, as far as can be told, still runs."""
    return bool(holder) and holder != owner and now - renewed_at < lease_s and alive(holder)


@dataclass(frozen=True, slots=True)
class SeriesRow:
    series_key: str
    study_key: str
    last_received_at: float
    released_at: float | None
    calling_ae: str
    called_ae: str
    header: dict[str, Any]


@dataclass(frozen=True, slots=True)
class JobRow:
    job_id: str
    series_key: str
    study_key: str
    model: str
    manifest: str
    destination: str
    state: JobState
    reason: str
    attempts: int
    revision: int = 1
    supersedes: str = ""
    superseded_by: str = ""

    def to_job(self) -> SeriesJob:
        """The queue message for this job."""
        return SeriesJob(self.job_id, self.study_key, self.series_key, self.model, self.manifest, self.destination,
                         self.revision, self.supersedes)


_JOB_COLUMNS = ("job_id, series_key, study_key, model, manifest, destination, state, reason, attempts, revision,"
                " supersedes, superseded_by")


def _job_row(r: Sequence[Any]) -> JobRow:
    return JobRow(r[0], r[1], r[2], r[3], r[4], r[5], JobState(r[6]), r[7], r[8], int(r[9]), r[10], r[11])


class _Connection:
    """One DB-API connection in autocommit mode; SQL is written with `?` and translated for PostgreSQL."""

    def __init__(self, target: str | Path) -> None:
        self.postgres = isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            import psycopg

            self._conn: Any = psycopg.connect(str(target), autocommit=True)
        else:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
        self.begin = "BEGIN" if self.postgres else "BEGIN IMMEDIATE"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s") if self.postgres else sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.postgres:
            with self._conn.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), rows)
        else:
            self._conn.executemany(sql, rows)

    def close(self) -> None:
        self._conn.close()


class State:
    """Thread-safe access to the database; every write is committed (SQLite: synchronous=FULL) before returning.

    `target` is a SQLite file path or a PostgreSQL URL (PACSAI_DATABASE_URL).
    """

    def __init__(self, target: str | Path) -> None:
        self._db = _Connection(target)
        self._lock = threading.Lock()
        for statement in filter(str.strip, _SCHEMA.split(";")):
            self._db.execute(statement)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        for table, column, definition in _ADDED_COLUMNS:
            if self._db.postgres:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}")
            elif column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})").fetchall()}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[_Connection]:
        with self._lock:
            self._db.execute(self._db.begin)
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(row) for row in self._db.execute(sql, params).fetchall()]

    # --- node side ---------------------------------------------------------------------------------------------

    def record_instance(self, *, sop_key: str, series_key: str, study_key: str, path: str, calling_ae: str,
                        called_ae: str, header: dict[str, Any]) -> None:
        """Record one spooled instance and (re)open its series for completeness tracking."""
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?) ON CONFLICT(sop_key) DO UPDATE SET"
                       " series_key=excluded.series_key, study_key=excluded.study_key, path=excluded.path,"
                       " received_at=excluded.received_at", (sop_key, series_key, study_key, path, now))
            db.execute(
                "INSERT INTO series VALUES (?, ?, ?, ?, NULL, ?, ?, ?, '', ?) ON CONFLICT(series_key) DO UPDATE SET"
                " state=excluded.state, last_received_at=excluded.last_received_at, released_at=NULL,"
                " calling_ae=excluded.calling_ae, called_ae=excluded.called_ae, updated_at=excluded.updated_at",
                (series_key, study_key, SeriesState.RECEIVING.value, now, calling_ae, called_ae,
                 json.dumps(header), now))

    def mark_released(self, series_keys: Sequence[str]) -> None:
        now = time.time()
        with self._tx() as db:
            db.executemany("UPDATE series SET released_at=? WHERE series_key=? AND state=?",
                           [(now, key, SeriesState.RECEIVING.value) for key in series_keys])

    def receiving_series(self) -> list[SeriesRow]:
        rows = self._query("SELECT series_key, study_key, last_received_at, released_at, calling_ae, called_ae,"
                           " header FROM series WHERE state=?", (SeriesState.RECEIVING.value,))
        return [SeriesRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    def series_instances(self, series_key: str) -> list[tuple[str, str]]:
        """(sop_key, spool-relative path) of every instance of the series, in a stable order."""
        rows = self._query("SELECT sop_key, path FROM instances WHERE series_key=? ORDER BY sop_key", (series_key,))
        return [(r[0], r[1]) for r in rows]

    def close_series(self, series_key: str, state: SeriesState, reason: str, jobs: Sequence[JobRow]) -> list[str]:
        """Close a series and insert its jobs as pending; return the ids of jobs that are new (not seen before).

        A new job of a series and model that had jobs before (instances arrived after it was complete, or it was
        sent again with other instances) gets the next revision: its results supersede theirs (supersedes_for).
        """
        now = time.time()
        new: list[str] = []
        with self._tx() as db:
            db.execute("UPDATE series SET state=?, reason=?, updated_at=? WHERE series_key=?",
                       (state.value, reason, now, series_key))
            for job in jobs:
                revision = db.execute("SELECT COALESCE(MAX(revision), 0) + 1 FROM jobs WHERE series_key=? AND model=?",
                                      (job.series_key, job.model)).fetchone()[0]
                cursor = db.execute(
                    "INSERT INTO jobs (job_id, series_key, study_key, model, manifest, destination, state,"
                    " created_at, updated_at, revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(job_id) DO NOTHING",
                    (job.job_id, job.series_key, job.study_key, job.model, job.manifest, job.destination,
                     JobState.PENDING.value, now, now, int(revision)))
                if cursor.rowcount:
                    new.append(job.job_id)
        return new

    # --- jobs --------------------------------------------------------------------------------------------------

    def jobs_in(self, *states: JobState, updated_before: float = float("inf")) -> list[JobRow]:
        marks = ",".join("?" for _ in states)
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) AND updated_at < ?"
                           " ORDER BY created_at", [*(s.value for s in states), updated_before])
        return [_job_row(r) for r in rows]

    def job(self, job_id: str) -> JobRow | None:
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id=?", (job_id,))
        return next((_job_row(r) for r in rows), None)

    def set_job(self, job_id: str, state: JobState, reason: str = "", *, count_attempt: bool = False) -> None:
        """Set a job's state (which ends any lease on it); a job delivered marks the job it supersedes as superseded
        by it, in the same commit."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state=?, reason=?, attempts=attempts+?, owner='', updated_at=? WHERE job_id=?",
                       (state.value, reason, int(count_attempt), time.time(), job_id))
            if state is JobState.DELIVERED:
                db.execute("UPDATE jobs SET superseded_by=? WHERE job_id=(SELECT supersedes FROM jobs WHERE job_id=?)",
                           (job_id, job_id))

    def supersedes_for(self, job: JobRow) -> str | None:
        """For a pending job: None while an earlier job of its series and model has not ended (that one goes first,
        so results reach the PACS in order); else the latest earlier job delivered to the same destination ("" when
        none), recorded as the job's `supersedes` (a retry sends the same)."""
        if job.revision <= 1:
            return ""
        with self._tx() as db:
            earlier = db.execute("SELECT job_id, state, destination FROM jobs WHERE series_key=? AND model=?"
                                 " AND revision<? ORDER BY revision DESC", (job.series_key, job.model, job.revision))
            rows = earlier.fetchall()
            if any(state not in _ENDED for _, state, _ in rows):
                return None
            supersedes = next((str(job_id) for job_id, state, destination in rows
                               if state == JobState.DELIVERED.value and destination == job.destination), "")
            db.execute("UPDATE jobs SET supersedes=? WHERE job_id=?", (supersedes, job.job_id))
        return supersedes

    def claim_job(self, job_id: str, owner: str, *, lease_s: float, alive: Callable[[str], bool],
                  max_attempts: int) -> str:
        """Mark the job running for `owner` and count an attempt: "claimed", or "held" when another live owner
        holds a fresh lease, or "exhausted" when it already started `max_attempts` times.

        A broker may deliver a job twice (visibility timeout passed, connection lost and restored): the second
        delivery finds the first still running and must not run it in parallel. An owner that stopped renewing
        its lease, or a process on this host that no longer exists, has lost it.
        """
        now = time.time()
        with self._tx() as db:
            lock = " FOR UPDATE" if db.postgres else ""
            row = db.execute(f"SELECT state, owner, updated_at, attempts FROM jobs WHERE job_id=?{lock}",
                             (job_id,)).fetchone()
            if row is None:
                return "unknown"
            state, holder, renewed_at, attempts = row
            if state == JobState.RUNNING.value and _held_elsewhere(holder, owner, renewed_at, now, lease_s, alive):
                return "held"
            if attempts >= max_attempts:
                return "exhausted"
            db.execute("UPDATE jobs SET state=?, reason='', attempts=attempts+1, owner=?, updated_at=? WHERE job_id=?",
                       (JobState.RUNNING.value, owner, now, job_id))
            return "claimed"

    def renew_lease(self, job_id: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET updated_at=? WHERE job_id=? AND owner=?", (time.time(), job_id, owner))

    def claim_delivery(self, job_id: str, owner: str, *, lease_s: float, alive: Callable[[str], bool]) -> bool:
        """Hold the job's results for sending, unless another live process holds a fresh lease on them (a delivery
        message the broker handed out twice must not send the results twice at the same time)."""
        now = time.time()
        with self._tx() as db:
            lock = " FOR UPDATE" if db.postgres else ""
            row = db.execute(f"SELECT state, owner, updated_at FROM jobs WHERE job_id=?{lock}", (job_id,)).fetchone()
            if row is None:
                return True     # nothing to protect; the task reports the unknown job itself
            state, holder, renewed_at = row
            if state == JobState.ENCODED.value and _held_elsewhere(holder, owner, renewed_at, now, lease_s, alive):
                return False
            db.execute("UPDATE jobs SET owner=?, updated_at=? WHERE job_id=?", (owner, now, job_id))
            return True

    def release_lease(self, job_id: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET owner='' WHERE job_id=? AND owner=?", (job_id, owner))

    def running_owners(self, updated_before: float) -> list[tuple[JobRow, str, float]]:
        """Running jobs not renewed since `updated_before`: each with its holder and when it last renewed."""
        rows = self._query(f"SELECT {_JOB_COLUMNS}, owner, updated_at FROM jobs WHERE state=? AND updated_at < ?"
                           " ORDER BY created_at", (JobState.RUNNING.value, updated_before))
        return [(_job_row(r), str(r[-2]), float(r[-1])) for r in rows]

    def schedule_retry(self, job_id: str, reason: str, due_at: float) -> None:
        """Park the job until `due_at`; the node enqueues it then (retries live in the database, not the broker)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state=?, reason=?, due_at=?, owner='', updated_at=? WHERE job_id=?",
                       (JobState.RETRYING.value, reason, due_at, time.time(), job_id))

    def jobs_due(self, now: float) -> list[JobRow]:
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state=? AND due_at <= ? ORDER BY due_at",
                           (JobState.RETRYING.value, now))
        return [_job_row(r) for r in rows]

    def record_delivery(self, job_id: str, file: str, destination: str, status: str, detail: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO deliveries VALUES (?, ?, ?, ?, 1, ?, ?) ON CONFLICT(job_id, file) DO UPDATE SET"
                " status=excluded.status, attempts=deliveries.attempts+1, detail=excluded.detail,"
                " updated_at=excluded.updated_at",
                (job_id, file, destination, status, detail, time.time()))

    def deliveries(self, job_id: str) -> list[tuple[str, str, int, str]]:
        rows = self._query("SELECT file, status, attempts, detail FROM deliveries WHERE job_id=? ORDER BY file",
                           (job_id,))
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def jobs_for_series(self, series_key: str) -> list[JobRow]:
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE series_key=?", (series_key,))
        return [_job_row(r) for r in rows]

    def failing_deliveries(self, alert_after_failures: int) -> int:
        """Jobs still being retried whose delivery failed at least this many times in a row."""
        rows = self._query("SELECT COUNT(*) FROM jobs WHERE state=? AND delivery_failures >= ?",
                           (JobState.ENCODED.value, alert_after_failures))
        return int(rows[0][0])

    def note_delivery_failure(self, job_id: str, reason: str) -> int:
        """Record a failed delivery attempt (job stays encoded); return the number of failures so far."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET delivery_failures=delivery_failures+1, reason=?, updated_at=? WHERE job_id=?",
                       (reason, time.time(), job_id))
            return int(db.execute("SELECT delivery_failures FROM jobs WHERE job_id=?", (job_id,)).fetchone()[0])

    def touch_job(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET updated_at=? WHERE job_id=?", (time.time(), job_id))

    def calling_ae_of(self, series_key: str) -> str:
        rows = self._query("SELECT calling_ae FROM series WHERE series_key=?", (series_key,))
        return str(rows[0][0]) if rows else ""

    def instance_paths(self) -> set[str]:
        return {str(r[0]) for r in self._query("SELECT path FROM instances")}

    def purgeable_series(self, cutoff: float) -> list[tuple[str, str]]:
        """(study_key, series_key) of complete series whose jobs all ended (delivered/failed/dead) before cutoff."""
        ended = (JobState.DELIVERED.value, JobState.FAILED.value, JobState.DEAD.value)
        rows = self._query(
            "SELECT s.study_key, s.series_key FROM series s WHERE s.state=? AND NOT EXISTS (SELECT 1 FROM jobs j"
            " WHERE j.series_key=s.series_key AND (j.state NOT IN (?, ?, ?) OR j.updated_at >= ?))",
            (SeriesState.COMPLETE.value, *ended, cutoff))
        return [(str(r[0]), str(r[1])) for r in rows]

    def mark_series(self, series_key: str, state: SeriesState) -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET state=?, updated_at=? WHERE series_key=?", (state.value, time.time(),
                                                                                       series_key))

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts per state for series and jobs, and the number of instances (for `pacsai status`)."""
        result: dict[str, dict[str, int]] = {"series": {}, "jobs": {}, "deliveries": {}}
        for table in ("series", "jobs"):
            for state, count in self._query(f"SELECT state, COUNT(*) FROM {table} GROUP BY state"):
                result[table][state] = count
        for status, count in self._query("SELECT status, COUNT(*) FROM deliveries GROUP BY status"):
            result["deliveries"][status] = count
        result["instances"] = {"received": self._query("SELECT COUNT(*) FROM instances")[0][0]}
        return result
