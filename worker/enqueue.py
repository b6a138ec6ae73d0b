"""The only producer: puts jobs and deliveries on their Celery queues by task name."""

from __future__ import annotations

from amqp.exceptions import ChannelError
from celery import Celery

from worker.jobs import Delivery, SeriesJob

INFER_TASK = "pacsai.infer"
DELIVER_TASK = "pacsai.deliver"
INFER_QUEUE = "infer"
DELIVER_QUEUE = "deliver"


def infer_queue(model: str) -> str:
    """One queue per model, so a GPU box can serve the heavy models and a CPU box the light ones."""
    return f"{INFER_QUEUE}.{model}"


def enqueue_job(app: Celery, job: SeriesJob) -> None:
    app.send_task(INFER_TASK, args=[job.to_message()], queue=infer_queue(job.model), task_id=f"infer-{job.job_id}")


def enqueue_delivery(app: Celery, delivery: Delivery) -> None:
    app.send_task(DELIVER_TASK, args=[delivery.to_message()], queue=DELIVER_QUEUE,
                  task_id=f"deliver-{delivery.job_id}")


def broker_diagnosis(app: Celery) -> str:
    """Why a Redis broker may refuse writes, in words for the operator ('' when nothing is found or it is not Redis)."""
    try:
        with app.connection_for_write() as connection:
            if connection.transport_cls not in ("redis", "rediss"):
                return ""
            memory = connection.default_channel.client.info("memory")
    except Exception:
        return ""
    used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    if limit and used >= limit:
        return (f"Redis is full: {used >> 20} MB used of maxmemory {limit >> 20} MB, policy "
                f"{memory.get('maxmemory_policy', '?')}; it refuses new jobs until memory is freed or raised")
    return ""


def queue_depth(app: Celery, queue: str) -> int | None:
    """Messages waiting in a queue (not those a worker holds), or None when the broker cannot be asked."""
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1)
            try:
                return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError:   # the queue does not exist (Redis deletes empty lists): nothing waiting
                return 0
    except Exception:
        return None
