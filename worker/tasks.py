"""The inference task: decode the message, claim the job, run the pipeline, record the outcome, retry or give up.

The delivery task is in worker/deliver_task.py, the notices task in worker/notify.py; importing this module
registers all three (the Celery app includes `worker.tasks`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, NoReturn

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_init

import worker.deliver_task  # noqa: F401  (the pacsai.deliver task)
import worker.heartbeat  # noqa: F401  (each pool process writes its heartbeat row)
import worker.notify  # noqa: F401  (the pacsai.notify task: HL7/FHIR notices after a delivery)
from pacsai import lease  # pipeline imports torch: imported in the tasks, in the pool children (W6)
from pacsai.enqueue import INFER_TASK, enqueue_delivery
from pacsai.errors import Resource, WorkerError, causes, exhausted_resource
from pacsai.jobs import Claim, Delivery, JobState, SeriesJob
from pacsai.logs import log_context
from pacsai.settings import Settings
from pacsai.state import State
from worker import collect
from worker.stage_clock import timing as time_stages
from worker.task_context import context, this_process, wait_for

if TYPE_CHECKING:
    from worker.pipeline import Results

log = logging.getLogger(__name__)
MAX_INFER_ATTEMPTS = 3


# W3: RuntimeError texts (and torch.AcceleratorError) of an accelerator that failed; out of memory is not one (W2)
DEVICE_FAILURES = ("CUDA error", "CUDA driver", "cuDNN error", "CUBLAS_STATUS", "device-side assert", "NCCL error")


@worker_init.connect
def _before_fork(**_: object) -> None:
    """W6: runs in the Celery parent before its pool forks; CUDA initialised here would be unusable in the children."""
    this_process.worker_pid = os.getpid()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.critical(
            "not starting: CUDA is initialised in the worker's parent process, so its forked pool processes "
            "cannot use it; keep torch out of the parent, or run the worker with --pool solo or threads"
        )
        raise SystemExit(3)
    log.info(
        "fork check: torch %s in the worker's parent process; pool processes load it themselves",
        "is loaded, CUDA not initialised," if torch is not None else "is not loaded",
    )


@shared_task(bind=True, name=INFER_TASK, acks_late=True)
def infer(self: Task, message: dict[str, str]) -> str:
    settings, state, spool = context(self)
    job = SeriesJob.from_message(message)
    with log_context(job=job.job_id[:8], model=job.model):
        if this_process.unhealthy:  # W3: stopping after a device failure; another worker takes it
            raise Reject(this_process.unhealthy, requeue=True)
        if (ended := _already_ran(self, state, job)) is not None:
            return ended
        owner = lease.owner()
        if (dropped := _claim(state, job, owner)) is not None:
            return dropped
        # full collections wait until the results are handed on, then one runs (worker/collect.py)
        with collect.after_the_job():
            try:
                # only now, with the attempt counted: the first import of torch takes seconds, and a job whose time
                # limit kills it during the import must still end dead after its attempts (Q6), not come back forever
                from worker import pipeline
                from worker.deliver import peer_takes_seg

                with lease.renewed(state, job.job_id, owner), time_stages() as stage_times:
                    fallback_overlays = peer_takes_seg(settings, state, job.destination) is not True
                    results = pipeline.run(job, settings, spool, fallback_overlays=fallback_overlays)
            except SoftTimeLimitExceeded:
                limit = WorkerError(f"the job ran past its time limit of {settings.queue.task_time_limit_s:g} s")
                log.error("%s", limit)
                return _give_up_or_retry(settings, state, job.job_id, limit, retryable=True)
            except Exception as exc:
                return _failed(settings, state, job.job_id, exc)
            for stage, seconds in stage_times.items():  # load, model, encode (worker/pipeline.py)
                state.record_stage(job.job_id, job.model, stage, seconds)
            return _encoded(self, state, job, results)


def _already_ran(task: Task, state: State, job: SeriesJob) -> str | None:
    """The job's state when it already ran (a redelivered message); an encoded one gets its delivery again."""
    row = state.job(job.job_id)
    if row is None:
        return None
    if row.state in (JobState.ENCODED, JobState.DELIVERED, JobState.COMMITTED):
        log.info("job already %s; not running it again", row.state.value)
        if row.state is JobState.ENCODED:
            enqueue_delivery(task.app, Delivery(job.job_id, job.destination))
        return str(row.state.value)
    if row.state in (JobState.FAILED, JobState.DEAD, JobState.CANCELLED):
        log.info("job already %s; not running it again", row.state.value)
        return str(row.state.value)
    return None


def _claim(state: State, job: SeriesJob, owner: str) -> str | None:
    """Claim the job for this process (its attempt counted); "duplicate" when it runs elsewhere, raises when it
    must not run (attempts exhausted: dead; unknown)."""
    claim = state.claim_job(
        job.job_id, owner, lease_s=lease.LEASE_S, alive=lease.alive, max_attempts=MAX_INFER_ATTEMPTS
    )
    if claim is Claim.HELD:
        # the broker delivered it again while it runs elsewhere (visibility timeout, lost connection)
        log.warning("job is running in another worker process; this second delivery is dropped")
        return "duplicate"
    if claim is Claim.EXHAUSTED:
        # the job started this often and never finished: it kills its worker (crash, OOM, time limit)
        reason = f"gave up after {MAX_INFER_ATTEMPTS} attempts that did not finish"
        state.set_job(job.job_id, JobState.DEAD, reason)
        log.error("job dead: %s", reason)
        raise Reject(reason, requeue=False)
    if claim is Claim.UNKNOWN:
        log.error("job is not in the database; dropped (was the database replaced?)")
        raise Reject("unknown job", requeue=False)
    return None


def _failed(settings: Settings, state: State, job_id: str, exc: Exception) -> str:
    """A run that raised: wait for a missing resource, hand the job back from a failed device, retry or give up."""
    if (resource := exhausted_resource(exc)) is not None:  # disk or host memory ran out (ENOSPC, MemoryError)
        return wait_for(state, job_id, resource, exc, give_back_attempt=True)
    if device_failed(exc):  # e.g. the model could not be moved to a GPU that is gone
        _hand_back(state, job_id, exc)
    if isinstance(exc, WorkerError):
        return _give_up_or_retry(settings, state, job_id, exc, retryable=exc.retryable)
    log.exception("job failed unexpectedly (%s)", type(exc).__name__)  # retried a bounded number of times
    return _give_up_or_retry(settings, state, job_id, exc, retryable=True)


def _encoded(task: Task, state: State, job: SeriesJob, results: Results) -> str:
    """Record what the run made and hand it to delivery (nothing to deliver: the job ends here)."""
    if results.not_evaluated and not results.files:  # refused (an outcome, not a failure), no report wanted
        state.set_job(job.job_id, JobState.DELIVERED, results.not_evaluated)
        return "not evaluated"
    if not results.files:
        state.set_job(job.job_id, JobState.DELIVERED, "nothing found")
        return "nothing found"
    state.set_job(job.job_id, JobState.ENCODED, results.not_evaluated)  # reason: why the model refused
    log.info("job encoded %d segment(s) into %d file(s)", results.segments, len(results.files))
    try:
        enqueue_delivery(task.app, Delivery(job.job_id, job.destination))
    except Exception as exc:  # broker full or unreachable: the node sends the delivery when it takes messages
        return wait_for(state, job.job_id, Resource.BROKER, exc, give_back_attempt=False)
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
            isinstance(current, RuntimeError) and any(text in str(current) for text in DEVICE_FAILURES)
        ):
            return True
    return False


def _hand_back(state: State, job_id: str, exc: BaseException) -> NoReturn:
    """W3: this worker's accelerator failed. The job goes back to the queue for another worker (queued again, not
    failed; the attempt still counts, so a job that breaks every GPU ends DEAD) and this worker shuts down gracefully.
    """
    reason = f"the worker's accelerator failed ({type(exc).__name__})"
    this_process.unhealthy = reason
    state.set_job(job_id, JobState.QUEUED, f"handed back: {reason}")
    log.critical("worker unhealthy: %s; the job goes back to the queue and this worker stops taking jobs", reason)
    worker_pid = this_process.worker_pid
    if worker_pid:  # warm shutdown: the Celery parent stops consuming and waits for this task to return
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
        delay_s = settings.queue.retry_delay_s * 2 ** (attempts - 1)
        state.schedule_retry(job_id, f"retrying: {reason}", time.time() + delay_s)
        log.warning("job attempt %d failed (%s); the node enqueues it again in %.0f s", attempts, reason, delay_s)
        raise Reject(reason, requeue=False)
    final = JobState.FAILED if not retryable else JobState.DEAD
    state.set_job(job_id, final, reason)
    log.error("job %s: %s", final.value, reason)
    raise Reject(reason, requeue=False)
