"""Reconciler and cleaner: the database is the truth, the broker only a transport.

- jobs the database says are queued (or running, or encoded) but the broker no longer holds are enqueued again;
- spool files written but never recorded (a crash between write and record) are recorded, temp files removed;
- spooled inputs and outbox results of ended jobs are deleted after the retention period, never before.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import dcmread

from dicom_node import audit
from dicom_node.receive import header_of
from dicom_node.spool import Spool
from worker import lease
from worker.enqueue import infer_queue
from worker.jobs import Delivery, JobState, SeriesJob, SeriesState
from worker.settings import Settings
from worker.state import State

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Queues:
    """What the reconciler needs from the broker: queue depths (None when unknown) and the two producers."""

    depth: Callable[[str], int | None]
    enqueue_job: Callable[[SeriesJob], None]
    enqueue_delivery: Callable[[Delivery], None]


def requeue_lost(state: State, settings: Settings, queues: Queues, now: float) -> int:
    """Enqueue again the jobs that the broker lost (flushed, restarted without persistence, …); return how many."""
    requeued = 0
    for row in state.jobs_due(now):   # parked by a worker after a failed attempt: the broker holds no copy
        queues.enqueue_job(row.to_job())
        state.set_job(row.job_id, JobState.QUEUED, row.reason)
        requeued += 1
    stale_queued = state.jobs_in(JobState.QUEUED, updated_before=now - settings.requeue_after_s)
    # a running job's holder renews its lease; one that stopped (killed, hard time limit) has lost the job
    stale_running = [row for row, holder, renewed_at in state.running_owners(now - settings.requeue_after_s)
                     if not lease.alive(holder) or now - renewed_at > lease.LEASE_S]
    empty: dict[str, bool] = {}
    for row in [*stale_queued, *stale_running]:
        if row.model not in empty:
            empty[row.model] = queues.depth(infer_queue(row.model)) == 0
        if empty[row.model]:
            queues.enqueue_job(row.to_job())
            state.set_job(row.job_id, JobState.QUEUED, "enqueued again by the reconciler")
            requeued += 1
    if queues.depth("deliver") == 0:
        stale = state.jobs_in(JobState.ENCODED, updated_before=now - settings.send_backoff_max_s - 120)
        for row in stale:
            queues.enqueue_delivery(Delivery(row.job_id, row.destination))
            state.touch_job(row.job_id)
            requeued += 1
    if requeued:
        log.warning("reconciler enqueued %d job(s) again (due retries, or lost by the broker)", requeued)
    return requeued


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
        state.record_instance(sop_key=sop_key, series_key=series_key, study_key=study_key, path=relative,
                              calling_ae=state.calling_ae_of(series_key), called_ae="", header=header)
        recovered += 1
    if recovered:
        log.warning("recovered %d spooled instance(s) that were written but not recorded", recovered)
    return recovered


def purge_expired(state: State, spool: Spool, settings: Settings, now: float) -> int:
    """Delete inputs and results of series whose jobs all ended more than the retention period ago."""
    purged = 0
    for study_key, series_key in state.purgeable_series(now - settings.retention_s):
        for row in state.jobs_for_series(series_key):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(settings.outbox_dir / row.job_id)
        spool.remove_series(study_key, series_key)
        state.mark_series(series_key, SeriesState.PURGED)
        audit.record_deleted(settings, study_key, series_key)
        purged += 1
    if purged:
        log.info("retention: deleted the files of %d ended series", purged)
    return purged
