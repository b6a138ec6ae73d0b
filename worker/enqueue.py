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
