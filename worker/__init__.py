"""GPU/CPU worker: Celery app, tasks, series loading, inference, SEG/SR encoding."""
