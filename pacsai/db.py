"""The database connection and schema: SQLite (WAL, synchronous=FULL) by default, PostgreSQL when given a URL."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
CREATE TABLE IF NOT EXISTS job_events (
    event_id {serial}, job_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    from_state TEXT NOT NULL, to_state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id);
CREATE TABLE IF NOT EXISTS job_stages (
    stage_id {serial}, job_id TEXT NOT NULL, model TEXT NOT NULL, stage TEXT NOT NULL,
    seconds DOUBLE PRECISION NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS job_stages_job ON job_stages(job_id);
CREATE TABLE IF NOT EXISTS notices (
    job_id TEXT NOT NULL, channel TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL,
    detail TEXT NOT NULL, urgent INTEGER NOT NULL, updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (job_id, channel));
CREATE TABLE IF NOT EXISTS verifications (
    transaction_uid TEXT PRIMARY KEY, job_id TEXT NOT NULL, destination TEXT NOT NULL, method TEXT NOT NULL,
    attempt INTEGER NOT NULL, state TEXT NOT NULL, requested_at DOUBLE PRECISION NOT NULL,
    due_at DOUBLE PRECISION NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS verifications_job ON verifications(job_id);
CREATE TABLE IF NOT EXISTS verified_instances (
    job_id TEXT NOT NULL, file TEXT NOT NULL, sop_class_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
    transaction_uid TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (job_id, file));
CREATE INDEX IF NOT EXISTS verified_instances_transaction ON verified_instances(transaction_uid);
"""

# columns added after the first release: (table, column, definition), applied to databases made before them
_ADDED_COLUMNS = (
    ("jobs", "owner", "TEXT NOT NULL DEFAULT ''"),  # worker process running the job (host:pid)
    ("jobs", "due_at", "DOUBLE PRECISION NOT NULL DEFAULT 0"),  # when a retrying job is enqueued again
    ("jobs", "revision", "INTEGER NOT NULL DEFAULT 1"),  # 1 + earlier jobs of its series and model
    ("jobs", "supersedes", "TEXT NOT NULL DEFAULT ''"),  # job whose delivered results this one replaces
    ("jobs", "superseded_by", "TEXT NOT NULL DEFAULT ''"),  # delivered job whose results replaced this one's
    ("jobs", "priority", "TEXT NOT NULL DEFAULT 'routine'"),  # stat | routine | background (routing rules)
)


def _owner_only(path: Path) -> None:
    """The database and its -wal/-shm files hold patient-related rows: 0600, whatever the umask was."""
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if name.exists() and name.stat().st_mode & 0o777 != 0o600:
            name.chmod(0o600)


class Connection:
    """One DB-API connection in autocommit mode; SQL is written with `?` and translated for PostgreSQL."""

    def __init__(self, target: str | Path) -> None:
        self.postgres = isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            import psycopg

            self._conn: Any = psycopg.connect(str(target), autocommit=True)
        else:
            path = Path(target)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            # deleted rows (series descriptions of purged series) are overwritten, not left in free pages
            self._conn.execute("PRAGMA secure_delete=ON")
            _owner_only(path)
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


class Database:
    """Thread-safe access to one connection; every write is committed (SQLite: synchronous=FULL) before returning
    (the spool's instance rows without waiting for the log's sync: see `_tx`).

    `target` is a SQLite file path or a PostgreSQL URL (PACSAI_DATABASE_URL). The tables' own operations live in
    the mixins of pacsai.state.State.
    """

    def __init__(self, target: str | Path) -> None:
        self._db = Connection(target)
        self._lock = threading.Lock()
        serial = "BIGSERIAL PRIMARY KEY" if self._db.postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
        for statement in filter(str.strip, _SCHEMA.replace("{serial}", serial).split(";")):
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

    def drop_old_versions(self) -> bool:
        """SQLite: copy the WAL into the database and truncate it, so changed or deleted rows (a purged series'
        description) leave no copy there (secure_delete zeroes them in the file). False when a reader kept it busy.
        PostgreSQL: nothing here (dead row versions go with the server's VACUUM)."""
        if self._db.postgres:
            return True
        with self._lock:
            busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return not busy

    @contextmanager
    def _tx(self, *, log_synced: bool = True) -> Iterator[Connection]:
        """One transaction, committed on leaving. `log_synced=False`: the commit does not wait for the database's log
        to reach the disk (SQLite synchronous=NORMAL for it, PostgreSQL synchronous_commit off): it survives the
        process being killed, not a power cut or an OS crash, and the next synced commit syncs it too. Only for rows
        that can be rebuilt from files already synced (the spool's instances: reconcile.recover_spool)."""
        with self._lock:
            relaxed = not log_synced and not self._db.postgres
            if relaxed:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute(self._db.begin)
                if not log_synced and self._db.postgres:
                    self._db.execute("SET LOCAL synchronous_commit TO OFF")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if relaxed:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(row) for row in self._db.execute(sql, params).fetchall()]
