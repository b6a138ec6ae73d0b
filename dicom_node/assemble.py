"""Completeness: a series is complete after a quiet period, or soon after its sender released the association."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace

from dicom_node import deidentify, feedback
from dicom_node.route import Rule, SeriesHeader, explain, route_jobs
from pacsai import audit
from pacsai.errors import causes
from pacsai.jobs import JobState, Priority, SeriesJob, SeriesState, job_id_for
from pacsai.logs import log_context
from pacsai.settings import QueueSettings, Settings
from pacsai.state import JobRow, SeriesRow, State
from pacsai.storage import Spool

log = logging.getLogger(__name__)
TICK_S = 0.5  # the assembler looks at receiving series this often (and when nudged)
BROKER_REPORT_EVERY_S = 60.0
_DECLARED_KEYWORDS = ("NumberOfFrames", "ImagesInAcquisition", "NumberOfTemporalPositions")  # store_instance keeps them


def is_complete(
    row: SeriesRow, now: float, *, quiet_s: float, grace_s: float, open_elsewhere: bool, whole: bool = False
) -> bool:
    """Quiet for quiet_s, or released after its last instance, grace_s ago (at once when `whole`: it holds as many
    instances as it declares, see declared_instances), and not still open on another link."""
    if now - row.last_received_at >= quiet_s:
        return True
    released = row.released_at is not None and row.released_at >= row.last_received_at
    return released and not open_elsewhere and (whole or now - (row.released_at or 0.0) >= grace_s)


def released_early(row: SeriesRow) -> bool:
    """Whether the series was released after its last instance, so that its declared size may end the grace."""
    return row.released_at is not None and row.released_at >= row.last_received_at


def declared_instances(header: Mapping[str, object]) -> int | None:
    """How many instances the series says it holds, from its first instance's header; None: it does not say.

    A multi-frame image (NumberOfFrames > 1) holds its slices as frames: one instance. Otherwise Images in
    Acquisition, times Number of Temporal Positions when the acquisition count does not include the time points
    (it does when it is a multiple of them: GE counts every image of a dynamic series, Siemens those of one
    position); a series of several acquisitions then holds more and waits out the grace, as does one without it.
    """
    frames, images, temporal = (_positive(header.get(k)) for k in _DECLARED_KEYWORDS)
    if frames is not None and frames > 1:
        return 1
    if images is None:
        return None
    if temporal is not None and temporal > 1 and images % temporal:
        return images * temporal
    return images


def _positive(value: object) -> int | None:
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if number > 0 else None


def destination_for(settings: Settings, calling_ae: str) -> str:
    """Results go to the configured destination, else back to the sender when it is a known peer (a STOW-RS
    sender's user name may name a DICOMweb peer)."""
    if settings.delivery.destination:
        return settings.delivery.destination
    return calling_ae if settings.delivery.peer(calling_ae) or settings.delivery.web_peer(calling_ae) else ""


def dispatchable(state: State, queue: QueueSettings, now: time.struct_time) -> list[JobRow]:
    """The pending jobs to put on the broker now, most urgent and oldest first, within each model's window."""
    off_peak = in_window(queue.off_peak, now)
    pending = [r for r in state.jobs_in(JobState.PENDING) if r.priority is not Priority.BACKGROUND or off_peak]
    pending.sort(key=lambda r: r.priority.rank)  # stable: oldest first within a priority
    if not queue.dispatch_window:
        return pending
    room = Counter({model: queue.dispatch_window for model in {r.model for r in pending}})
    room.subtract(r.model for r in state.jobs_in(JobState.QUEUED))
    chosen = []
    for row in pending:  # a STAT job never waits for room: it goes at once, to the queue workers take first
        if room[row.model] > 0 or row.priority is Priority.STAT:
            room[row.model] -= 1
            chosen.append(row)
    return chosen


def in_window(window: tuple[int, int] | None, now: time.struct_time) -> bool:
    """Whether the local time falls in an (start, end) window of minutes after midnight, which may wrap midnight."""
    if window is None:
        return True
    minute, (start, end) = now.tm_hour * 60 + now.tm_min, window
    return start <= minute < end if start <= end else minute >= start or minute < end


def _revision_note(row: JobRow, supersedes: str) -> str:
    """', revision 2 superseding job 1a2b3c4d' for a later job of a series and model; '' for its first."""
    if row.revision <= 1:
        return ""
    return f", revision {row.revision}" + (f" superseding job {supersedes[:8]}" if supersedes else "")


class Assembler:
    """Background loop: closes complete series, writes manifests, records jobs, enqueues pending jobs."""

    def __init__(
        self,
        settings: Settings,
        state: State,
        spool: Spool,
        rules: tuple[Rule, ...],
        enqueue: Callable[[SeriesJob], None],
        open_series: Callable[[], Collection[str]],
        maintain: Callable[[float], None] = lambda now: None,
        maintain_every_s: float = 10.0,
        diagnose: Callable[[], str] = lambda: "",
    ) -> None:
        self._settings, self._state, self._spool, self._rules = settings, state, spool, rules
        self._enqueue, self._open_series = enqueue, open_series
        self._maintain, self._maintain_every_s, self._maintained_at = maintain, maintain_every_s, 0.0
        self._diagnose = diagnose
        self._broker_failing_since: float | None = None
        self._broker_reported_at = 0.0
        self._stop = threading.Event()
        self._nudged = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pacsai-assembler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._nudged.set()
        self._thread.join(timeout=10)

    def nudge(self) -> None:
        """Tick now rather than at the next half second (a sender released its association: its series may be
        complete by its declared count, goal 4 of issue 11)."""
        self._nudged.set()

    def _loop(self) -> None:
        while True:
            self._nudged.wait(TICK_S)
            self._nudged.clear()
            if self._stop.is_set():
                return
            try:
                self.tick(time.time())
            except Exception as exc:  # keep the loop alive; the next tick retries
                log.error("assembler tick failed (%s)", type(exc).__name__)

    def tick(self, now: float) -> None:
        open_series = set(self._open_series())
        for row in self._state.receiving_series():
            whole = self._whole(row)
            if is_complete(
                row,
                now,
                quiet_s=self._settings.node.quiet_period_s,
                grace_s=self._settings.node.release_grace_s,
                open_elsewhere=row.series_key in open_series,
                whole=whole,
            ):
                with log_context(study=row.study_key[:12], series=row.series_key[:12]):
                    if whole:
                        log.info("series released with as many instances as it declares: complete at once")
                    self._close(row)
        self.enqueue_pending()
        if now - self._maintained_at >= self._maintain_every_s:
            self._maintained_at = now
            self._maintain(now)

    def _whole(self, row: SeriesRow) -> bool:
        """Released, and holding as many instances as it declares: complete without waiting out the grace."""
        if not self._settings.node.complete_on_declared_count or not released_early(row):
            return False
        if (declared := declared_instances(row.header)) is None:
            return False
        return self._state.instance_count(row.series_key) == declared

    def _close(self, row: SeriesRow) -> None:
        instances = self._state.series_instances(row.series_key)
        if feedback.is_returned(row.header):  # a corrected SEG or a rejecting KOS: recorded, never inferred on
            reason = feedback.take(self._settings, self._state, self._spool, row, [p for _, p in instances])
            self._state.close_series(row.series_key, SeriesState.NO_MODEL, reason, [])
            self._spool.remove_series(row.study_key, row.series_key)
            audit.record_deleted(self._settings, row.study_key, row.series_key, f"{reason}: inputs deleted")
            log.info("series complete, %d instances, %s", len(instances), reason)
            return
        header = SeriesHeader(
            modality=str(row.header.get("Modality", "")),
            sop_class=str(row.header.get("SOPClassUID", "")),
            body_part=str(row.header.get("BodyPartExamined", "")),
            series_description=str(row.header.get("SeriesDescription", "")),
            instances=len(instances),
            calling_ae=row.calling_ae,
            called_ae=row.called_ae,
            study_description=str(row.header.get("StudyDescription", "")),
            requested_procedure_priority=str(row.header.get("RequestedProcedurePriority", "")).upper(),
            store_priority=str(row.header.get("store_priority", "")),
        )
        routed = dict(route_jobs(self._rules, header))
        models = tuple(routed)
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
        jobs, refused = [], {}  # type: list[SeriesJob], dict[str, str]
        for model in models:
            job_id = job_id_for(row.series_key, model, (key for key, _ in instances))
            manifest = self._manifest(row, job_id, model, [p for _, p in instances], refused)
            job = SeriesJob(job_id, row.study_key, row.series_key, model, manifest, destination, priority=routed[model])
            jobs.append(job)
        new = self._state.close_series(row.series_key, SeriesState.COMPLETE, "", jobs)
        log.info(
            "series complete, %d instances, models %s, %d new job(s)%s",
            len(instances),
            ",".join(models),
            len(new),
            "".join(f", {model} {p.value}" for model, p in routed.items() if p is not Priority.ROUTINE),
        )
        for job_id in sorted(set(new) & refused.keys()):  # A10: nothing of it may leave for that model
            self._state.set_job(job_id, JobState.FAILED, refused[job_id])
            log.warning("job %s failed: %s", job_id[:8], refused[job_id])

    def _manifest(self, row: SeriesRow, job_id: str, model: str, files: list[str], refused: dict[str, str]) -> str:
        """The job's file list; for a model in PACSAI_DEIDENTIFY_FOR, that of a de-identified copy (A10)."""
        if model not in self._settings.worker.deidentify_for:
            return self._spool.write_manifest(row.study_key, row.series_key, job_id, files)
        try:
            return deidentify.write_copy(
                self._settings, self._spool, row.study_key, row.series_key, job_id, model, files
            )
        except deidentify.NotDeidentifiable as exc:
            refused[job_id] = f"not sent to de-identified model {model}: {exc}"
            return ""

    def enqueue_pending(self) -> None:
        """Put pending jobs on their queues, most urgent first; a broker outage leaves them pending for the next tick.

        At most PACSAI_DISPATCH_WINDOW jobs of one model wait in the broker (0: no limit): the rest wait here, so a
        STAT job that arrives later overtakes them. Background jobs wait for the off-peak window. A later revision
        of a series and model waits until the earlier jobs have ended, then names the one whose delivered results
        it supersedes (State.supersedes_for).
        """
        for row in dispatchable(self._state, self._settings.queue, time.localtime()):
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
            if self._state.mark_queued(row.job_id):  # else a worker took it already
                log.info("job %s queued for model %s%s", row.job_id[:8], row.model, _revision_note(row, supersedes))

    def _report_broker_failure(self, exc: BaseException) -> None:
        """Log the first failure at once and then once a minute, naming the root cause's type (never its text)."""
        now = time.time()
        if self._broker_failing_since is None:
            self._broker_failing_since = now
        elif now - self._broker_reported_at < BROKER_REPORT_EVERY_S:
            return
        self._broker_reported_at = now
        *_, cause = causes(exc)  # the root: e.g. redis' OutOfMemoryError under kombu's OperationalError
        pending = len(self._state.jobs_in(JobState.PENDING))
        diagnosis = self._diagnose()
        log.error(
            "broker refused or unreachable for %.0f s (%s: %s)%s; %d job(s) wait in the database",
            now - self._broker_failing_since,
            type(exc).__name__,
            type(cause).__name__,
            f": {diagnosis}" if diagnosis else "",
            pending,
        )
