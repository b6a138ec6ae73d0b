"""Operator recovery (pacsai.job_actions), resource waits and orphaned work (reconcile) on a real database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node import reconcile
from dicom_node.reconcile import resume_orphaned, resume_waiting
from pacsai import job_actions
from pacsai.errors import Resource
from pacsai.jobs import JobState
from pacsai.settings import Settings
from pacsai.state import State
from tests.job_paths import move_job
from tests.unit.test_reconcile import Broker, add_job, setup
from worker.cli import main


def test_retry_rerun_cancel_redeliver_follow_the_table_and_are_audited(tmp_path: Path, database: str) -> None:
    settings, state, spool = setup(tmp_path, database)
    for job_id, job_state in (("dead", JobState.DEAD), ("wait", JobState.WAITING), ("done", JobState.DELIVERED)):
        add_job(state, spool, job_id, job_state)
    done, refused = job_actions.retry_all_dead(state, by="alice", settings=settings)
    assert [d.job_id for d in done] == ["dead"] and refused == []
    row = state.job("dead")
    assert row is not None and (row.state, row.attempts) == (JobState.PENDING, 0)
    assert job_actions.cancel(state, "wait", by="alice", settings=settings).action == "cancel"
    assert state.job("wait").state is JobState.CANCELLED  # type: ignore[union-attr]
    with pytest.raises(job_actions.ActionRefused, match="cannot cancel a delivered job"):
        job_actions.cancel(state, "done", by="alice", settings=settings)
    (settings.storage.outbox_dir / "done").mkdir(parents=True)
    _, delivery = job_actions.redeliver(state, "done", by="alice", settings=settings)
    assert delivery.job_id == "done" and state.job("done").state is JobState.ENCODED  # type: ignore[union-attr]
    move_job(state, "done", JobState.DELIVERED)
    rerun = job_actions.rerun(state, "done", by="alice", settings=settings)
    new = state.job(rerun.job_id)
    assert new is not None and new.job_id != "done" and (new.state, new.revision) == (JobState.PENDING, 2)
    trail = settings.audit_path.read_text()
    assert trail.count("operator-action") == 4 and "alice" in trail


def test_a_waiting_job_resumes_when_the_disk_is_back_without_spending_an_attempt(
    tmp_path: Path, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings, state, spool = setup(tmp_path, database)
    add_job(state, spool, "infer", JobState.RUNNING)
    add_job(state, spool, "send", JobState.ENCODED)
    state.wait_for_resource("infer", Resource.DISK.waiting_reason, give_back_attempt=True)
    state.wait_for_resource("send", Resource.DISK.waiting_reason, give_back_attempt=False)
    assert state.job("infer").attempts == 0  # type: ignore[union-attr]
    broker = Broker(depth=0)
    later = time.time() + 60
    reconcile._alerted_at.clear()
    assert resume_waiting(state, settings, broker.queues(), later, free_bytes=lambda: 0) == 0
    assert "ALERT: 2 job(s) waiting: no space left on the data volume" in caplog.text
    assert resume_waiting(state, settings, broker.queues(), later, free_bytes=lambda: 10 << 30) == 2
    assert state.job("infer").state is JobState.QUEUED  # type: ignore[union-attr]
    assert state.job("send").state is JobState.ENCODED  # type: ignore[union-attr]
    assert [j.job_id for j in broker.jobs] == ["infer"] and [d.job_id for d in broker.deliveries] == ["send"]


def test_work_of_a_dead_local_process_is_resumed_at_once(tmp_path: Path, database: str) -> None:
    settings, state, spool = setup(tmp_path, database)
    add_job(state, spool, "run", JobState.PENDING)
    add_job(state, spool, "send", JobState.ENCODED)
    state.claim_job("run", "host:1", lease_s=30, alive=lambda _: True, max_attempts=3)
    state.claim_delivery("send", "host:1", lease_s=30, alive=lambda _: True)
    broker = Broker(depth=5)  # the broker is busy: only the dead owner tells
    assert resume_orphaned(state, broker.queues(), alive=lambda holder: holder != "host:1") == 2
    assert state.job("run").state is JobState.QUEUED  # type: ignore[union-attr]
    assert [d.job_id for d in broker.deliveries] == ["send"]
    assert resume_orphaned(state, broker.queues(), alive=lambda holder: holder != "host:1") == 0  # once


def test_the_cli_retries_every_dead_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    settings, state, spool = setup(data, str(data / "pacsai.db"))
    add_job(state, spool, "dead1", JobState.DEAD)
    state.close()
    monkeypatch.setenv("PACSAI_DATA_DIR", str(data))
    assert main(["jobs", "retry", "--all-dead"]) == 0
    assert "1 job(s) retried" in capsys.readouterr().out
    assert State(data / "pacsai.db").job("dead1").state is JobState.PENDING  # type: ignore[union-attr]
    assert main(["jobs", "cancel", "nosuchjob"]) == 1
    assert isinstance(settings, Settings)


def test_a_dead_job_whose_instances_were_purged_is_not_retried(tmp_path: Path, database: str) -> None:
    """Retrying needs the spooled input: a dead job whose series was purged after the retention period is refused
    up front with the reason (alone, or skipped with the reason among all dead jobs), and stays dead."""
    settings, state, spool = setup(tmp_path, database)
    add_job(state, spool, "gone", JobState.DEAD, manifest=False)  # as after a purge
    with pytest.raises(job_actions.ActionRefused, match="instances were deleted after the retention period"):
        job_actions.retry(state, "gone", by="alice", settings=settings)
    done, refused = job_actions.retry_all_dead(state, by="alice", settings=settings)
    assert done == [] and len(refused) == 1 and "not retried" in refused[0]
    assert state.job("gone").state is JobState.DEAD  # type: ignore[union-attr]
    assert not settings.audit_path.exists() or "operator-action" not in settings.audit_path.read_text()
