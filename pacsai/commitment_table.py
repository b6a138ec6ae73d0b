"""Proof of delivery: per job, each delivered result instance and whether the destination confirmed it (storage
commitment or C-FIND), and the requests made for it, each under its Transaction UID (kept across restarts)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pacsai.db import Connection, Database
from pacsai.job_table import transition
from pacsai.jobs import JobState


class Confirmation(StrEnum):
    """One result instance at the destination: asked about, confirmed, or reported missing/failed."""

    PENDING = "pending"
    COMMITTED = "committed"
    FAILED = "failed"


class Request(StrEnum):
    """A storage commitment request or C-FIND: waiting for its answer, answered, or superseded/given up."""

    REQUESTED = "requested"  # due_at: the answer's deadline
    ANSWERED = "answered"  # due_at: when instances not confirmed are sent and asked about again
    CLOSED = "closed"


VERIFICATION_STATES = ("verifying", "committed", "failed")  # a job's proof of delivery (verification_counts)


@dataclass(frozen=True, slots=True)
class ResultInstance:
    """One delivered result instance (UIDs as sent, read from the file)."""

    file: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    status: Confirmation = Confirmation.PENDING
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Verification:
    """One request (the latest of its job when open)."""

    transaction_uid: str
    job_id: str
    destination: str
    method: str  # commitment | query (pacsai.profiles.Verify)
    attempt: int
    state: Request
    due_at: float


@dataclass(frozen=True, slots=True)
class Tally:
    """A job's instances after an answer: all confirmed (the job is now committed), or how many are not."""

    job_id: str
    confirmed: int
    failed: int
    pending: int

    @property
    def all_confirmed(self) -> bool:
        return self.failed == 0 and self.pending == 0


class CommitmentTable(Database):
    """Verification requests and the confirmation of each result instance (tables `verifications`,
    `verified_instances`; schema in pacsai.db)."""

    def start_verification(self, request: Verification, instances: Sequence[ResultInstance]) -> None:
        """A new request for the job (its first, or after a re-delivery): earlier requests and instances go."""
        with self._tx() as db:
            db.execute("DELETE FROM verified_instances WHERE job_id=?", (request.job_id,))
            db.execute("DELETE FROM verifications WHERE job_id=?", (request.job_id,))
            _insert_request(db, request)
            db.executemany(
                "INSERT INTO verified_instances VALUES (?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                [
                    (
                        request.job_id,
                        i.file,
                        i.sop_class_uid,
                        i.sop_instance_uid,
                        i.study_uid,
                        i.series_uid,
                        Confirmation.PENDING.value,
                        request.transaction_uid,
                        time.time(),
                    )
                    for i in instances
                ],
            )

    def next_verification(self, request: Verification) -> None:
        """Ask again (request.attempt counts): the job's open requests close; its unconfirmed instances are asked
        about under the new Transaction UID."""
        with self._tx() as db:
            db.execute("UPDATE verifications SET state=? WHERE job_id=?", (Request.CLOSED.value, request.job_id))
            _insert_request(db, request)
            db.execute(
                "UPDATE verified_instances SET status=?, transaction_uid=?, updated_at=? WHERE job_id=? AND status<>?",
                (
                    Confirmation.PENDING.value,
                    request.transaction_uid,
                    time.time(),
                    request.job_id,
                    Confirmation.COMMITTED.value,
                ),
            )

    def record_confirmations(
        self,
        transaction_uid: str,
        confirmed: Sequence[str],
        failed: Sequence[tuple[str, str]],
        retry_at: float,
        *,
        reporter: str = "",
    ) -> Tally | None:
        """An answer to a request: instances confirmed (SOP Instance UIDs) and failed (UID, why). When every
        instance of the job is confirmed the delivered job becomes committed in the same commit. None: no open
        request has this Transaction UID (unknown, superseded by a later one, or asked of a peer other than
        `reporter` when given)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT job_id, destination FROM verifications WHERE transaction_uid=? AND state<>?",
                (transaction_uid, Request.CLOSED.value),
            ).fetchone()
            if row is None or (reporter and row[1] != reporter):
                return None
            job_id, destination = str(row[0]), str(row[1])
            update = "UPDATE verified_instances SET status=?, detail=?, updated_at=? WHERE transaction_uid=?"
            for uid in confirmed:
                db.execute(
                    update + " AND sop_instance_uid=?", (Confirmation.COMMITTED.value, "", now, transaction_uid, uid)
                )
            for uid, why in failed:
                db.execute(
                    update + " AND sop_instance_uid=?", (Confirmation.FAILED.value, why, now, transaction_uid, uid)
                )
            db.execute(
                "UPDATE verifications SET state=?, due_at=? WHERE transaction_uid=?",
                (Request.ANSWERED.value, retry_at, transaction_uid),
            )
            tally = _tally(db, job_id)
            state = db.execute("SELECT state FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if tally.all_confirmed and state is not None and state[0] == JobState.DELIVERED.value:
                why = f"{tally.confirmed} result instance(s) confirmed by {destination}"
                transition(db, job_id, JobState.COMMITTED, why)
                db.execute("UPDATE verifications SET state=? WHERE job_id=?", (Request.CLOSED.value, job_id))
            return tally

    def close_verification(self, job_id: str, reason: str) -> None:
        """Give up on the job's proof of delivery: its requests close and the reason goes on the (delivered) job."""
        with self._tx() as db:
            db.execute("UPDATE verifications SET state=? WHERE job_id=?", (Request.CLOSED.value, job_id))
            db.execute("UPDATE jobs SET reason=?, updated_at=? WHERE job_id=?", (reason, time.time(), job_id))

    def verifications_due(self, now: float) -> list[Verification]:
        """Open requests past their deadline (no answer) or answered with instances not confirmed, due again."""
        rows = self._query(
            "SELECT transaction_uid, job_id, destination, method, attempt, state, due_at FROM verifications"
            " WHERE state<>? AND due_at<=? ORDER BY due_at",
            (Request.CLOSED.value, now),
        )
        return [Verification(r[0], r[1], r[2], r[3], int(r[4]), Request(r[5]), float(r[6])) for r in rows]

    def verification_counts(self) -> dict[str, int]:
        """Jobs with a proof of delivery by how it stands: verifying (a request open), committed (every instance
        confirmed), failed (given up: the job stays delivered with the reason). A job re-delivered since is none."""
        rows = self._query(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM verifications o WHERE o.job_id=j.job_id AND o.state<>?)"
            " THEN 'verifying' WHEN j.state=? THEN 'committed' WHEN j.state=? THEN 'failed' ELSE '' END, COUNT(*)"
            " FROM jobs j WHERE EXISTS (SELECT 1 FROM verifications v WHERE v.job_id=j.job_id) GROUP BY 1",
            (Request.CLOSED.value, JobState.COMMITTED.value, JobState.DELIVERED.value),
        )
        counts = dict.fromkeys(VERIFICATION_STATES, 0)
        counts.update({str(state): int(count) for state, count in rows if state})
        return counts

    def result_instances(self, job_id: str) -> list[ResultInstance]:
        rows = self._query(
            "SELECT file, sop_class_uid, sop_instance_uid, study_uid, series_uid, status, detail"
            " FROM verified_instances WHERE job_id=? ORDER BY file",
            (job_id,),
        )
        return [ResultInstance(r[0], r[1], r[2], r[3], r[4], Confirmation(r[5]), r[6]) for r in rows]


def _tally(db: Connection, job_id: str) -> Tally:
    rows = db.execute("SELECT status, COUNT(*) FROM verified_instances WHERE job_id=? GROUP BY status", (job_id,))
    counts = {str(status): int(count) for status, count in rows.fetchall()}
    return Tally(
        job_id,
        counts.get(Confirmation.COMMITTED.value, 0),
        counts.get(Confirmation.FAILED.value, 0),
        counts.get(Confirmation.PENDING.value, 0),
    )


def _insert_request(db: Connection, request: Verification) -> None:
    db.execute(
        "INSERT INTO verifications VALUES (?, ?, ?, ?, ?, ?, ?, ?, '')",
        (
            request.transaction_uid,
            request.job_id,
            request.destination,
            request.method,
            request.attempt,
            request.state.value,
            time.time(),
            request.due_at,
        ),
    )
