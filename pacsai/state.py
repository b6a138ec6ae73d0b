"""System of record: instances, series, jobs and deliveries; SQLite by default, PostgreSQL when given a URL.

`State` joins the tables' operations (pacsai.series_table, job_table, delivery_table, notice_table) on one
connection (pacsai.db), with commitment_table (proof of delivery) and feedback_table (radiologists' corrections).
Every change of a job's, series' or delivery's state is checked against the transition tables in pacsai.jobs.
"""

from __future__ import annotations

from pacsai.commitment_table import CommitmentTable
from pacsai.delivery_table import DeliveryTable
from pacsai.feedback_table import FeedbackTable
from pacsai.job_table import JobEvent, JobRow, JobTable, StageTime
from pacsai.notice_table import NoticeTable
from pacsai.series_table import SeriesRow, SeriesTable

__all__ = ["JobEvent", "JobRow", "SeriesRow", "StageTime", "State"]


class State(SeriesTable, JobTable, DeliveryTable, NoticeTable, CommitmentTable, FeedbackTable):
    """The database, with every table's operations (thread-safe; each write committed before it returns)."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts per state for series, jobs, deliveries and notices, and the number of instances (`pacsai status`)."""
        result: dict[str, dict[str, int]] = {"series": {}, "jobs": {}, "deliveries": {}, "notices": {}}
        for table in ("series", "jobs"):
            for state, count in self._query(f"SELECT state, COUNT(*) FROM {table} GROUP BY state"):
                result[table][state] = count
        for status, count in self._query("SELECT status, COUNT(*) FROM deliveries GROUP BY status"):
            result["deliveries"][status] = count
        for channel, status, count in self._query("SELECT channel, status, COUNT(*) FROM notices GROUP BY 1, 2"):
            result["notices"][f"{channel}_{status}"] = count  # HL7/FHIR notices to the RIS/EHR: hl7_sent, fhir_failed
        rows = self._query("SELECT status, COUNT(*) FROM verified_instances GROUP BY status")
        result["confirmations"] = {str(status): int(count) for status, count in rows}  # proof of delivery, per result
        result["instances"] = {"received": self._query("SELECT COUNT(*) FROM instances")[0][0]}
        return result
