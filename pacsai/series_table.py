"""Instances and series: what arrived, which series are still receiving, and closing a series into jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pacsai.db import Connection, Database
from pacsai.group_commit import GroupCommit
from pacsai.job_table import JobRow, transition
from pacsai.jobs import ENDED_JOB_STATES, SERIES_TRANSITIONS, JobState, SeriesJob, SeriesState, check_transition
from pacsai.storage import SpooledInstance


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
class _InstanceRow:
    sop_key: str
    series_key: str
    study_key: str
    path: str
    calling_ae: str
    called_ae: str
    header: str  # JSON
    at: float


_NO_HEADER = frozenset({SeriesState.PURGED, SeriesState.NO_MODEL})  # states whose header is removed


def _set_series_state(db: Connection, series_key: str, state: SeriesState, reason: str | None = None) -> None:
    """Change a series' state through SERIES_TRANSITIONS (IllegalTransition otherwise)."""
    row = db.execute("SELECT state FROM series WHERE series_key=?", (series_key,)).fetchone()
    if row is None:
        return
    check_transition(SERIES_TRANSITIONS, SeriesState(row[0]), state, "series")
    if state in _NO_HEADER:  # its description may hold patient data, and it is not needed any more
        db.execute("UPDATE series SET header='{}' WHERE series_key=?", (series_key,))
    if reason is None:
        db.execute("UPDATE series SET state=?, updated_at=? WHERE series_key=?", (state.value, time.time(), series_key))
    else:
        db.execute(
            "UPDATE series SET state=?, reason=?, updated_at=? WHERE series_key=?",
            (state.value, reason, time.time(), series_key),
        )


class SeriesTable(Database):
    """The node's side: record instances, track series until complete, close them into pending jobs."""

    def record_instance(
        self, stored: SpooledInstance, *, calling_ae: str, called_ae: str, header: dict[str, Any]
    ) -> None:
        """Record one spooled instance and (re)open its series for completeness tracking (any state → receiving).

        Committed before it returns; instances recorded at the same time by other associations share the commit.
        The commit does not wait for a sync of the database's log: the spool file was synced (file and directory)
        before this, and a row a power cut takes is recorded again from it at start (reconcile.recover_spool)."""
        row = _InstanceRow(
            stored.sop_key,
            stored.series_key,
            stored.study_key,
            stored.path,
            calling_ae,
            called_ae,
            json.dumps(header),
            time.time(),
        )
        group: GroupCommit[_InstanceRow] = self.__dict__.setdefault(  # setdefault: one per table, even when raced
            "_instance_commits", GroupCommit(self._record_instances)
        )
        group.commit(row)

    def _record_instances(self, rows: Sequence[_InstanceRow]) -> None:
        with self._tx(log_synced=False) as db:
            for row in rows:
                db.execute(
                    "INSERT INTO instances VALUES (?, ?, ?, ?, ?) ON CONFLICT(sop_key) DO UPDATE SET"
                    " series_key=excluded.series_key, study_key=excluded.study_key, path=excluded.path,"
                    " received_at=excluded.received_at",
                    (row.sop_key, row.series_key, row.study_key, row.path, row.at),
                )
                db.execute(
                    "INSERT INTO series VALUES (?, ?, ?, ?, NULL, ?, ?, ?, '', ?) ON CONFLICT(series_key) DO UPDATE SET"
                    " state=excluded.state, last_received_at=excluded.last_received_at, released_at=NULL,"
                    " header=CASE WHEN series.header='{}' THEN excluded.header ELSE series.header END,"
                    " calling_ae=excluded.calling_ae, called_ae=excluded.called_ae, updated_at=excluded.updated_at",
                    (
                        row.series_key,
                        row.study_key,
                        SeriesState.RECEIVING.value,
                        row.at,
                        row.calling_ae,
                        row.called_ae,
                        row.header,
                        row.at,
                    ),
                )

    def mark_released(self, series_keys: Sequence[str]) -> None:
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "UPDATE series SET released_at=? WHERE series_key=? AND state=?",
                [(now, key, SeriesState.RECEIVING.value) for key in series_keys],
            )

    def receiving_series(self) -> list[SeriesRow]:
        rows = self._query(
            "SELECT series_key, study_key, last_received_at, released_at, calling_ae, called_ae,"
            " header FROM series WHERE state=?",
            (SeriesState.RECEIVING.value,),
        )
        return [SeriesRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    def instance_count(self, series_key: str) -> int:
        """How many instances of the series have been recorded."""
        rows = self._query("SELECT COUNT(*) FROM instances WHERE series_key=?", (series_key,))
        return int(rows[0][0]) if rows else 0

    def series_instances(self, series_key: str) -> list[tuple[str, str]]:
        """(sop_key, spool-relative path) of every instance of the series, in a stable order."""
        rows = self._query("SELECT sop_key, path FROM instances WHERE series_key=? ORDER BY sop_key", (series_key,))
        return [(r[0], r[1]) for r in rows]

    def close_series(
        self, series_key: str, state: SeriesState, reason: str, jobs: Sequence[SeriesJob | JobRow]
    ) -> list[str]:
        """Close a series and insert its jobs as pending; return the ids of jobs that are new (not seen before).

        A new job of a series and model that had jobs before (instances arrived after it was complete, or it was
        sent again with other instances) gets the next revision: its results supersede theirs (supersedes_for).
        A job that exists already and ended dead or cancelled is given a fresh start (pending, attempts reset): the
        same series sent again is the sender asking for it again.
        """
        now = time.time()
        new: list[str] = []
        with self._tx() as db:
            _set_series_state(db, series_key, state, reason)
            for job in jobs:
                if self._insert_job(db, job, now) or self._restart_ended(db, job.job_id):
                    new.append(job.job_id)
        return new

    def add_job(self, job: SeriesJob) -> bool:
        """Insert one pending job of a series (next revision of its series and model); False if it exists."""
        with self._tx() as db:
            return self._insert_job(db, job, time.time())

    @staticmethod
    def _insert_job(db: Connection, job: SeriesJob | JobRow, now: float) -> bool:
        revision = db.execute(
            "SELECT COALESCE(MAX(revision), 0) + 1 FROM jobs WHERE series_key=? AND model=?",
            (job.series_key, job.model),
        ).fetchone()[0]
        cursor = db.execute(
            "INSERT INTO jobs (job_id, series_key, study_key, model, manifest, destination, state,"
            " created_at, updated_at, revision, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(job_id) DO NOTHING",
            (job.job_id, job.series_key, job.study_key, job.model, job.manifest, job.destination)
            + (JobState.PENDING.value, now, now, int(revision), job.priority.value),
        )
        if cursor.rowcount:
            db.execute(
                "INSERT INTO job_events (job_id, at, from_state, to_state, reason) VALUES (?, ?, '', ?, 'created')",
                (job.job_id, now, JobState.PENDING.value),
            )
        return bool(cursor.rowcount)

    @staticmethod
    def _restart_ended(db: Connection, job_id: str) -> bool:
        row = db.execute("SELECT state FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None or JobState(row[0]) not in (JobState.DEAD, JobState.CANCELLED):
            return False
        return transition(db, job_id, JobState.PENDING, "series sent again", sets="attempts=0, delivery_failures=0")

    def received_since(self, since: float) -> list[tuple[str, str, str, int, float]]:
        """Per series received since `since`: (study key, calling AE, header, instances, last received_at)."""
        rows = self._query(
            "SELECT i.study_key, s.calling_ae, s.header, COUNT(*), MAX(i.received_at) FROM instances i"
            " JOIN series s ON s.series_key = i.series_key WHERE i.received_at >= ?"
            " GROUP BY i.series_key, i.study_key, s.calling_ae, s.header",
            (since,),
        )
        return [(str(a), str(b), str(c), int(d), float(e)) for a, b, c, d, e in rows]

    def calling_ae_of(self, series_key: str) -> str:
        rows = self._query("SELECT calling_ae FROM series WHERE series_key=?", (series_key,))
        return str(rows[0][0]) if rows else ""

    def instance_paths(self) -> set[str]:
        return {str(r[0]) for r in self._query("SELECT path FROM instances")}

    def purgeable_series(self, cutoff: float) -> list[tuple[str, str]]:
        """(study_key, series_key) of complete series whose jobs all ended (delivered/failed/dead) before cutoff."""
        ended = sorted(state.value for state in ENDED_JOB_STATES)
        marks = ", ".join("?" for _ in ended)
        rows = self._query(
            "SELECT s.study_key, s.series_key FROM series s WHERE s.state=? AND NOT EXISTS (SELECT 1 FROM jobs j"
            f" WHERE j.series_key=s.series_key AND (j.state NOT IN ({marks}) OR j.updated_at >= ?))",
            (SeriesState.COMPLETE.value, *ended, cutoff),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    def mark_series(self, series_key: str, state: SeriesState) -> None:
        with self._tx() as db:
            _set_series_state(db, series_key, state)
