"""Deliveries: one row per (job, result file) with the last outcome of sending it, checked against the table."""

from __future__ import annotations

import time

from pacsai.db import Database
from pacsai.jobs import DELIVERY_TRANSITIONS, DeliveryStatus, JobState, check_transition


class DeliveryTable(Database):
    """What was sent where, with the last DIMSE outcome, and the count of failed attempts per job."""

    def record_delivery(self, job_id: str, file: str, destination: str, status: str, detail: str) -> None:
        """Record one attempt at sending `file`; `status` is a DeliveryStatus value (IllegalTransition when the
        file's last status does not allow it, e.g. a stored file reported refused)."""
        new = DeliveryStatus(status)
        with self._tx() as db:
            row = db.execute("SELECT status FROM deliveries WHERE job_id=? AND file=?", (job_id, file)).fetchone()
            check_transition(DELIVERY_TRANSITIONS, DeliveryStatus(row[0]) if row else None, new, f"delivery {file}")
            db.execute(
                "INSERT INTO deliveries VALUES (?, ?, ?, ?, 1, ?, ?) ON CONFLICT(job_id, file) DO UPDATE SET"
                " status=excluded.status, attempts=deliveries.attempts+1, detail=excluded.detail,"
                " updated_at=excluded.updated_at",
                (job_id, file, destination, new.value, detail, time.time()),
            )

    def deliveries(self, job_id: str) -> list[tuple[str, str, int, str]]:
        rows = self._query(
            "SELECT file, status, attempts, detail FROM deliveries WHERE job_id=? ORDER BY file", (job_id,)
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def peer_took_seg(self, destination: str) -> bool | None:
        """Whether the last SEG sent to this peer was stored (True), refused for its SOP class (False), or None
        when none was sent yet: the worker makes a SEG fallback's overlays unless the peer is known to take SEG."""
        rows = self._query(
            "SELECT status FROM deliveries WHERE destination=? AND file='seg.dcm' AND status IN (?, ?, ?)"
            " ORDER BY updated_at DESC LIMIT 1",
            (destination, DeliveryStatus.SUCCESS.value, DeliveryStatus.WARNING.value, DeliveryStatus.FALLBACK.value),
        )
        return None if not rows else rows[0][0] != DeliveryStatus.FALLBACK.value

    def failing_deliveries(self, alert_after_failures: int) -> int:
        """Jobs still being retried whose delivery failed at least this many times in a row."""
        rows = self._query(
            "SELECT COUNT(*) FROM jobs WHERE state=? AND delivery_failures >= ?",
            (JobState.ENCODED.value, alert_after_failures),
        )
        return int(rows[0][0])

    def note_delivery_failure(self, job_id: str, reason: str) -> int:
        """Record a failed delivery attempt (job stays encoded); return the number of failures so far."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET delivery_failures=delivery_failures+1, reason=?, updated_at=? WHERE job_id=?",
                (reason, time.time(), job_id),
            )
            return int(db.execute("SELECT delivery_failures FROM jobs WHERE job_id=?", (job_id,)).fetchone()[0])
