"""Reconciler and cleaner on a real SQLite state and spool: lost jobs come back once, nothing undelivered is deleted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.reconcile import Queues, purge_expired, recover_spool, requeue_lost
from pacsai.jobs import Delivery, JobState, SeriesJob, SeriesState
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool
from tests.job_paths import move_job


def setup(tmp_path: Path, database: str) -> tuple[Settings, State, Spool]:
    settings = Settings.from_env(
        {"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_REQUEUE_AFTER_S": "5", "PACSAI_RETENTION_H": "1"}
    )
    return settings, State(database), Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)


def add_job(state: State, spool: Spool, job_id: str, job_state: JobState, *, manifest: bool = True) -> None:
    """A job of one spooled instance; every job's manifest is the file "manifest" (absent: as after a purge)."""
    if manifest:
        (spool.root / "manifest").write_text("{}")
    stored = spool.put("1.2.3", f"1.2.3.{job_id}", f"1.2.3.{job_id}.1", b"DICM")
    state.record_instance(
        stored,
        calling_ae="PACS",
        called_ae="PACSAI",
        header={},
    )
    row = JobRow(job_id, stored.series_key, stored.study_key, "m", "manifest", "PACS", JobState.PENDING, "", 0)
    state.close_series(stored.series_key, SeriesState.COMPLETE, "", [row])
    move_job(state, job_id, job_state)


class Broker:
    """A stand-in broker with queue depths we set, recording what is enqueued."""

    def __init__(self, depth: int | None) -> None:
        self.depth_value, self.jobs, self.deliveries = depth, [], []  # type: ignore[var-annotated]

    def queues(self) -> Queues:
        return Queues(
            depth=lambda queue: self.depth_value, enqueue_job=self.jobs.append, enqueue_delivery=self.deliveries.append
        )


@pytest.mark.catalogue("Q2")
def test_lost_jobs_are_enqueued_again_only_when_the_broker_is_empty(tmp_path: Path, database: str) -> None:
    settings, state, spool = setup(tmp_path, database)
    for job_id, job_state in (("q", JobState.QUEUED), ("d", JobState.DELIVERED), ("e", JobState.ENCODED)):
        add_job(state, spool, job_id, job_state)
    now = time.time()
    busy = Broker(depth=3)
    assert requeue_lost(state, settings, busy.queues(), now + 3600) == 0 and busy.jobs == []
    down = Broker(depth=None)
    assert requeue_lost(state, settings, down.queues(), now + 3600) == 0
    empty = Broker(depth=0)
    assert requeue_lost(state, settings, empty.queues(), now + 1) == 0  # not stale yet
    assert requeue_lost(state, settings, empty.queues(), now + 3600) == 2
    assert [job.job_id for job in empty.jobs] == ["q"] and empty.deliveries == [Delivery("e", "PACS")]
    assert isinstance(empty.jobs[0], SeriesJob)
    assert requeue_lost(state, settings, empty.queues(), time.time() + 1) == 0  # touched: not again at once


def test_retention_deletes_only_ended_jobs_after_the_period(tmp_path: Path, database: str) -> None:
    settings, state, spool = setup(tmp_path, database)
    add_job(state, spool, "done", JobState.DELIVERED)
    add_job(state, spool, "waiting", JobState.ENCODED)
    (settings.storage.outbox_dir / "done").mkdir(parents=True)
    assert purge_expired(state, spool, settings, time.time()) == 0
    assert purge_expired(state, spool, settings, time.time() + 2 * 3600) == 1
    assert not (settings.storage.outbox_dir / "done").exists()
    assert len(list(settings.storage.spool_dir.rglob("*.dcm"))) == 1  # the undelivered one is kept


@pytest.mark.catalogue("S3")
def test_recover_spool_records_orphans_and_removes_partial_writes(
    tmp_path: Path, ct_series: Path, database: str
) -> None:
    settings, state, spool = setup(tmp_path, database)
    source = sorted(ct_series.iterdir())[0]
    ds = dcmread(source, stop_before_pixels=True)
    stored = spool.put(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), source.read_bytes()
    )  # written, then "killed" before recording
    partial = spool.resolve(stored.path).parent / ".x.dcm.123.tmp"
    partial.write_bytes(b"half")
    assert recover_spool(state, spool) == 1
    assert not partial.exists()
    assert state.instance_paths() == {stored.path}
    assert [row.header["Modality"] for row in state.receiving_series()] == ["CT"]
    assert recover_spool(state, spool) == 0


@pytest.mark.catalogue("S3")
def test_instance_rows_commit_without_a_log_sync_and_a_lost_one_is_recorded_again(
    tmp_path: Path, ct_series: Path, database: str
) -> None:
    """The instance row is committed before the reply, without waiting for the database log's sync (the spool file
    is synced): another connection sees it at once, the connection is back to synced commits for everything else,
    and a row a power cut took (deleted here) is recorded again from its spool file at start."""
    settings, state, spool = setup(tmp_path, database)
    source = sorted(ct_series.iterdir())[0]
    ds = dcmread(source, stop_before_pixels=True)
    stored = spool.put(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), source.read_bytes())
    state.record_instance(
        stored,
        calling_ae="MODALITY",
        called_ae="PACSAI",
        header={"Modality": "CT"},
    )
    other = State(database)
    try:
        assert other.instance_paths() == {stored.path}  # committed
        if not database.startswith("postgres"):
            assert state._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again for the other tables
        other._db.execute("DELETE FROM instances")  # what a power cut may take: the newest rows of the log
        assert other.instance_paths() == set()
    finally:
        other.close()
    assert recover_spool(state, spool) == 1
    assert state.instance_paths() == {stored.path}
