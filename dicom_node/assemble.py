"""Completeness: a series is complete after a quiet period, or soon after its sender released the association."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import replace

from dicom_node import audit, deidentify
from dicom_node.route import Rule, SeriesHeader, explain, route
from dicom_node.spool import Spool
from worker.errors import causes
from worker.jobs import JobState, SeriesJob, SeriesState, job_id_for
from worker.logs import log_context
from worker.settings import Settings
from worker.state import JobRow, SeriesRow, State

log = logging.getLogger(__name__)
BROKER_REPORT_EVERY_S = 60.0


def is_complete(row: SeriesRow, now: float, *, quiet_s: float, grace_s: float, open_elsewhere: bool) -> bool:
    """Quiet for quiet_s, or released after its last instance, grace_s ago, and not still open on another link."""
    if now - row.last_received_at >= quiet_s:
        return True
    released = row.released_at is not None and row.released_at >= row.last_received_at
    return released and not open_elsewhere and now - (row.released_at or 0.0) >= grace_s


def destination_for(settings: Settings, calling_ae: str) -> str:
    """Results go to the configured destination, else back to the sender when it is a known peer."""
    if settings.destination:
        return settings.destination
    return calling_ae if settings.peer(calling_ae) else ""


def _revision_note(row: JobRow, supersedes: str) -> str:
    """', revision 2 superseding job 1a2b3c4d' for a later job of a series and model; '' for its first."""
    if row.revision <= 1:
        return ""
    return f", revision {row.revision}" + (f" superseding job {supersedes[:8]}" if supersedes else "")


class Assembler:
    """Background loop: closes complete series, writes manifests, records jobs, enqueues pending jobs."""

    def __init__(self, settings: Settings, state: State, spool: Spool, rules: tuple[Rule, ...],
                 enqueue: Callable[[SeriesJob], None], open_series: Callable[[], Collection[str]],
                 maintain: Callable[[float], None] = lambda now: None, maintain_every_s: float = 10.0,
                 diagnose: Callable[[], str] = lambda: "") -> None:
        self._settings, self._state, self._spool, self._rules = settings, state, spool, rules
        self._enqueue, self._open_series = enqueue, open_series
        self._maintain, self._maintain_every_s, self._maintained_at = maintain, maintain_every_s, 0.0
        self._diagnose = diagnose
        self._broker_failing_since: float | None = None
        self._broker_reported_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pacsai-assembler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.tick(time.time())
            except Exception as exc:  # keep the loop alive; the next tick retries
                log.error("assembler tick failed (%s)", type(exc).__name__)

    def tick(self, now: float) -> None:
        open_series = set(self._open_series())
        for row in self._state.receiving_series():
            if is_complete(row, now, quiet_s=self._settings.quiet_period_s, grace_s=self._settings.release_grace_s,
                           open_elsewhere=row.series_key in open_series):
                with log_context(study=row.study_key[:12], series=row.series_key[:12]):
                    self._close(row)
        self.enqueue_pending()
        if now - self._maintained_at >= self._maintain_every_s:
            self._maintained_at = now
            self._maintain(now)

    def _close(self, row: SeriesRow) -> None:
        instances = self._state.series_instances(row.series_key)
        header = SeriesHeader(
            modality=str(row.header.get("Modality", "")), sop_class=str(row.header.get("SOPClassUID", "")),
            body_part=str(row.header.get("BodyPartExamined", "")),
            series_description=str(row.header.get("SeriesDescription", "")), instances=len(instances),
            calling_ae=row.calling_ae, called_ae=row.called_ae)
        models = route(self._rules, header)
        destination = destination_for(self._settings, row.calling_ae)
        if not models or not destination:
            reason = "no model matches" if not models else "no destination for the calling AE"
            self._state.close_series(row.series_key, SeriesState.NO_MODEL, reason, [])
            self._spool.remove_series(row.study_key, row.series_key)
            audit.record_deleted(self._settings, row.study_key, row.series_key, f"{reason}: inputs deleted")
            log.info("series complete, %d instances, %s: not processed, spool cleaned", len(instances), reason)
            if not models:
                log.info("routing: %s", explain(self._rules, header) or "no rules")
            return
        jobs, refused = [], {}    # type: list[JobRow], dict[str, str]
        for model in models:
            job_id = job_id_for(row.series_key, model, (key for key, _ in instances))
            manifest = self._manifest(row, job_id, model, [p for _, p in instances], refused)
            jobs.append(JobRow(job_id, row.series_key, row.study_key, model, manifest, destination,
                               JobState.PENDING, "", 0))
        new = self._state.close_series(row.series_key, SeriesState.COMPLETE, "", jobs)
        log.info("series complete, %d instances, models %s, %d new job(s)", len(instances), ",".join(models),
                 len(new))
        for job_id in sorted(set(new) & refused.keys()):    # A10: nothing of it may leave for that model
            self._state.set_job(job_id, JobState.FAILED, refused[job_id])
            log.warning("job %s failed: %s", job_id[:8], refused[job_id])

    def _manifest(self, row: SeriesRow, job_id: str, model: str, files: list[str], refused: dict[str, str]) -> str:
        """The job's file list; for a model in PACSAI_DEIDENTIFY_FOR, that of a de-identified copy (A10)."""
        if model not in self._settings.deidentify_for:
            return self._spool.write_manifest(row.study_key, row.series_key, job_id, files)
        try:
            return deidentify.write_copy(self._settings, self._spool, row.study_key, row.series_key, job_id, model,
                                         files)
        except deidentify.NotDeidentifiable as exc:
            refused[job_id] = f"not sent to de-identified model {model}: {exc}"
            return ""

    def enqueue_pending(self) -> None:
        """Put every pending job on the queue; a broker outage leaves them pending for the next tick.

        A later revision of a series and model waits until the earlier jobs have ended, then names the one whose
        delivered results it supersedes (State.supersedes_for).
        """
        for row in self._state.jobs_in(JobState.PENDING):
            supersedes = self._state.supersedes_for(row)
            if supersedes is None:
                continue
            try:
                self._enqueue(replace(row, supersedes=supersedes).to_job())
            except Exception as exc:
                # unreachable, or refusing writes (Redis at maxmemory with noeviction): retried on the next tick
                self._report_broker_failure(exc)
                return
            if self._broker_failing_since is not None:
                log.warning("the broker accepts jobs again after %.0f s", time.time() - self._broker_failing_since)
                self._broker_failing_since = None
            self._state.set_job(row.job_id, JobState.QUEUED)
            log.info("job %s queued for model %s%s", row.job_id[:8], row.model, _revision_note(row, supersedes))

    def _report_broker_failure(self, exc: BaseException) -> None:
        """Log the first failure at once and then once a minute, naming the root cause's type (never its text)."""
        now = time.time()
        if self._broker_failing_since is None:
            self._broker_failing_since = now
        elif now - self._broker_reported_at < BROKER_REPORT_EVERY_S:
            return
        self._broker_reported_at = now
        *_, cause = causes(exc)      # the root: e.g. redis' OutOfMemoryError under kombu's OperationalError
        pending = len(self._state.jobs_in(JobState.PENDING))
        diagnosis = self._diagnose()
        log.error("broker refused or unreachable for %.0f s (%s: %s)%s; %d job(s) wait in the database",
                  now - self._broker_failing_since, type(exc).__name__, type(cause).__name__,
                  f": {diagnosis}" if diagnosis else "", pending)
