"""The only producer: puts jobs and deliveries on their Celery queues by task name."""

from __future__ import annotations

from collections.abc import Iterable

from amqp.exceptions import ChannelError
from celery import Celery

from pacsai.jobs import Delivery, Priority, SeriesJob

INFER_TASK = "pacsai.infer"
DELIVER_TASK = "pacsai.deliver"
INFER_QUEUE = "infer"
DELIVER_QUEUE = "deliver"


def infer_queue(model: str, priority: Priority = Priority.ROUTINE) -> str:
    """One queue per model and priority, so a GPU box can serve the heavy models and a CPU box the light ones, and
    a worker takes STAT jobs first: `infer.<model>` (routine), `infer.<model>.stat`, `infer.<model>.background`."""
    base = f"{INFER_QUEUE}.{model}"
    return base if priority is Priority.ROUTINE else f"{base}.{priority.value}"


def infer_queues(model: str) -> list[str]:
    """A model's queues in the order a worker consumes them: most urgent first."""
    return [infer_queue(model, priority) for priority in sorted(Priority, key=lambda p: p.rank)]


def broker_queues(models: Iterable[str]) -> list[str]:
    """Every queue the broker holds for these models (each priority tier), then the delivery queue."""
    return [queue for model in dict.fromkeys(models) for queue in infer_queues(model)] + [DELIVER_QUEUE]


def enqueue_job(app: Celery, job: SeriesJob) -> None:
    queue = infer_queue(job.model, job.priority)
    app.send_task(INFER_TASK, args=[job.to_message()], queue=queue, task_id=f"infer-{job.job_id}")


def enqueue_delivery(app: Celery, delivery: Delivery) -> None:
    app.send_task(DELIVER_TASK, args=[delivery.to_message()], queue=DELIVER_QUEUE, task_id=f"deliver-{delivery.job_id}")


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
        return (
            f"Redis is full: {used >> 20} MB used of maxmemory {limit >> 20} MB, policy "
            f"{memory.get('maxmemory_policy', '?')}; it refuses new jobs until memory is freed or raised"
        )
    return ""


def queue_depth(app: Celery, queue: str) -> int | None:
    """Messages waiting in a queue (not those a worker holds), or None when the broker cannot be asked."""
    return queue_depths(app, [queue])[queue]


def queue_depths(app: Celery, queues: Iterable[str]) -> dict[str, int | None]:
    """The depth of each queue, asked over one connection: a broker that is down costs one timeout, not one each."""
    queues = list(queues)
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1)
            depths: dict[str, int | None] = {}
            for queue in queues:
                with connection.channel() as channel:  # a fresh channel: AMQP closes one that asked for a lost queue
                    try:
                        depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                    except ChannelError:  # the queue does not exist (Redis deletes empty lists): nothing waiting
                        depths[queue] = 0
            return depths
    except Exception:
        return dict.fromkeys(queues)
