"""A worker that takes a job's message before the node marks it queued keeps it: the node does not move it back."""

from __future__ import annotations

from pathlib import Path

from dicom_node.assemble import Assembler
from dicom_node.route import load_rules
from pacsai.jobs import JobState, SeriesJob
from pacsai.state import State
from tests.unit.test_reconcile import add_job, setup


def test_a_job_claimed_before_the_node_marks_it_queued_stays_running(tmp_path: Path, database: str) -> None:
    settings, state, spool = setup(tmp_path, database)
    add_job(state, spool, "fast", JobState.PENDING)
    add_job(state, spool, "slow", JobState.PENDING)
    worker = State(database)  # the worker's own connection, as in its process

    def enqueue_and_claim(job: SeriesJob) -> None:
        if job.job_id == "fast":  # an idle worker: the message is taken and the job claimed at once
            worker.claim_job(job.job_id, "host:2", lease_s=30, alive=lambda _: True, max_attempts=3)

    rules = load_rules(settings.node.routes_file)
    Assembler(settings, state, spool, rules, enqueue_and_claim, lambda: set()).enqueue_pending()
    assert state.job("fast").state is JobState.RUNNING  # type: ignore[union-attr]
    assert state.job("slow").state is JobState.QUEUED  # type: ignore[union-attr]
    worker.set_job("fast", JobState.ENCODED)  # the run ends as it would: no IllegalTransition
    assert [e.to_state for e in state.job_events("fast")] == ["pending", "running", "encoded"]
    worker.close()
