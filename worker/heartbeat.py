"""Each worker process writes its heartbeat row (host, pid, models kept warm, device, GPU memory) every ~10 s.

The node's metrics and the console read the `workers` table (pacsai.console_db), so a worker is seen even when
no job runs; one whose row is older than 30 s counts as offline.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from celery.signals import worker_process_init

from pacsai.console_db import ConsoleTables, WorkerBeat
from pacsai.settings import Settings
from pacsai.state import State

log = logging.getLogger(__name__)
BEAT_EVERY_S = 10.0


def current_beat(started_at: float, device: str) -> WorkerBeat:
    """This process now: the models `worker.pipeline` keeps loaded (without importing it: that loads torch)."""
    pipeline = sys.modules.get("worker.pipeline")
    warm: dict[str, Any] = getattr(pipeline, "_warm", {}) if pipeline is not None else {}
    devices = {str(model.device) for model in warm.values()}
    device = devices.pop() if len(devices) == 1 else device
    memory = 0
    torch = sys.modules.get("torch")
    if torch is not None and device.startswith("cuda") and torch.cuda.is_initialized():
        memory = int(torch.cuda.memory_allocated())
    host, pid = socket.gethostname(), os.getpid()
    return WorkerBeat(f"{host}:{pid}", host, pid, tuple(sorted(warm)), device, memory, started_at, time.time())


def start_heartbeat(settings: Settings, every_s: float = BEAT_EVERY_S) -> threading.Thread:
    """Beat now and every `every_s` in a daemon thread of this process, on its own database connection."""
    tables = ConsoleTables(State(settings.storage.database))
    started_at = time.time()

    def run() -> None:
        while True:
            try:
                tables.beat(current_beat(started_at, settings.worker.device))
            except Exception as exc:  # a missed beat is not worth stopping a worker for
                log.warning("heartbeat not written (%s)", type(exc).__name__)
            time.sleep(every_s)

    thread = threading.Thread(target=run, name="heartbeat", daemon=True)
    thread.start()
    return thread


def _beat_in_pool_process(**_: object) -> None:
    """In each pool process after the fork (the parent loads no model)."""
    from celery import current_app

    settings = getattr(current_app, "pacsai_settings", None)
    if isinstance(settings, Settings):
        start_heartbeat(settings)


worker_process_init.connect(_beat_in_pool_process, weak=False)
