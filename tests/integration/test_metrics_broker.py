"""The node's /metrics with the broker down (issue 13): queue depths asked over one connection, so a scrape costs one
connect timeout instead of one per queue, and says the broker is down."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry, start_http_server

from dicom_node.metrics import StateCollector
from pacsai.celery_app import create_app
from pacsai.enqueue import broker_queues, enqueue_job, queue_depths
from pacsai.jobs import SeriesJob
from pacsai.settings import Settings
from pacsai.state import State
from tests.conftest import need
from tests.services import Process, free_port, start_redis

pytestmark = pytest.mark.integration
MODELS = ("ct-organs-tiny", "cxr-pneumonia", "mr-brain", "ct-lung")  # 4 models x 3 tiers + deliver = 13 queues


@dataclass(frozen=True, slots=True)
class Node:
    url: str  # the /metrics endpoint
    redis: Process
    app: Celery


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    need("redis-server")
    redis, url = start_redis(tmp_path)
    try:
        settings = Settings.from_env(
            {
                "PACSAI_DATA_DIR": str(tmp_path / "data"),
                "PACSAI_PEERS": f"PACS@127.0.0.1:{free_port()}",
                "PACSAI_LOG_KEY": "test-log-key",
                "PACSAI_BROKER_URL": url,
            }
        )
        state, app = State(settings.storage.database), create_app(settings)

        def depths(names: Sequence[str]) -> dict[str, int | None]:  # as node.start_metrics wires it
            return queue_depths(app, names)

        registry = CollectorRegistry()
        collector = StateCollector(state, 3, settings, depths, tuple(broker_queues(MODELS)))
        registry.register(collector)
        port = free_port()
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        yield Node(f"http://127.0.0.1:{port}/metrics", redis, app)
        server.shutdown()
        thread.join(5)
        state.close()
    finally:
        redis.stop()


def scrape(url: str) -> tuple[float, str]:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read().decode()
    return time.monotonic() - started, body


def test_scrape_with_redis_stopped_returns_in_seconds_and_says_broker_down(node: Node) -> None:
    url = node.url
    enqueue_job(node.app, SeriesJob("a1b2c3d4e5f6a7b8c9d0", "t" * 16, "s" * 16, "ct-organs-tiny", "m", "PACS"))
    _elapsed, body = scrape(url)
    assert "pacsai_broker_up 1.0" in body
    assert 'pacsai_queue_depth{queue="infer.ct-organs-tiny"} 1.0' in body
    node.redis.stop()
    elapsed, body = scrape(url)
    assert "pacsai_broker_up 0.0" in body
    assert "pacsai_queue_depth{" not in body  # unknown, not zero
    assert "pacsai_jobs{" in body or "# TYPE pacsai_jobs gauge" in body  # the rest of the scrape still answers
    assert elapsed < 5.0, f"scrape took {elapsed:.1f} s with {len(broker_queues(MODELS))} queues"
