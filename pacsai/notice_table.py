"""Notices: one row per (job, channel) with the last outcome of sending the job's HL7 or FHIR notice."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pacsai.db import Database

SENT, RETRYING, FAILED = "sent", "retrying", "failed"


@dataclass(frozen=True, slots=True)
class NoticeRow:
    job_id: str
    channel: str  # hl7 | fhir
    status: str  # sent | retrying | failed
    attempts: int
    detail: str  # the receiver's answer: ACK code and text, HTTP status and OperationOutcome text, Location
    urgent: bool
    updated_at: float


class NoticeTable(Database):
    """What each job's notices to the RIS/EHR came to; a notice sent is never sent again."""

    def record_notice(self, job_id: str, channel: str, status: str, detail: str, *, urgent: bool) -> None:
        if status not in (SENT, RETRYING, FAILED):
            raise ValueError(f"unknown notice status {status!r}")
        with self._tx() as db:
            db.execute(
                "INSERT INTO notices VALUES (?, ?, ?, 1, ?, ?, ?) ON CONFLICT(job_id, channel) DO UPDATE SET"
                " status=excluded.status, attempts=notices.attempts+1, detail=excluded.detail,"
                " urgent=excluded.urgent, updated_at=excluded.updated_at",
                (job_id, channel, status, detail[:2000], int(urgent), time.time()),
            )

    def notices(self, job_id: str) -> list[NoticeRow]:
        rows = self._query(
            "SELECT job_id, channel, status, attempts, detail, urgent, updated_at FROM notices WHERE job_id=?"
            " ORDER BY channel",
            (job_id,),
        )
        return [NoticeRow(r[0], r[1], r[2], int(r[3]), r[4], bool(r[5]), float(r[6])) for r in rows]
