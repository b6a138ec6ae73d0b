"""An operator's actions on a job: retry, re-run, cancel, re-deliver (`pacsai jobs …` and the console).

Each checks the job's state first and raises ActionRefused, in our own words, when the action does not apply; the
state change goes through the transition table (pacsai.jobs). Given `settings`, files already deleted after the
retention period are checked for, and each action done is written to the audit trail with the operator's name unless
`write_audit=False` (the console writes its own audit message, with the user's address). A retried or re-run
job becomes pending, and the node's assembler enqueues it on its next tick; a re-delivery returns the Delivery
message the caller enqueues.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pacsai import audit
from pacsai.errors import PacsaiError
from pacsai.jobs import Delivery, JobState, SeriesJob, job_id_for
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import DEID_DIR, outbox_for

RETRYABLE = frozenset({JobState.FAILED, JobState.DEAD, JobState.CANCELLED})
CANCELLABLE = frozenset({JobState.PENDING, JobState.QUEUED, JobState.RETRYING, JobState.WAITING})
DONE = frozenset({JobState.DELIVERED, JobState.COMMITTED})  # results at the PACS (committed: and confirmed there)
RERUNNABLE = frozenset({*DONE, *RETRYABLE})
REDELIVERABLE = frozenset({*DONE, JobState.ENCODED})


class ActionRefused(PacsaiError):
    """The action does not apply to the job as it is now (unknown, in a state that does not allow it, files gone)."""


@dataclass(frozen=True, slots=True)
class ActionDone:
    action: str  # retry, rerun, cancel, redeliver
    job_id: str  # the job acted on (for a re-run as a new revision: the new job)
    study_key: str
    detail: str  # our words and ids, for the audit message, the terminal and the console


def _job(state: State, job_id: str, allowed: frozenset[JobState], action: str) -> JobRow:
    job = state.job(job_id)
    if job is None:
        raise ActionRefused(f"no job {job_id[:24]}")
    if job.state not in allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        raise ActionRefused(f"cannot {action} a {job.state.value} job (only {names})")
    return job


def _require_input(state: State, job: JobRow, settings: Settings | None) -> None:
    """A job can run again only while its spooled instances are there (not purged after the retention period)."""
    purged = state._query("SELECT 1 FROM series WHERE series_key=? AND state=?", (job.series_key, "purged"))
    if purged or (settings is not None and not (settings.storage.spool_dir / job.manifest).is_file()):
        raise ActionRefused(
            "the job's instances were deleted after the retention period; the series must be sent again"
        )


def _done(settings: Settings | None, by: str, done: ActionDone, *, write_audit: bool = True) -> ActionDone:
    if settings is not None and write_audit:
        audit.record_operator_action(settings, by, done.study_key, f"{done.action} by {by}: {done.detail}")
    return done


def retry(
    state: State, job_id: str, *, by: str, settings: Settings | None = None, write_audit: bool = True
) -> ActionDone:
    """A failed, dead or cancelled job starts again from pending with a fresh attempt budget."""
    job = _job(state, job_id, RETRYABLE, "retry")
    _require_input(state, job, settings)
    state.restart_job(job_id, f"retried by {by}")
    detail = f"job {job_id[:8]} ({job.model}) restarted from {job.state.value}"
    return _done(settings, by, ActionDone("retry", job_id, job.study_key, detail), write_audit=write_audit)


def retry_all_dead(state: State, *, by: str, settings: Settings | None = None) -> tuple[list[ActionDone], list[str]]:
    """Every dead job starts again (after a cause that hit them all, such as a full disk, was put right); returns
    what was done and, for each dead job that cannot run again (its instances purged), why not."""
    done, refused = [], []
    for row in state.jobs_in(JobState.DEAD):
        try:
            done.append(retry(state, row.job_id, by=by, settings=settings))
        except ActionRefused as exc:
            refused.append(f"job {row.job_id[:8]} ({row.model}) not retried: {exc}")
    return done, refused


def cancel(
    state: State, job_id: str, *, by: str, settings: Settings | None = None, write_audit: bool = True
) -> ActionDone:
    """A job that has not started, or waits for a retry or a resource, is cancelled (a queued message of it is
    dropped by the worker). A running job cannot be cancelled."""
    job = _job(state, job_id, CANCELLABLE, "cancel")
    state.set_job(job_id, JobState.CANCELLED, f"cancelled by {by}")
    detail = f"job {job_id[:8]} ({job.model}) cancelled while {job.state.value}"
    return _done(settings, by, ActionDone("cancel", job_id, job.study_key, detail), write_audit=write_audit)


def redeliver(
    state: State, job_id: str, *, by: str, settings: Settings | None = None, write_audit: bool = True
) -> tuple[ActionDone, Delivery]:
    """The job's results are sent again from the outbox (same SOP Instance UIDs: the PACS replaces them); returns
    the message to enqueue. With `settings`, results already deleted after the retention period are refused."""
    job = _job(state, job_id, REDELIVERABLE, "re-deliver")
    if settings is not None and not outbox_for(settings, job_id).is_dir():
        raise ActionRefused(f"the results of job {job_id[:8]} were deleted after the retention period; re-run it")
    if job.state in DONE:
        state.set_job(job_id, JobState.ENCODED, f"re-delivery asked by {by}")
    detail = f"results of job {job_id[:8]} ({job.model}) sent again to {job.destination}"
    done = _done(settings, by, ActionDone("redeliver", job_id, job.study_key, detail), write_audit=write_audit)
    return done, Delivery(job_id, job.destination)


def rerun(
    state: State, job_id: str, *, by: str, settings: Settings | None = None, write_audit: bool = True
) -> ActionDone:
    """The job's input runs again with the model as installed now.

    A job that delivered nothing (failed, dead, cancelled) restarts under its own id: its id is its instance set,
    so the same input, and nothing at the PACS to replace. A delivered job gets a new job, the next revision of its
    series and model, on the same spooled instances: its results carry new UIDs and supersede the delivered ones
    (the new SR names the old one as its predecessor), so the PACS shows the newer results as the current ones.
    """
    job = _job(state, job_id, RERUNNABLE, "re-run")
    _require_input(state, job, settings)
    if job.state not in DONE:
        state.restart_job(job_id, f"re-run by {by}")
        detail = f"job {job_id[:8]} ({job.model}) restarted from {job.state.value}"
        return _done(settings, by, ActionDone("rerun", job_id, job.study_key, detail), write_audit=write_audit)
    if job.manifest.startswith(f"{DEID_DIR}/"):
        raise ActionRefused("a delivered de-identified job cannot be re-run as a new revision; send the series again")
    revision = 1 + max(row.revision for row in state.jobs_for_series(job.series_key) if row.model == job.model)
    keys = [key for key, _ in state.series_instances(job.series_key)]
    new_id = job_id_for(job.series_key, job.model, [*keys, f"rerun-{revision}"])
    new = SeriesJob(new_id, job.study_key, job.series_key, job.model, job.manifest, job.destination)
    state.add_job(replace(new, priority=job.priority))
    detail = f"delivered job {job_id[:8]} re-run with {job.model} as job {new_id[:8]} (revision {revision})"
    return _done(settings, by, ActionDone("rerun", new_id, job.study_key, detail), write_audit=write_audit)
