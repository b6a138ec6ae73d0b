"""Task shells: decode the message, call the pipeline or the sender, record the outcome, retry or give up."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_init

from dicom_node import audit, deidentify
from dicom_node.send import SendResult, send_files
from dicom_node.spool import Spool, SpoolCorrupted, check_intact
from dicom_node.status import Outcome
from worker import lease  # pipeline and outputs import torch: imported in the tasks, in the pool children (W6)
from worker.enqueue import DELIVER_TASK, INFER_TASK, enqueue_delivery
from worker.errors import PeerRefused, PeerUnavailable, WorkerError, causes
from worker.jobs import Delivery, JobState, SeriesJob
from worker.logs import log_context
from worker.settings import Peer, Settings
from worker.state import JobRow, State

log = logging.getLogger(__name__)
MAX_INFER_ATTEMPTS = 3
_per_process: dict[str, Any] = {}
# W3: RuntimeError texts (and torch.AcceleratorError) of an accelerator that failed; out of memory is not one (W2)
DEVICE_FAILURES = ("CUDA error", "CUDA driver", "cuDNN error", "CUBLAS_STATUS", "device-side assert", "NCCL error")


def _context(task: Task) -> tuple[Settings, State, Spool]:
    if "state" not in _per_process:
        settings: Settings = task.app.pacsai_settings
        _per_process["settings"] = settings
        _per_process["state"] = State(settings.database)
        _per_process["spool"] = Spool(settings.spool_dir, settings.log_key, reserve_bytes=0)
    return _per_process["settings"], _per_process["state"], _per_process["spool"]


@worker_init.connect
def _before_fork(**_: object) -> None:
    """W6: runs in the Celery parent before its pool forks; CUDA initialised here would be unusable in the children."""
    _per_process["worker_pid"] = os.getpid()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.critical("not starting: CUDA is initialised in the worker's parent process, so its forked pool processes "
                     "cannot use it; keep torch out of the parent, or run the worker with --pool solo or threads")
        raise SystemExit(3)
    log.info("fork check: torch %s in the worker's parent process; pool processes load it themselves",
             "is loaded, CUDA not initialised," if torch is not None else "is not loaded")


@shared_task(bind=True, name=INFER_TASK, acks_late=True)
def infer(self: Task, message: dict[str, str]) -> str:
    settings, state, spool = _context(self)
    job = SeriesJob.from_message(message)
    with log_context(job=job.job_id[:8], model=job.model):
        if "unhealthy" in _per_process:     # W3: stopping after a device failure; another worker takes it
            raise Reject(_per_process["unhealthy"], requeue=True)
        row = state.job(job.job_id)
        if row is not None and row.state in (JobState.ENCODED, JobState.DELIVERED):
            log.info("job already %s; not running it again", row.state.value)
            if row.state is JobState.ENCODED:
                enqueue_delivery(self.app, Delivery(job.job_id, job.destination))
            return str(row.state.value)
        if row is not None and row.state in (JobState.FAILED, JobState.DEAD):
            log.info("job already %s; not running it again", row.state.value)
            return str(row.state.value)
        owner = lease.owner()
        claim = state.claim_job(job.job_id, owner, lease_s=lease.LEASE_S, alive=lease.alive,
                                max_attempts=MAX_INFER_ATTEMPTS)
        if claim == "held":
            # the broker delivered it again while it runs elsewhere (visibility timeout, lost connection)
            log.warning("job is running in another worker process; this second delivery is dropped")
            return "duplicate"
        if claim == "exhausted":
            # the job started this often and never finished: it kills its worker (crash, OOM, time limit)
            reason = f"gave up after {MAX_INFER_ATTEMPTS} attempts that did not finish"
            state.set_job(job.job_id, JobState.DEAD, reason)
            log.error("job dead: %s", reason)
            raise Reject(reason, requeue=False)
        if claim == "unknown":
            log.error("job is not in the database; dropped (was the database replaced?)")
            raise Reject("unknown job", requeue=False)
        try:
            # only now, with the attempt counted: the first import of torch takes seconds, and a job whose time
            # limit kills it during the import must still end dead after its attempts (Q6), not come back forever
            from worker import pipeline

            with lease.renewed(state, job.job_id, owner):
                results = pipeline.run(job, settings, spool)
        except WorkerError as exc:
            if device_failed(exc):          # e.g. the model could not be moved to a GPU that is gone
                _hand_back(state, job.job_id, exc)
            return _give_up_or_retry(settings, state, job.job_id, exc, retryable=exc.retryable)
        except SoftTimeLimitExceeded:
            limit = WorkerError(f"the job ran past its time limit of {settings.task_time_limit_s:g} s")
            log.error("%s", limit)
            return _give_up_or_retry(settings, state, job.job_id, limit, retryable=True)
        except Exception as exc:  # unexpected: retry a bounded number of times, then dead
            if device_failed(exc):
                _hand_back(state, job.job_id, exc)
            log.exception("job failed unexpectedly (%s)", type(exc).__name__)
            return _give_up_or_retry(settings, state, job.job_id, exc, retryable=True)
        if not results.files:
            state.set_job(job.job_id, JobState.DELIVERED, "nothing found")
            return "nothing found"
        state.set_job(job.job_id, JobState.ENCODED)
        log.info("job encoded %d segment(s) into %d file(s)", results.segments, len(results.files))
        enqueue_delivery(self.app, Delivery(job.job_id, job.destination))
        return "encoded"


def device_failed(exc: BaseException) -> bool:
    """W3: whether the accelerator failed (lost, reset, illegal access), anywhere in the exception's chain.

    Out of memory is a job's problem, not the device's (W2): it never counts, even when its text names CUDA.
    """
    for current in causes(exc):
        kind = type(current)
        if kind.__name__ == "OutOfMemoryError" or "out of memory" in str(current):
            return False
        if (kind.__module__, kind.__name__) == ("torch", "AcceleratorError") or (
                isinstance(current, RuntimeError) and any(text in str(current) for text in DEVICE_FAILURES)):
            return True
    return False


def _hand_back(state: State, job_id: str, exc: BaseException) -> NoReturn:
    """W3: this worker's accelerator failed. The job goes back to the queue for another worker (queued again, not
    failed; the attempt still counts, so a job that breaks every GPU ends DEAD) and this worker shuts down gracefully.
    """
    reason = f"the worker's accelerator failed ({type(exc).__name__})"
    _per_process["unhealthy"] = reason
    state.set_job(job_id, JobState.QUEUED, f"handed back: {reason}")
    log.critical("worker unhealthy: %s; the job goes back to the queue and this worker stops taking jobs", reason)
    worker_pid = _per_process.get("worker_pid")
    if worker_pid:      # warm shutdown: the Celery parent stops consuming and waits for this task to return
        os.kill(int(worker_pid), signal.SIGTERM)
    raise Reject(reason, requeue=True)


def _give_up_or_retry(settings: Settings, state: State, job_id: str, exc: Exception, *, retryable: bool) -> str:
    """Fail for good, or park the job for a later attempt that the node enqueues from the database.

    Retries are not Celery countdowns: on Redis a countdown longer than the visibility timeout makes the broker
    deliver the job again while the first copy waits, so two runs would follow.
    """
    reason = str(exc) if isinstance(exc, WorkerError) else type(exc).__name__
    row = state.job(job_id)
    attempts = row.attempts if row is not None else MAX_INFER_ATTEMPTS
    if retryable and attempts < MAX_INFER_ATTEMPTS:
        delay_s = settings.retry_delay_s * 2 ** (attempts - 1)
        state.schedule_retry(job_id, f"retrying: {reason}", time.time() + delay_s)
        log.warning("job attempt %d failed (%s); the node enqueues it again in %.0f s", attempts, reason, delay_s)
        raise Reject(reason, requeue=False)
    final = JobState.FAILED if not retryable else JobState.DEAD
    state.set_job(job_id, final, reason)
    log.error("job %s: %s", final.value, reason)
    raise Reject(reason, requeue=False)


@shared_task(bind=True, name=DELIVER_TASK, acks_late=True, max_retries=None)
def deliver(self: Task, message: dict[str, str]) -> str:
    from worker import outputs, pipeline

    settings, state, spool = _context(self)
    delivery = Delivery.from_message(message)
    job_id = delivery.job_id
    with log_context(job=job_id[:8], destination=delivery.destination):
        peer = settings.peer(delivery.destination)
        if peer is None:
            state.set_job(job_id, JobState.FAILED, f"destination {delivery.destination} is not a known peer")
            raise Reject("unknown destination", requeue=False)
        owner = lease.owner()
        if not state.claim_delivery(job_id, owner, lease_s=lease.LEASE_S, alive=lease.alive):
            # the broker handed this delivery out again while another process is sending it (Q10)
            log.warning("results are being sent by another worker process; this second delivery is dropped")
            return "duplicate"
        with lease.renewed(state, job_id, owner):
            profile = settings.profile_for(peer.ae_title)   # which results this peer gets (worker/profiles.py)
            job = state.job(job_id)
            files = outputs.pending(pipeline.outbox_for(settings, job_id), state.deliveries(job_id), profile)
            send = partial(_send, spool, job, peer, settings.ae_title, profile.transfer_syntaxes,
                           dimse_timeout_s=settings.dimse_timeout_s)
            try:
                results = outputs.with_seg_fallback(send(files), send, profile=profile, peer=peer, job_id=job_id,
                                                    settings=settings, state=state, spool=spool)   # E5
                audit.record_sent(settings, job, peer, results)
                for result in results:
                    state.record_delivery(job_id, result.path.name, peer.ae_title, result.outcome.value,
                                          f"0x{result.code:04X}")
                refused = [r for r in results if r.outcome is Outcome.PERMANENT]
                if refused:
                    raise PeerRefused(f"{peer.ae_title} refused {len(refused)} file(s) with "
                                      f"0x{refused[0].code:04X}")
                if any(r.outcome is Outcome.TRANSIENT for r in results):
                    raise PeerUnavailable(f"{peer.ae_title} is out of resources")
            except PeerUnavailable as exc:
                attempt = self.request.retries + 1
                audit.record_undelivered(settings, job, peer, str(exc), final=attempt >= settings.send_max_attempts)
                if attempt >= settings.send_max_attempts:
                    state.set_job(job_id, JobState.DEAD, f"{exc} after {attempt} attempts")
                    raise Reject(str(exc), requeue=False) from exc
                countdown = min(settings.send_backoff_s * 2 ** self.request.retries, settings.send_backoff_max_s)
                failures = state.note_delivery_failure(job_id, f"delivery failing: {exc}")
                log.warning("%s; attempt %d, retrying in %.0f s", exc, attempt, countdown)
                if failures == settings.send_alert_after:
                    log.error("ALERT: results for %s undelivered after %d attempts; still retrying", peer.ae_title,
                              failures)
                state.release_lease(job_id, owner)     # the retry may run in any process
                raise self.retry(exc=exc, countdown=countdown) from exc
            except SpoolCorrupted as exc:
                audit.record_undelivered(settings, job, peer, str(exc), final=True)
                state.set_job(job_id, JobState.FAILED, str(exc))
                log.error("ALERT: results not sent: %s", exc)
                raise Reject(str(exc), requeue=False) from exc
            except PeerRefused as exc:
                audit.record_undelivered(settings, job, peer, str(exc), final=True)
                state.set_job(job_id, JobState.FAILED, str(exc))
                log.error("ALERT: delivery failed for good, not retried: %s", exc)   # E2 permanent RJ, E3 refusals
                raise Reject(str(exc), requeue=False) from exc
        state.set_job(job_id, JobState.DELIVERED)
        log.info("delivered %d file(s) to %s", len(files), peer.ae_title)
        return "delivered"


def _send(spool: Spool, job: JobRow | None, peer: Peer, calling_ae: str, transfer_syntaxes: tuple[str, ...],
          files: list[Path], *, dimse_timeout_s: float | None = None) -> list[SendResult]:
    """C-STORE files to the peer, proposing the transfer syntaxes of its profile (no files: nothing to do)."""
    check_intact(files, what="result")      # S7 for results: a file changed since it was written is never sent
    # A10: a de-identified job's results get their identity back here, on the node's host
    files = deidentify.restore_identity(spool, job, files)
    if not files:
        return []
    return send_files(files, peer, calling_ae=calling_ae, transfer_syntaxes=transfer_syntaxes,
                      dimse_timeout_s=dimse_timeout_s)
