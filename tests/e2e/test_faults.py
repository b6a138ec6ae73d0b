"""Fault tests with real processes: kill -9 of node and worker, Redis flushed or down, a job that never finishes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE

from pacsai.jobs import JobState
from pacsai.state import State
from tests.checks import check_seg_and_sr, reuid_series
from tests.conftest import need
from tests.services import free_port, start_redis, wait_until
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.catalogue("S3", "N11", "C14")
def test_node_killed_mid_study_loses_nothing_it_acknowledged(
    ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """S3/N11: 8 instances acknowledged, node killed -9 mid-association, restarted; the rest come on a new one."""
    pacsai = stack(peers=pacs.peer, PACSAI_QUIET_PERIOD_S="30")
    files = sorted(ct_series.iterdir())
    node = pacsai.start("node")
    pacsai.start("worker")
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CT_STORAGE, dcmread(files[0]).file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", pacsai.port, ae_title="PACSAI")
    assert assoc.is_established
    for path in files[:8]:
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    node.kill()  # SIGKILL with the association still open
    try:
        reply = assoc.send_c_store(dcmread(files[8]))
    except RuntimeError:  # pynetdicom may notice the dead association first
        reply = Dataset()
    assert "Status" not in reply  # the sender never got a success for the 9th
    assoc.abort()
    pacsai.start("node")
    pacsai.send(files[8:], "STORESCU")  # the sender retries the rest on a new association
    pacsai.wait_jobs({"delivered": 1})
    assert pacs.modalities() == ["SEG", "SR"]
    by_modality = {dcmread(p).Modality: p for p in pacs.inbox.iterdir()}
    check_seg_and_sr(by_modality["SEG"], by_modality["SR"], ct_series)  # all 20 referenced
    assert not list((pacsai.data / "spool").rglob(".*.tmp"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


@pytest.mark.catalogue("W1", "Q9")
def test_worker_killed_during_inference_runs_the_job_again_once(
    ct_series: Path, redis_url: str, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """W1/Q9: the worker process running the job is killed -9; the job runs again; one SEG and one SR arrive."""
    pacsai = stack(peers=pacs.peer, broker_url=redis_url)
    pacsai.start("node")
    worker = pacsai.start("worker")
    pacsai.send(sorted(ct_series.iterdir()), "STORESCU")
    wait_until(lambda: pacsai.jobs().get("running"), 120, "the job to run", 0.05)
    victims = _children(worker.popen.pid)
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    pacsai.wait_jobs({"delivered": 1})
    state = State(pacsai.data / "pacsai.db")
    (job,) = state.jobs_in(JobState.DELIVERED)
    assert job.attempts == 2
    assert [(name, status, attempts) for name, status, attempts, _ in state.deliveries(job.job_id)] == [
        ("seg.dcm", "success", 1),
        ("sr.dcm", "success", 1),
    ]
    assert pacs.modalities() == ["SEG", "SR"]


@pytest.mark.catalogue("Q2")
def test_redis_flushed_with_a_queued_job(
    tmp_path: Path, ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Q2: the broker loses a queued job (FLUSHALL, no persistence); the reconciler enqueues it again, once."""
    need("redis-server")
    redis, url = start_redis(tmp_path / "redis", appendonly=False)
    pacsai = stack(peers=pacs.peer, broker_url=url, PACSAI_REQUEUE_AFTER_S="2")
    pacsai.adopt(redis)
    node = pacsai.start("node")
    pacsai.send(sorted(ct_series.iterdir()), "STORESCU")
    pacsai.wait_jobs({"queued": 1}, 60)
    import redis as redis_client

    redis_client.Redis.from_url(url).flushall()
    pacsai.start("worker")
    pacsai.wait_jobs({"delivered": 1})
    assert "enqueued 1 job(s) again" in node.log()
    assert pacs.modalities() == ["SEG", "SR"]


@pytest.mark.catalogue("Q3")
def test_redis_down_while_studies_arrive(
    tmp_path: Path, ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Q3: with Redis down, instances are still accepted; the job is enqueued once Redis is back."""
    need("redis-server")
    redis_port = free_port()
    pacsai = stack(peers=pacs.peer, broker_url=f"redis://127.0.0.1:{redis_port}/0")
    pacsai.start("node")
    pacsai.send(sorted(ct_series.iterdir()), "STORESCU")  # check=True: every C-STORE succeeded
    pacsai.wait_jobs({"pending": 1}, 60)
    pacsai.adopt(start_redis(tmp_path / "redis", port=redis_port)[0])
    pacsai.start("worker")
    pacsai.wait_jobs({"delivered": 1})
    assert pacs.modalities() == ["SEG", "SR"]


@pytest.mark.catalogue("Q6", "W4")
def test_a_job_that_never_finishes_ends_dead(
    ct_series: Path, redis_url: str, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Q6: a job that exceeds its time limit every time is tried a bounded number of times, then dead."""
    pacsai = stack(peers=pacs.peer, broker_url=redis_url, PACSAI_TASK_TIME_LIMIT_S="0.5", PACSAI_REQUEUE_AFTER_S="2")
    pacsai.start("node")
    pacsai.start("worker")
    pacsai.send(sorted(ct_series.iterdir()), "STORESCU")
    wait_until(lambda: pacsai.jobs() == {"dead": 1}, 180, "the job to be dead", 1.0)
    (job,) = State(pacsai.data / "pacsai.db").jobs_in(JobState.DEAD)
    assert job.attempts == 3 and job.reason
    assert pacs.modalities() == []


@pytest.mark.catalogue("Q1")
def test_redis_restarted_with_queued_and_running_jobs(
    tmp_path: Path, ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Q1: Redis (AOF on) restarts while one job runs and two wait; all three complete exactly once in effect."""
    need("redis-server")
    redis, url = start_redis(tmp_path / "redis", appendonly=True)
    pacsai = stack(peers=pacs.peer, broker_url=url, PACSAI_REQUEUE_AFTER_S="5")
    studies = []
    for index in range(3):
        reuid_series(ct_series, tmp_path / "studies" / str(index), f"1.2.826.0.1.3680043.10.1051.5.{index}")
        studies.append(sorted((tmp_path / "studies" / str(index)).iterdir()))
    pacsai.start("node")
    pacsai.start("worker")
    for files in studies:
        pacsai.send(files, "STORESCU")
    wait_until(lambda: pacsai.jobs().get("running"), 120, "a running job", 0.05)
    redis.stop()
    redis_port = int(url.rsplit(":", 1)[1].split("/")[0])
    pacsai.adopt(start_redis(tmp_path / "redis", appendonly=True, port=redis_port)[0])
    wait_until(lambda: pacsai.jobs() == {"delivered": 3}, 300, "three delivered jobs", 1.0)
    assert pacs.modalities() == ["SEG", "SEG", "SEG", "SR", "SR", "SR"]
    state = State(pacsai.data / "pacsai.db")
    for job in state.jobs_in(JobState.DELIVERED):
        assert [attempts for _, _, attempts, _ in state.deliveries(job.job_id)] == [1, 1]
