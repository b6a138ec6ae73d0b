"""Stage times of the job running in this process (load, model, encode, delivery), kept for the task to record."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[dict[str, float] | None] = ContextVar("pacsai_stage_times", default=None)


def note(stage: str, seconds: float) -> None:
    """Add `seconds` to `stage` of the job being timed (nothing happens outside `timing`)."""
    times = _current.get()
    if times is not None:
        times[stage] = times.get(stage, 0.0) + seconds


@contextmanager
def timing() -> Iterator[dict[str, float]]:
    """Collect the stages noted inside the block; the dict is filled when the block ends, even on an error."""
    times: dict[str, float] = {}
    token = _current.set(times)
    try:
        yield times
    finally:
        _current.reset(token)
