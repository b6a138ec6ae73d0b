"""Fault tests with real processes: kill -9 of node and worker, Redis flushed or down, a job that never finishes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE

from tests.checks import check_seg_and_sr, reuid_series
from tests.conftest import need
from tests.services import (
    Process,
    free_port,
    pacsai_env,
    start_pacsai,
    start_redis,
    start_storescp,
    supervised,
    wait_until,
)
from worker.jobs import JobState
from worker.state import State

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def storescu(port: int, paths: list[Path]) -> None:
    subprocess.run(["storescu", "-xv", "-aet", "STORESCU", "-aec", "PACSAI", "127.0.0.1", str(port),
                    *map(str, paths)], check=True, timeout=120, capture_output=True)


def jobs(data: Path) -> dict[str, int]:
    state = State(data / "pacsai.db")
    try:
        return state.counts()["jobs"]
    finally:
        state.close()


def wait_delivered(data: Path, timeout_s: float = 180) -> None:
    wait_until(lambda: jobs(data) == {"delivered": 1}, timeout_s, "one delivered job", 0.5)


def received(folder: Path) -> list[str]:
    return sorted(dcmread(p, stop_before_pixels=True).Modality for p in folder.iterdir() if p.is_file())


@pytest.fixture()
def pacs(tmp_path: Path) -> tuple[Process, int, Path]:
    need("storescp"), need("storescu")
    return start_storescp(tmp_path / "pacs", ae_title="STORESCU")


@pytest.mark.catalogue("S3", "N11", "C14")
def test_node_killed_mid_study_loses_nothing_it_acknowledged(tmp_path: Path, ct_series: Path,
                                                             pacs: tuple[Process, int, Path]) -> None:
    """S3/N11: 8 instances acknowledged, node killed -9 mid-association, restarted; the rest come on a new one."""
    storescp, pacs_port, inbox = pacs
    port = free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"STORESCU@127.0.0.1:{pacs_port}",
                     PACSAI_QUIET_PERIOD_S="30")
    files = sorted(ct_series.iterdir())
    with supervised(storescp) as processes:
        node = start_pacsai("node", tmp_path, env)
        processes += [node, start_pacsai("worker", tmp_path, env)]
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CT_STORAGE, dcmread(files[0]).file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
        assert assoc.is_established
        for path in files[:8]:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        node.kill()                                  # SIGKILL with the association still open
        try:
            reply = assoc.send_c_store(dcmread(files[8]))
        except RuntimeError:                         # pynetdicom may notice the dead association first
            reply = Dataset()
        assert "Status" not in reply                  # the sender never got a success for the 9th
        assoc.abort()
        processes.append(start_pacsai("node", tmp_path, env))
        storescu(port, files[8:])                    # the sender retries the rest on a new association
        wait_delivered(tmp_path / "data")
        assert received(inbox) == ["SEG", "SR"]
        by_modality = {dcmread(p).Modality: p for p in inbox.iterdir()}
        check_seg_and_sr(by_modality["SEG"], by_modality["SR"], ct_series)   # all 20 referenced
        assert not list((tmp_path / "data" / "spool").rglob(".*.tmp"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


@pytest.mark.catalogue("W1", "Q9")
def test_worker_killed_during_inference_runs_the_job_again_once(tmp_path: Path, ct_series: Path, redis_url: str,
                                                                pacs: tuple[Process, int, Path]) -> None:
    """W1/Q9: the worker process running the job is killed -9; the job runs again; one SEG and one SR arrive."""
    storescp, pacs_port, inbox = pacs
    port = free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"STORESCU@127.0.0.1:{pacs_port}", broker_url=redis_url)
    with supervised(storescp) as processes:
        processes.append(start_pacsai("node", tmp_path, env))
        worker = start_pacsai("worker", tmp_path, env)
        processes.append(worker)
        storescu(port, sorted(ct_series.iterdir()))
        wait_until(lambda: jobs(tmp_path / "data").get("running"), 120, "the job to run", 0.05)
        victims = _children(worker.popen.pid)
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_delivered(tmp_path / "data")
        state = State(tmp_path / "data" / "pacsai.db")
        (job,) = state.jobs_in(JobState.DELIVERED)
        assert job.attempts == 2
        assert [(name, status, attempts) for name, status, attempts, _ in state.deliveries(job.job_id)] == [
            ("seg.dcm", "success", 1), ("sr.dcm", "success", 1)]
        assert received(inbox) == ["SEG", "SR"]


@pytest.mark.catalogue("Q2")
def test_redis_flushed_with_a_queued_job(tmp_path: Path, ct_series: Path, pacs: tuple[Process, int, Path]) -> None:
    """Q2: the broker loses a queued job (FLUSHALL, no persistence); the reconciler enqueues it again, once."""
    need("redis-server")
    storescp, pacs_port, inbox = pacs
    redis, url = start_redis(tmp_path / "redis", appendonly=False)
    port = free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"STORESCU@127.0.0.1:{pacs_port}", broker_url=url,
                     PACSAI_REQUEUE_AFTER_S="2")
    with supervised(redis, storescp) as processes:
        processes.append(start_pacsai("node", tmp_path, env))
        storescu(port, sorted(ct_series.iterdir()))
        wait_until(lambda: jobs(tmp_path / "data") == {"queued": 1}, 60, "a queued job", 0.5)
        import redis as redis_client

        redis_client.Redis.from_url(url).flushall()
        processes.append(start_pacsai("worker", tmp_path, env))
        wait_delivered(tmp_path / "data")
        assert "enqueued 1 job(s) again" in processes[2].log()
        assert received(inbox) == ["SEG", "SR"]


@pytest.mark.catalogue("Q3")
def test_redis_down_while_studies_arrive(tmp_path: Path, ct_series: Path, pacs: tuple[Process, int, Path]) -> None:
    """Q3: with Redis down, instances are still accepted; the job is enqueued once Redis is back."""
    need("redis-server")
    storescp, pacs_port, inbox = pacs
    redis_port, port = free_port(), free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"STORESCU@127.0.0.1:{pacs_port}",
                     broker_url=f"redis://127.0.0.1:{redis_port}/0")
    with supervised(storescp) as processes:
        processes.append(start_pacsai("node", tmp_path, env))
        storescu(port, sorted(ct_series.iterdir()))               # check=True: every C-STORE succeeded
        wait_until(lambda: jobs(tmp_path / "data") == {"pending": 1}, 60, "a pending job", 0.5)
        redis, _ = start_redis(tmp_path / "redis", port=redis_port)
        processes += [redis, start_pacsai("worker", tmp_path, env)]
        wait_delivered(tmp_path / "data")
        assert received(inbox) == ["SEG", "SR"]


@pytest.mark.catalogue("Q6", "W4")
def test_a_job_that_never_finishes_ends_dead(tmp_path: Path, ct_series: Path, redis_url: str,
                                             pacs: tuple[Process, int, Path]) -> None:
    """Q6: a job that exceeds its time limit every time is tried a bounded number of times, then dead."""
    storescp, pacs_port, inbox = pacs
    port = free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"STORESCU@127.0.0.1:{pacs_port}", broker_url=redis_url,
                     PACSAI_TASK_TIME_LIMIT_S="0.5", PACSAI_REQUEUE_AFTER_S="2")
    with supervised(storescp) as processes:
        processes += [start_pacsai("node", tmp_path, env), start_pacsai("worker", tmp_path, env)]
        storescu(port, sorted(ct_series.iterdir()))
        wait_until(lambda: jobs(tmp_path / "data") == {"dead": 1}, 180, "the job to be dead", 1.0)
        (job,) = State(tmp_path / "data" / "pacsai.db").jobs_in(JobState.DEAD)
        assert job.attempts == 3 and job.reason
        assert received(inbox) == []


@pytest.mark.catalogue("Q1")
def test_redis_restarted_with_queued_and_running_jobs(tmp_path: Path, ct_series: Path,
                                                      pacs: tuple[Process, int, Path]) -> None:
    """Q1: Redis (AOF on) restarts while one job runs and two wait; all three complete exactly once in effect."""
    need("redis-server")
    storescp, pacs_port, inbox = pacs
    redis, url = start_redis(tmp_path / "redis", appendonly=True)
    port = free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"STORESCU@127.0.0.1:{pacs_port}", broker_url=url,
                     PACSAI_REQUEUE_AFTER_S="5")
    studies = []
    for index in range(3):
        reuid_series(ct_series, tmp_path / "studies" / str(index), f"1.2.826.0.1.3680043.10.1051.5.{index}")
        studies.append(sorted((tmp_path / "studies" / str(index)).iterdir()))
    with supervised(storescp) as processes:
        processes += [start_pacsai("node", tmp_path, env), start_pacsai("worker", tmp_path, env)]
        for files in studies:
            storescu(port, files)
        wait_until(lambda: jobs(tmp_path / "data").get("running"), 120, "a running job", 0.05)
        redis.stop()
        redis, _ = start_redis(tmp_path / "redis", appendonly=True, port=int(url.rsplit(":", 1)[1].split("/")[0]))
        processes.append(redis)
        wait_until(lambda: jobs(tmp_path / "data") == {"delivered": 3}, 300, "three delivered jobs", 1.0)
        assert received(inbox) == ["SEG", "SEG", "SEG", "SR", "SR", "SR"]
        state = State(tmp_path / "data" / "pacsai.db")
        for job in state.jobs_in(JobState.DELIVERED):
            assert [attempts for _, _, attempts, _ in state.deliveries(job.job_id)] == [1, 1]
