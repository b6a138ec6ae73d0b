"""Job leases and database-scheduled retries: a job runs in one process at a time, retries never live in the broker."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from dicom_node.reconcile import requeue_lost
from pacsai import lease
from pacsai.jobs import JobState
from pacsai.state import State
from tests.job_paths import move_job
from tests.unit.test_reconcile import Broker, add_job, setup


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def claim(state: State, owner: str, lease_s: float = lease.LEASE_S, job_id: str = "j") -> str:
    return state.claim_job(job_id, owner, lease_s=lease_s, alive=lease.alive, max_attempts=3)


@pytest.mark.catalogue("Q5", "Q10")
def test_a_second_delivery_of_a_running_job_is_not_run_in_parallel(tmp_path: Path, database: str) -> None:
    _, state, spool = setup(tmp_path, database)
    add_job(state, spool, "j", JobState.QUEUED)
    assert claim(state, lease.owner()) == "claimed"
    assert claim(state, f"{socket.gethostname()}:{dead_pid()}") == "held"  # we hold it and are alive
    assert claim(state, "gpu-box-2:77") == "held"
    (row,) = state.jobs_in(JobState.RUNNING)
    assert row.attempts == 1


def test_a_lease_is_lost_by_a_dead_process_or_by_not_renewing(tmp_path: Path, database: str) -> None:
    _, state, spool = setup(tmp_path, database)
    add_job(state, spool, "j", JobState.QUEUED)
    assert claim(state, f"{socket.gethostname()}:{dead_pid()}") == "claimed"
    assert claim(state, lease.owner()) == "claimed"  # the holder's process is gone
    assert claim(state, "gpu-box-2:77", lease_s=0.0) == "claimed"  # not renewed within the lease
    assert claim(state, lease.owner(), lease_s=0.0) == "exhausted"  # three starts, none finished
    assert state.job("j").attempts == 3  # type: ignore[union-attr]


def test_the_holder_renews_its_lease_while_it_runs(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, state, spool = setup(tmp_path, database)
    add_job(state, spool, "j", JobState.QUEUED)
    assert claim(state, "me:1") == "claimed"
    ((_, _, claimed_at),) = state.running_owners(time.time() + 1)
    monkeypatch.setattr(lease, "RENEW_EVERY_S", 0.05)
    with lease.renewed(state, "j", "me:1"):
        time.sleep(0.5)
    ((_, holder, renewed_at),) = state.running_owners(time.time() + 1)
    assert holder == "me:1" and renewed_at > claimed_at


@pytest.mark.catalogue("Q8")
def test_retries_wait_in_the_database_and_are_enqueued_when_due(tmp_path: Path, database: str) -> None:
    settings, state, spool = setup(tmp_path, database)
    add_job(state, spool, "j", JobState.QUEUED)
    claim(state, lease.owner())
    now = time.time()
    state.schedule_retry("j", "retrying: model failed", now + 60)
    busy = Broker(depth=5)  # other jobs waiting: a due retry still goes on the queue
    assert requeue_lost(state, settings, busy.queues(), now + 30) == 0 and busy.jobs == []
    assert requeue_lost(state, settings, busy.queues(), now + 61) == 1
    assert [job.job_id for job in busy.jobs] == ["j"]
    assert state.job("j").state is JobState.QUEUED  # type: ignore[union-attr]
    assert requeue_lost(state, settings, busy.queues(), now + 62) == 0  # once


def test_the_reconciler_takes_back_running_jobs_only_from_holders_that_are_gone(tmp_path: Path, database: str) -> None:
    settings, state, spool = setup(tmp_path, database)
    for job_id, holder in (
        ("alive", lease.owner()),
        ("dead", f"{socket.gethostname()}:{dead_pid()}"),
        ("remote", "gpu-box-2:77"),
    ):
        add_job(state, spool, job_id, JobState.QUEUED)
        claim(state, holder, job_id=job_id)
    empty = Broker(depth=0)
    now = time.time()
    assert requeue_lost(state, settings, empty.queues(), now + 1) == 0  # within requeue_after
    assert requeue_lost(state, settings, empty.queues(), now + settings.queue.requeue_after_s + 1) == 1
    assert [job.job_id for job in empty.jobs] == ["dead"]
    later = now + settings.queue.requeue_after_s + lease.LEASE_S + 1  # nobody renewed since
    empty.jobs.clear()
    requeue_lost(state, settings, empty.queues(), later)
    assert {"alive", "remote"} <= {job.job_id for job in empty.jobs}


def test_results_are_sent_by_one_process_at_a_time(tmp_path: Path, database: str) -> None:
    """Q10 for deliveries: a second delivery message finds the results held by a live sender and leaves them."""
    _, state, spool = setup(tmp_path, database)
    add_job(state, spool, "j", JobState.ENCODED)  # set_job: no lease left from inference
    claim_delivery = partial(state.claim_delivery, "j", lease_s=lease.LEASE_S, alive=lease.alive)
    assert claim_delivery(lease.owner())
    assert not claim_delivery("gpu-box-2:77")
    assert claim_delivery(f"{socket.gethostname()}:{dead_pid()}") is False  # we are alive and hold it
    state.release_lease("j", lease.owner())  # a retry may run anywhere
    assert claim_delivery("gpu-box-2:77")
    assert not claim_delivery(lease.owner())
    move_job(state, "j", JobState.DELIVERED)
    assert claim_delivery(lease.owner())  # ended: nothing held
