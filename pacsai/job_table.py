"""Jobs: their rows, every state change through the transition table (with its event), leases and stage times."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pacsai.db import Connection, Database
from pacsai.jobs import ENDED_JOB_STATES, JOB_TRANSITIONS, Claim, JobState, Priority, SeriesJob, check_transition


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
    priority: Priority = Priority.ROUTINE

    def to_job(self) -> SeriesJob:
        """The queue message for this job."""
        return SeriesJob(
            self.job_id,
            self.study_key,
            self.series_key,
            self.model,
            self.manifest,
            self.destination,
            self.revision,
            self.supersedes,
            self.priority,
        )


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One state change of a job (the job's timeline)."""

    at: float
    from_state: str  # "" for the job's creation
    to_state: str
    reason: str


@dataclass(frozen=True, slots=True)
class StageTime:
    """How long one stage of one job took (recorded by the process that ran it)."""

    stage_id: int
    job_id: str
    model: str
    stage: str
    seconds: float
    at: float


JOB_COLUMNS = (
    "job_id, series_key, study_key, model, manifest, destination, state, reason, attempts, revision,"
    " supersedes, superseded_by, priority"
)


def job_row(r: Sequence[Any]) -> JobRow:
    return JobRow(
        r[0], r[1], r[2], r[3], r[4], r[5], JobState(r[6]), r[7], r[8], int(r[9]), r[10], r[11], Priority(r[12])
    )


def held_elsewhere(
    holder: str, owner: str, renewed_at: float, now: float, lease_s: float, alive: Callable[[str], bool]
) -> bool:
    """Another process holds the job's lease: it renewed within `lease_s` and, as far as can be told, still runs."""
    return bool(holder) and holder != owner and now - renewed_at < lease_s and alive(holder)


def transition(
    db: Connection,
    job_id: str,
    new: JobState,
    reason: str,
    *,
    owner: str = "",
    sets: str = "",
    params: Sequence[Any] = (),
) -> bool:
    """Move one job to `new` inside a transaction: checked against JOB_TRANSITIONS (IllegalTransition), recorded
    as a job event, its lease given to `owner` ("" ends it). `sets` adds SQL SET clauses with their `params`.
    False: no such job."""
    lock = " FOR UPDATE" if db.postgres else ""
    row = db.execute(f"SELECT state FROM jobs WHERE job_id=?{lock}", (job_id,)).fetchone()
    if row is None:
        return False
    old = JobState(row[0])
    check_transition(JOB_TRANSITIONS, old, new, f"job {job_id[:8]}")
    now = time.time()
    extra = f", {sets}" if sets else ""
    db.execute(
        f"UPDATE jobs SET state=?, reason=?, owner=?, updated_at=?{extra} WHERE job_id=?",
        (new.value, reason, owner, now, *params, job_id),
    )
    db.execute(
        "INSERT INTO job_events (job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
        (job_id, now, old.value, new.value, reason),
    )
    return True


class JobTable(Database):
    """Reading jobs and changing their state; every change goes through `transition`."""

    def jobs_in(self, *states: JobState, updated_before: float = float("inf")) -> list[JobRow]:
        marks = ",".join("?" for _ in states)
        rows = self._query(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) AND updated_at < ? ORDER BY created_at",
            [*(s.value for s in states), updated_before],
        )
        return [job_row(r) for r in rows]

    def job(self, job_id: str) -> JobRow | None:
        rows = self._query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id=?", (job_id,))
        return next((job_row(r) for r in rows), None)

    def jobs_for_series(self, series_key: str) -> list[JobRow]:
        rows = self._query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE series_key=?", (series_key,))
        return [job_row(r) for r in rows]

    def set_job(self, job_id: str, state: JobState, reason: str = "", *, count_attempt: bool = False) -> None:
        """Set a job's state (which ends any lease on it); a job delivered marks the job it supersedes as superseded
        by it, in the same commit. Raises IllegalTransition for a change JOB_TRANSITIONS does not allow."""
        with self._tx() as db:
            transition(db, job_id, state, reason, sets="attempts=attempts+?", params=(int(count_attempt),))
            if state is JobState.DELIVERED:
                db.execute(
                    "UPDATE jobs SET superseded_by=? WHERE job_id=(SELECT supersedes FROM jobs WHERE job_id=?)",
                    (job_id, job_id),
                )

    def mark_queued(self, job_id: str) -> bool:
        """A pending job the node has just put on the broker is queued; False when it is no longer pending: an idle
        worker can take the message and claim the job first, and moving its running job back would lose the run."""
        with self._tx() as db:
            lock = " FOR UPDATE" if db.postgres else ""
            row = db.execute(f"SELECT state FROM jobs WHERE job_id=?{lock}", (job_id,)).fetchone()
            return row is not None and row[0] == JobState.PENDING.value and transition(db, job_id, JobState.QUEUED, "")

    def restart_job(self, job_id: str, reason: str) -> None:
        """An ended job starts again from pending with a fresh attempt budget (an operator's retry)."""
        with self._tx() as db:
            transition(db, job_id, JobState.PENDING, reason, sets="attempts=0, delivery_failures=0, due_at=0")

    def schedule_retry(self, job_id: str, reason: str, due_at: float) -> None:
        """Park the job until `due_at`; the node enqueues it then (retries live in the database, not the broker)."""
        with self._tx() as db:
            transition(db, job_id, JobState.RETRYING, reason, sets="due_at=?", params=(due_at,))

    def wait_for_resource(self, job_id: str, reason: str, *, give_back_attempt: bool) -> None:
        """Park the job until a resource returns (JobState.WAITING); the attempt its claim counted is given back
        (`give_back_attempt`), since running out of disk, memory or broker is not the job's failure."""
        with self._tx() as db:
            refund = "attempts=MAX(attempts-1, 0)" if not db.postgres else "attempts=GREATEST(attempts-1, 0)"
            transition(db, job_id, JobState.WAITING, reason, sets=refund if give_back_attempt else "")

    def jobs_due(self, now: float) -> list[JobRow]:
        rows = self._query(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state=? AND due_at <= ? ORDER BY due_at",
            (JobState.RETRYING.value, now),
        )
        return [job_row(r) for r in rows]

    def supersedes_for(self, job: JobRow) -> str | None:
        """For a pending job: None while an earlier job of its series and model has not ended (that one goes first,
        so results reach the PACS in order); else the latest earlier job delivered to the same destination ("" when
        none), recorded as the job's `supersedes` (a retry sends the same)."""
        if job.revision <= 1:
            return ""
        with self._tx() as db:
            earlier = db.execute(
                "SELECT job_id, state, destination FROM jobs WHERE series_key=? AND model=?"
                " AND revision<? ORDER BY revision DESC",
                (job.series_key, job.model, job.revision),
            )
            rows = earlier.fetchall()
            if any(JobState(state) not in ENDED_JOB_STATES for _, state, _ in rows):
                return None
            supersedes = next(
                (
                    str(job_id)
                    for job_id, state, destination in rows
                    if state in (JobState.DELIVERED.value, JobState.COMMITTED.value) and destination == job.destination
                ),
                "",
            )
            db.execute("UPDATE jobs SET supersedes=? WHERE job_id=?", (supersedes, job.job_id))
        return supersedes

    def claim_job(
        self, job_id: str, owner: str, *, lease_s: float, alive: Callable[[str], bool], max_attempts: int
    ) -> Claim:
        """Mark the job running for `owner` and count an attempt, unless another live owner holds a fresh lease
        (HELD) or it already started `max_attempts` times (EXHAUSTED).

        A broker may deliver a job twice (visibility timeout passed, connection lost and restored): the second
        delivery finds the first still running and must not run it in parallel. An owner that stopped renewing
        its lease, or a process on this host that no longer exists, has lost it.
        """
        now = time.time()
        with self._tx() as db:
            lock = " FOR UPDATE" if db.postgres else ""
            row = db.execute(
                f"SELECT state, owner, updated_at, attempts FROM jobs WHERE job_id=?{lock}", (job_id,)
            ).fetchone()
            if row is None:
                return Claim.UNKNOWN
            state, holder, renewed_at, attempts = row
            if state == JobState.RUNNING.value and held_elsewhere(holder, owner, renewed_at, now, lease_s, alive):
                return Claim.HELD
            if attempts >= max_attempts:
                return Claim.EXHAUSTED
            transition(db, job_id, JobState.RUNNING, "", owner=owner, sets="attempts=attempts+1")
            return Claim.CLAIMED

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
                return True  # nothing to protect; the task reports the unknown job itself
            state, holder, renewed_at = row
            if state == JobState.ENCODED.value and held_elsewhere(holder, owner, renewed_at, now, lease_s, alive):
                return False
            db.execute("UPDATE jobs SET owner=?, updated_at=? WHERE job_id=?", (owner, now, job_id))
            return True

    def release_lease(self, job_id: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET owner='' WHERE job_id=? AND owner=?", (job_id, owner))

    def running_owners(self, updated_before: float) -> list[tuple[JobRow, str, float]]:
        """Running jobs not renewed since `updated_before`: each with its holder and when it last renewed."""
        rows = self._query(
            f"SELECT {JOB_COLUMNS}, owner, updated_at FROM jobs WHERE state=? AND updated_at < ? ORDER BY created_at",
            (JobState.RUNNING.value, updated_before),
        )
        return [(job_row(r), str(r[-2]), float(r[-1])) for r in rows]

    def held_jobs(self, *states: JobState) -> list[tuple[JobRow, str]]:
        """Jobs in these states with a lease holder recorded (a worker runs or sends them), with the holder."""
        marks = ",".join("?" for _ in states)
        rows = self._query(
            f"SELECT {JOB_COLUMNS}, owner FROM jobs WHERE state IN ({marks}) AND owner <> '' ORDER BY created_at",
            [s.value for s in states],
        )
        return [(job_row(r), str(r[-1])) for r in rows]

    def touch_job(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET updated_at=? WHERE job_id=?", (time.time(), job_id))

    def job_events(self, job_id: str) -> list[JobEvent]:
        """The job's timeline, oldest first."""
        rows = self._query(
            "SELECT at, from_state, to_state, reason FROM job_events WHERE job_id=? ORDER BY event_id", (job_id,)
        )
        return [JobEvent(float(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]

    def record_stage(self, job_id: str, model: str, stage: str, seconds: float) -> None:
        """Record how long a stage (load, model, encode, delivery, …) of a job took."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO job_stages (job_id, model, stage, seconds, at) VALUES (?, ?, ?, ?, ?)",
                (job_id, model, stage, seconds, time.time()),
            )

    def stages_since(self, stage_id: int, limit: int = 10_000) -> list[StageTime]:
        """Stage times recorded after `stage_id` (0: from the start), oldest first."""
        rows = self._query(
            "SELECT stage_id, job_id, model, stage, seconds, at FROM job_stages WHERE stage_id > ?"
            " ORDER BY stage_id LIMIT ?",
            (stage_id, limit),
        )
        return [StageTime(int(r[0]), str(r[1]), str(r[2]), str(r[3]), float(r[4]), float(r[5])) for r in rows]
