"""The Celery app: Redis when PACSAI_BROKER_URL is set, else an on-disk queue; defaults for long GPU-bound jobs."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from pacsai.enqueue import DELIVER_QUEUE, DELIVER_TASK, INFER_QUEUE, INFER_TASK
from pacsai.settings import Settings

ON_DISK_POLL_S = 0.05


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Broker URL and transport options; the on-disk queue keeps messages under data_dir/queue."""
    if settings.queue.broker_url:
        # visibility timeout above the longest job, so Redis does not redeliver a job that is still running
        # queues consumed in the order the worker lists them (STAT first), not round robin
        options = {"visibility_timeout": settings.queue.visibility_timeout_s, "queue_order_strategy": "priority"}
        return settings.queue.broker_url, options
    folder = settings.storage.queue_dir
    for sub in ("messages", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return "filesystem://", {
        "data_folder_in": str(folder / "messages"),
        "data_folder_out": str(folder / "messages"),
        "processed_folder": str(folder / "processed"),
        "store_processed": False,
        "control_folder": str(folder / "control"),
        # kombu lists the folder this often when it found nothing (default 1 s: a job or a delivery waited 0.5 s on
        # average to be picked up). Each job takes two hops (infer, deliver): 0.05 s waits 0.05 s per job on average
        # for 1.6 % of one core while idle (0.1 s: 1.15 %; 0.02 s: 2.85 %, measured with `pacsai run`)
        "polling_interval": ON_DISK_POLL_S,
    }


def create_app(settings: Settings) -> Celery:
    url, transport_options = broker_options(settings)
    app = Celery("pacsai", broker=url, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,  # a job lost with its worker is delivered again
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one long job at a time per process
        task_time_limit=settings.queue.task_time_limit_s,
        task_soft_time_limit=settings.queue.task_time_limit_s * 0.9,
        task_routes={INFER_TASK: {"queue": INFER_QUEUE}, DELIVER_TASK: {"queue": DELIVER_QUEUE}},
        task_default_queue=INFER_QUEUE,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        worker_hijack_root_logger=False,
        worker_max_memory_per_child=8_000_000,  # KiB: recycle a child that leaked past ~8 GB
        worker_send_task_events=True,
        task_send_sent_event=True,  # for Flower
    )
    app.pacsai_settings = settings
    return app


_apps: dict[str, Celery] = {}


def __getattr__(name: str) -> Celery:
    """`celery -A pacsai.celery_app worker|flower` builds `app` from the process environment, on first use only."""
    if name != "app":
        raise AttributeError(name)
    if "app" not in _apps:
        _apps["app"] = create_app(Settings.from_env(os.environ).with_log_key())
    return _apps["app"]
