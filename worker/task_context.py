"""What every task of one worker process shares: its open database and spool, and the wait for a missing resource."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Task
from celery.exceptions import Reject

from pacsai.errors import Resource, WorkerError
from pacsai.settings import Settings
from pacsai.state import State
from pacsai.storage import Spool

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ThisProcess:
    """What one worker process keeps between tasks: its open database and spool, and whether its device failed."""

    context: tuple[Settings, State, Spool] | None = None
    worker_pid: int = 0  # the Celery parent, set before the pool forks
    unhealthy: str = ""  # W3: why this process stopped taking jobs ("" while healthy)


this_process = ThisProcess()


def context(task: Task) -> tuple[Settings, State, Spool]:
    """This process's settings, database and spool, opened on its first task."""
    if this_process.context is None:
        settings: Settings = task.app.pacsai_settings
        spool = Spool(settings.storage.spool_dir, settings.log_key, reserve_bytes=0)
        this_process.context = (settings, State(settings.storage.database), spool)
    return this_process.context


def wait_for(state: State, job_id: str, resource: Resource, exc: BaseException, *, give_back_attempt: bool) -> str:
    """Park the job in WAITING with the resource named; the node's reconciler resumes it when the resource is back
    (dicom_node/reconcile.py resume_waiting). The attempt is given back: running out is not the job's failure."""
    reason = str(exc) if isinstance(exc, WorkerError) and resource.waiting_reason in str(exc) else ""
    reason = reason or f"{resource.waiting_reason} ({type(exc).__name__})"
    state.wait_for_resource(job_id, reason, give_back_attempt=give_back_attempt)
    log.warning("job %s; the node resumes it when the %s is back", reason, resource.value)
    raise Reject(reason, requeue=False)
