"""Feedback: a radiologist's correction (a returned SEG) or rejection (a KOS) of a job's result, one row each."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pacsai.db import Database
from pacsai.job_table import JOB_COLUMNS, JobRow, job_row

_SCHEMA = """CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL, segments TEXT NOT NULL, corrected_file TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL)"""


class FeedbackKind(StrEnum):
    CORRECTED = "corrected"  # an edited SEG came back: the job's result was accepted with corrections
    REJECTED = "rejected"  # a KOS 'Rejected for Quality/Patient Safety Reasons' named the result


@dataclass(frozen=True, slots=True)
class SegmentAgreement:
    """One segment of our SEG against the corrected one: Dice and the volumes in mL (0 where a side lacks it)."""

    label: str
    dice: float
    ours_ml: float
    theirs_ml: float

    @property
    def volume_diff_ml(self) -> float:
        """Corrected minus ours: positive when the radiologist added tissue."""
        return self.theirs_ml - self.ours_ml


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    feedback_id: str  # keyed hash of the returned instance and the job: the same object sent again replaces it
    job_id: str
    model: str
    model_version: str
    kind: FeedbackKind
    detail: str  # the rejection's reason (code meaning) or what was corrected; never patient data
    segments: tuple[SegmentAgreement, ...]
    corrected_file: str = ""  # the returned SEG as kept, relative to the data dir ('' for a rejection)
    received_at: float = 0.0

    @property
    def mean_dice(self) -> float | None:
        return sum(s.dice for s in self.segments) / len(self.segments) if self.segments else None


@dataclass(frozen=True, slots=True)
class Agreement:
    """Feedback on one model version: corrections, rejections and the mean Dice over corrected segments."""

    model: str
    model_version: str
    corrected: int
    rejected: int
    mean_dice: float | None
    dices: tuple[float, ...]


def _segments_json(segments: tuple[SegmentAgreement, ...]) -> str:
    return json.dumps(
        [
            {"label": s.label, "dice": s.dice, "ours_ml": s.ours_ml, "theirs_ml": s.theirs_ml,
             "volume_diff_ml": s.volume_diff_ml}
            for s in segments
        ]
    )  # fmt: skip


def _row(r: tuple[Any, ...]) -> FeedbackRow:
    segments = tuple(
        SegmentAgreement(s["label"], float(s["dice"]), float(s["ours_ml"]), float(s["theirs_ml"]))
        for s in json.loads(r[6])
    )
    return FeedbackRow(r[0], r[1], r[2], r[3], FeedbackKind(r[4]), r[5], segments, r[7], float(r[8]))


_COLUMNS = "feedback_id, job_id, model, model_version, kind, detail, segments, corrected_file, received_at"


class FeedbackTable(Database):
    """What radiologists sent back about our results (table `feedback`, made here when missing)."""

    def __init__(self, target: Any) -> None:
        super().__init__(target)
        with self._tx() as db:
            db.execute(_SCHEMA)

    def record_feedback(self, row: FeedbackRow) -> None:
        """Insert or replace (the same returned object again) one feedback row."""
        with self._tx() as db:
            db.execute("DELETE FROM feedback WHERE feedback_id=?", (row.feedback_id,))
            db.execute(
                f"INSERT INTO feedback ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.feedback_id, row.job_id, row.model, row.model_version, row.kind.value, row.detail,
                 _segments_json(row.segments), row.corrected_file, row.received_at or time.time()),
            )  # fmt: skip

    def feedback(self, job_id: str = "") -> list[FeedbackRow]:
        """Feedback on one job, or on all jobs when job_id is empty; oldest first."""
        where, params = ("WHERE job_id=?", (job_id,)) if job_id else ("", ())
        rows = self._query(f"SELECT {_COLUMNS} FROM feedback {where} ORDER BY received_at", params)
        return [_row(r) for r in rows]

    def agreement(self) -> list[Agreement]:
        """Per model and version: corrected and rejected counts and the corrected segments' Dice values."""
        groups: dict[tuple[str, str], list[FeedbackRow]] = {}
        for row in self.feedback():
            groups.setdefault((row.model, row.model_version), []).append(row)
        result = []
        for (model, version), rows in sorted(groups.items()):
            dices = tuple(s.dice for r in rows if r.kind is FeedbackKind.CORRECTED for s in r.segments)
            corrected = sum(r.kind is FeedbackKind.CORRECTED for r in rows)
            mean = sum(dices) / len(dices) if dices else None
            result.append(Agreement(model, version, corrected, len(rows) - corrected, mean, dices))
        return result

    def feedback_files(self, job_ids: Sequence[str]) -> list[str]:
        """The kept returned SEGs (relative to the data dir) of these jobs' corrections."""
        marks = ",".join("?" for _ in job_ids)
        query = f"SELECT corrected_file FROM feedback WHERE corrected_file<>'' AND job_id IN ({marks})"
        return [str(r[0]) for r in self._query(query, tuple(job_ids))] if job_ids else []

    def forget_feedback_files(self, job_ids: Sequence[str]) -> None:
        """Retention deleted these jobs' returned SEGs: the rows keep their numbers (Dice, volumes), not the file."""
        if not job_ids:
            return
        marks = ",".join("?" for _ in job_ids)
        with self._tx() as db:
            db.execute(f"UPDATE feedback SET corrected_file='' WHERE job_id IN ({marks})", tuple(job_ids))

    def jobs_of_study(self, study_key: str) -> list[JobRow]:
        """Every job made from a series of the study (a KOS names results by study)."""
        rows = self._query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE study_key=? ORDER BY created_at", (study_key,))
        return [job_row(r) for r in rows]
