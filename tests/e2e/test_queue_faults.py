"""Queue faults with real processes: duplicate deliveries, failing jobs, a full Redis (Q4, Q5, Q7, Q8, Q10)."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_client
import yaml

from pacsai.celery_app import create_app
from pacsai.enqueue import enqueue_delivery, enqueue_job
from pacsai.jobs import Delivery, JobState
from pacsai.settings import Settings
from pacsai.state import State
from tests.conftest import need
from tests.pacs import ScriptedPacs
from tests.services import REPO, free_port, start_redis, wait_until
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def model_copy(tmp_path: Path, **preprocessing: object) -> Path:
    """The shipped CT model with other sliding-window settings (a site may tune them in its own models folder)."""
    folder = tmp_path / "models"
    shutil.copytree(REPO / "models" / "ct_organs_tiny", folder / "ct_organs_tiny")
    spec_path = folder / "ct_organs_tiny" / "spec.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["preprocessing"].update(preprocessing)
    spec_path.write_text(yaml.safe_dump(spec))
    return folder


def messages_held(client: redis_client.Redis) -> int:
    """Messages the Redis broker holds: in any queue (one list per queue and priority) or delivered and unacked."""
    queued = sum(client.llen(key) for key in client.scan_iter() if client.type(key) == b"list")
    return queued + int(client.zcard("unacked_index"))


@pytest.mark.catalogue("Q5", "Q10")
def test_a_job_delivered_again_while_it_runs_is_run_and_exported_once(
    tmp_path: Path, ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Q5/Q10: Redis hands a running job to a second worker process (visibility timeout passed, or the connection
    dropped and the unacknowledged message came back): the copy is recognised and dropped; one export."""
    need("redis-server")
    redis, url = start_redis(tmp_path / "redis")
    pacsai = stack(
        peers=pacs.peer,
        broker_url=url,
        PACSAI_WORKER_CONCURRENCY="2",  # an idle second process to take the copy at once
        PACSAI_MODELS_DIR=str(model_copy(tmp_path, roi_size=[32, 32, 16], overlap=0.75, sw_batch_size=1)),
    )  # about 10 s of inference
    pacsai.adopt(redis)
    pacsai.start("node")
    worker = pacsai.start("worker")
    pacsai.send(sorted(ct_series.iterdir()), "STORESCU")
    wait_until(lambda: pacsai.jobs().get("running"), 120, "the job to run", 0.05)
    state = State(pacsai.data / "pacsai.db")
    (row,) = state.jobs_in(JobState.RUNNING)
    enqueue_job(create_app(Settings.from_env(pacsai.env)), row.to_job())  # what Redis does when it redelivers
    wait_until(lambda: "second delivery is dropped" in worker.log(), 60, "the copy to be dropped", 0.2)
    assert state.job(row.job_id).state is JobState.RUNNING  # type: ignore[union-attr]
    pacsai.wait_jobs({"delivered": 1})
    (job,) = state.jobs_in(JobState.DELIVERED)
    assert job.attempts == 1
    assert [(name, attempts) for name, _, attempts, _ in state.deliveries(job.job_id)] == [
        ("seg.dcm", 1),
        ("sr.dcm", 1),
    ]
    assert pacs.modalities() == ["SEG", "SR"]


@pytest.mark.catalogue("Q7", "Q8")
def test_a_job_that_raises_is_retried_from_the_database_then_dead_with_its_reason(
    tmp_path: Path, ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Q7/Q8: the model raises an ordinary exception on every attempt. Each retry waits in the database (not as a
    broker countdown), is enqueued by the node when due, and after three attempts the job is dead with its reason,
    counted in the metrics; nothing is exported."""
    need("redis-server")
    redis, url = start_redis(tmp_path / "redis")
    pacsai = stack(
        peers=pacs.peer,
        broker_url=url,
        PACSAI_METRICS_PORT=str(metrics_port := free_port()),
        PACSAI_RETRY_DELAY_S="2",
        PACSAI_MODELS_DIR=str(model_copy(tmp_path, roi_size=[36, 36, 12])),
    )  # not a multiple of 8
    pacsai.adopt(redis)
    pacsai.start("node")
    worker = pacsai.start("worker")
    pacsai.send(sorted(ct_series.iterdir()), "STORESCU")
    wait_until(lambda: pacsai.jobs().get("retrying"), 120, "a job waiting for its retry", 0.2)
    # the failed attempt's message is acknowledged just after the task returns; from then until the retry is due, the
    # job waits in the database alone (a Celery countdown would publish its new message before acknowledging the old)
    client = redis_client.Redis.from_url(url)
    wait_until(lambda: messages_held(client) == 0, 10, "the failed attempt's message to be acknowledged", 0.02)
    assert pacsai.jobs().get("retrying") == 1
    pacsai.wait_jobs({"dead": 1})
    (job,) = State(pacsai.data / "pacsai.db").jobs_in(JobState.DEAD)
    assert job.attempts == 3 and job.reason == "RuntimeError"
    assert worker.log().count("job failed unexpectedly (RuntimeError)") == 3
    assert "job dead: RuntimeError" in worker.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        assert 'pacsai_jobs{state="dead"} 1.0' in response.read().decode()
    assert pacs.modalities() == []


@pytest.mark.catalogue("Q4")
def test_a_full_redis_refuses_jobs_loudly_and_they_wait_in_the_database(
    tmp_path: Path, ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Q4: Redis at maxmemory with noeviction refuses the enqueue; the node says so, the job stays pending in the
    database, no key is evicted, and once Redis has room the job runs and its results are delivered."""
    need("redis-server")
    redis, url = start_redis(tmp_path / "redis")
    pacsai = stack(peers=pacs.peer, broker_url=url)
    pacsai.adopt(redis)
    client = redis_client.Redis.from_url(url)
    node = pacsai.start("node")
    pacsai.start("worker")
    app = create_app(Settings.from_env(pacsai.env))
    wait_until(lambda: app.control.ping(timeout=1.0), 120, "the worker to answer a ping", 0.5)
    client.set("site-owned-key", "kept")
    client.config_set("maxmemory", "1")  # used memory is now over the limit: every write is refused
    with pytest.raises(redis_client.exceptions.OutOfMemoryError):
        client.set("probe", "x")
    pacsai.send(sorted(ct_series.iterdir()), "STORESCU")
    wait_until(lambda: "Redis is full" in node.log(), 60, "the node to report the refused enqueue", 0.5)
    assert pacsai.jobs() == {"pending": 1}
    assert client.get("site-owned-key") == b"kept"  # noeviction: nothing was thrown away
    client.config_set("maxmemory", "0")
    pacsai.wait_jobs({"delivered": 1})
    assert pacs.modalities() == ["SEG", "SR"]


@pytest.mark.catalogue("Q10")
def test_a_delivery_handed_out_twice_sends_the_results_once(
    tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """The broker hands a delivery out again while the first is still sending to a slow PACS: the copy finds the
    results held by a live sender and leaves them; the PACS stores each result once."""
    need("storescu"), need("redis-server")
    redis, url = start_redis(tmp_path / "redis")
    pacs = ScriptedPacs(pause_s=3.0)  # a delivery is still under way when its copy arrives
    pacsai = stack(peers=f"PACS@127.0.0.1:{pacs.port}", broker_url=url, PACSAI_WORKER_CONCURRENCY="2")
    pacsai.adopt(redis)
    try:
        pacsai.start("node")
        worker = pacsai.start("worker")
        pacsai.send(sorted(ct_series.iterdir()), "PACS")
        assert pacs.storing.wait(180), "the delivery never reached the PACS"
        state = State(pacsai.data / "pacsai.db")
        (row,) = state.jobs_in(JobState.ENCODED)
        enqueue_delivery(create_app(Settings.from_env(pacsai.env)), Delivery(row.job_id, "PACS"))
        wait_until(lambda: "this second delivery is dropped" in worker.log(), 60, "the copy to be dropped", 0.2)
        pacsai.wait_jobs({"delivered": 1}, 120)
        assert [(name, status, attempts) for name, status, attempts, _ in state.deliveries(row.job_id)] == [
            ("seg.dcm", "success", 1),
            ("sr.dcm", "success", 1),
        ]
        assert sorted(ds.Modality for ds in pacs.received) == ["SEG", "SR"]
    finally:
        pacs.stop()
