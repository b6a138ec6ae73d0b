"""Flower works against pacsai's Celery app on a real Redis and sees a running pacsai worker."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.services import free_port, pacsai_env, port_open, spawn, start_pacsai, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_flower_lists_the_worker(tmp_path: Path, redis_url: str) -> None:
    env = pacsai_env(
        tmp_path / "data",
        port=free_port(),
        peers="PACS@127.0.0.1:104",
        broker_url=redis_url,
        FLOWER_UNAUTHENTICATED_API="true",
    )
    worker = start_pacsai("worker", tmp_path, env)
    flower_port = free_port()
    flower = spawn(
        "flower",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "pacsai.celery_app",
            "flower",
            f"--port={flower_port}",
            "--address=127.0.0.1",
        ],
        tmp_path,
        {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        wait_until(lambda: port_open(flower_port), 60, "flower")

        def workers() -> dict[str, object]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", timeout=20) as r:
                    found: dict[str, object] = json.loads(r.read())
            except (urllib.error.URLError, ConnectionError):
                return {}
            return found

        found = wait_until(workers, 90, "the worker in Flower", 2.0)
        assert any(name.startswith("pacsai-") for name in found)
    except BaseException:
        print(worker.log()[-3000:], flower.log()[-3000:])
        raise
    finally:
        flower.stop()
        worker.stop()
