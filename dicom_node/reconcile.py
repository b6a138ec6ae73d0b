"""Reconciler and cleaner: the database is the truth, the broker only a transport.

- jobs the database says are queued (or running, or encoded) but the broker no longer holds are enqueued again;
- work held by a process of this host that no longer exists (killed, crashed) is enqueued again at once;
- jobs waiting for a resource (disk, host memory, broker) resume when it is back, with an ALERT once a minute;
- spool files written but never recorded (a crash between write and record) are recorded, temp files removed;
- spooled inputs and outbox results of ended jobs are deleted after the retention period, never before.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import dcmread

from dicom_node.receive import header_of
from pacsai import audit, lease
from pacsai.enqueue import infer_queues
from pacsai.errors import Resource
from pacsai.jobs import Delivery, JobState, SeriesJob, SeriesState
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool, SpooledInstance

log = logging.getLogger(__name__)
ALERT_EVERY_S = 60.0  # an ALERT per resource at most this often while jobs wait for it
RESUME_AFTER_S = {Resource.DISK: 5.0, Resource.MEMORY: 30.0, Resource.BROKER: 5.0}  # least wait before a resume
_alerted_at: dict[Resource, float] = {}


@dataclass(frozen=True, slots=True)
class Queues:
    """What the reconciler needs from the broker: queue depths (None when unknown) and the two producers."""

    depth: Callable[[str], int | None]
    enqueue_job: Callable[[SeriesJob], None]
    enqueue_delivery: Callable[[Delivery], None]


def requeue_lost(state: State, settings: Settings, queues: Queues, now: float) -> int:
    """Enqueue again the jobs that the broker lost (flushed, restarted without persistence, …); return how many."""
    requeued = 0
    for row in state.jobs_due(now):  # parked by a worker after a failed attempt: the broker holds no copy
        queues.enqueue_job(row.to_job())
        state.set_job(row.job_id, JobState.QUEUED, row.reason)
        requeued += 1
    stale_queued = state.jobs_in(JobState.QUEUED, updated_before=now - settings.queue.requeue_after_s)
    # a running job's holder renews its lease; one that stopped (killed, hard time limit) has lost the job
    stale_running = [
        row
        for row, holder, renewed_at in state.running_owners(now - settings.queue.requeue_after_s)
        if not lease.alive(holder) or now - renewed_at > lease.LEASE_S
    ]
    empty: dict[str, bool] = {}
    for row in [*stale_queued, *stale_running]:
        if row.model not in empty:
            empty[row.model] = all(queues.depth(queue) == 0 for queue in infer_queues(row.model))
        if empty[row.model]:
            queues.enqueue_job(row.to_job())
            state.set_job(row.job_id, JobState.QUEUED, "enqueued again by the reconciler")
            requeued += 1
    if queues.depth("deliver") == 0:
        stale = state.jobs_in(JobState.ENCODED, updated_before=now - settings.delivery.send_backoff_max_s - 120)
        for row in stale:
            queues.enqueue_delivery(Delivery(row.job_id, row.destination))
            state.touch_job(row.job_id)
            requeued += 1
    if requeued:
        log.warning("reconciler enqueued %d job(s) again (due retries, or lost by the broker)", requeued)
    return requeued


def resume_orphaned(state: State, queues: Queues, *, alive: Callable[[str], bool] = lease.alive) -> int:
    """Work held by a process of this host that no longer exists goes back on the queue now, not after the requeue
    delay or the send back-off: an inference (running) is queued again, a delivery (encoded) sent again."""
    resumed = 0
    for row, holder in state.held_jobs(JobState.RUNNING, JobState.ENCODED):
        if alive(holder):
            continue
        if row.state is JobState.RUNNING:
            state.set_job(row.job_id, JobState.QUEUED, "resumed: the process running it is gone")
            queues.enqueue_job(row.to_job())
        else:
            state.release_lease(row.job_id, holder)
            queues.enqueue_delivery(Delivery(row.job_id, row.destination))
        resumed += 1
    if resumed:
        log.warning("resumed %d job(s) whose process on this host is gone", resumed)
    return resumed


def resume_waiting(
    state: State, settings: Settings, queues: Queues, now: float, *, free_bytes: Callable[[], int] | None = None
) -> int:
    """Jobs waiting for a resource resume when it is back: disk when free space is above the reserve (with some
    headroom), host memory after a while (the worker checks again, no attempt spent), the broker when it takes the
    message. An inference goes back to queued, a delivery to encoded. Otherwise an ALERT once a minute."""
    waiting: dict[Resource, list[JobRow]] = {}
    for row in state.jobs_in(JobState.WAITING):
        waiting.setdefault(Resource.of_reason(row.reason) or Resource.BROKER, []).append(row)
    resumed = 0
    for resource, rows in waiting.items():
        settled = {row.job_id for row in state.jobs_in(JobState.WAITING, updated_before=now - RESUME_AFTER_S[resource])}
        problem = _still_missing(resource, settings, free_bytes)
        back = 0 if problem else sum(_resume(state, queues, row) for row in rows if row.job_id in settled)
        if back < len(rows):
            _alert(resource, rows, problem, now)
        resumed += back
    if resumed:
        log.warning("resumed %d job(s) that waited for a resource", resumed)
    return resumed


def _still_missing(resource: Resource, settings: Settings, free_bytes: Callable[[], int] | None) -> str:
    """What is still missing ('' when the resource looks back)."""
    if resource is not Resource.DISK:
        return ""  # memory: the worker checks again; the broker: taking the message is the check
    reserve = settings.storage.spool_reserve_bytes
    free = free_bytes() if free_bytes is not None else shutil.disk_usage(settings.storage.data_dir).free
    if free >= reserve + max(reserve // 4, 1 << 20):
        return ""
    return f"{free >> 20} MB free, reserve {reserve >> 20} MB (PACSAI_SPOOL_RESERVE_MB)"


def _resume(state: State, queues: Queues, row: JobRow) -> int:
    """Back to where it waited: queued for inference, or encoded with a delivery message. 0 when the broker fails."""
    events = state.job_events(row.job_id)
    delivery = bool(events) and events[-1].from_state == JobState.ENCODED.value
    try:
        if delivery:
            state.set_job(row.job_id, JobState.ENCODED, "resumed: the resource is back")
            queues.enqueue_delivery(Delivery(row.job_id, row.destination))
        else:
            state.set_job(row.job_id, JobState.QUEUED, "resumed: the resource is back")
            queues.enqueue_job(row.to_job())
    except Exception as exc:  # the broker is full or down: wait for it
        log.warning("broker refused a resumed job (%s)", type(exc).__name__)
        state.set_job(row.job_id, JobState.WAITING, f"{Resource.BROKER.waiting_reason} ({type(exc).__name__})")
        return 0
    return 1


def _alert(resource: Resource, rows: Sequence[JobRow], problem: str, now: float) -> None:
    if now - _alerted_at.get(resource, 0.0) < ALERT_EVERY_S:
        return
    _alerted_at[resource] = now
    detail = f": {problem}" if problem else ""
    log.error("ALERT: %d job(s) %s%s; they resume by themselves when it is back", len(rows), rows[0].reason, detail)


def recover_spool(state: State, spool: Spool) -> int:
    """At start: remove partial temp files and record complete files that were never recorded; return how many."""
    for tmp in spool.root.glob("*/*/.*.tmp"):
        tmp.unlink(missing_ok=True)
    known = state.instance_paths()
    recovered = 0
    for path in sorted(spool.root.glob("*/*/*.dcm")):
        relative = str(path.relative_to(spool.root))
        if relative in known:
            continue
        study_key, series_key, sop_key = relative[:-4].split("/")
        try:
            header = header_of(dcmread(path, stop_before_pixels=True))
        except Exception as exc:
            log.warning("unreadable orphan spool file quarantined (%s)", type(exc).__name__)
            quarantine = spool.root.parent / "quarantine"
            quarantine.mkdir(exist_ok=True)
            shutil.move(path, quarantine / path.name)
            continue
        state.record_instance(
            SpooledInstance(study_key, series_key, sop_key, relative),
            calling_ae=state.calling_ae_of(series_key),
            called_ae="",
            header=header,
        )
        recovered += 1
    if recovered:
        log.warning("recovered %d spooled instance(s) that were written but not recorded", recovered)
    return recovered


def purge_feedback(state: State, settings: Settings, job_ids: Sequence[str]) -> None:
    """The returned SEGs kept for these jobs (they carry patient headers) go with the series; their numbers stay."""
    for kept in state.feedback_files(job_ids):
        (settings.storage.data_dir / kept).unlink(missing_ok=True)
    state.forget_feedback_files(job_ids)


def purge_expired(state: State, spool: Spool, settings: Settings, now: float) -> int:
    """Delete inputs, results and returned SEGs of series whose jobs all ended more than the retention period ago."""
    purged = 0
    for study_key, series_key in state.purgeable_series(now - settings.storage.retention_s):
        jobs = state.jobs_for_series(series_key)
        for row in jobs:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(settings.storage.outbox_dir / row.job_id)
        spool.remove_series(study_key, series_key, manifests=[row.manifest for row in jobs])
        purge_feedback(state, settings, [row.job_id for row in jobs])
        state.mark_series(series_key, SeriesState.PURGED)
        audit.record_deleted(settings, study_key, series_key)
        purged += 1
    if purged:
        log.info("retention: deleted the files of %d ended series", purged)
        if not state.drop_old_versions():  # the purged rows' old versions leave the WAL (issue 9 item 6)
            log.warning("database busy: old row versions stay in its WAL until the next purge")
    return purged
