"""Python's full garbage collections kept off a job's critical path.

A warm worker holds ~340,000 objects the cyclic garbage collector tracks (torch, MONAI, highdicom, the model), and a
job makes ~100,000 more while it reads 300 slices and builds a SEG and an SR. CPython then runs a full collection
(generation 2) one to three times per job, each walking every tracked object: 0.1-0.6 s per job that showed up as
noise in whichever stage it landed (bench/worker_stages.py; measured with gc.callbacks, docs/benchmarks.md).

- `freeze_loaded()`: after a model is loaded, what is alive then (libraries, model) moves to the permanent
  generation, which no collection walks again.
- `after_the_job()`: while a job runs, young generations are collected as usual (they catch most short-lived
  cycles), full collections wait; when the job has handed its results on and dropped its objects, one full
  collection runs, on the few that are left.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
_NEVER = 1 << 30  # a generation-2 threshold no job reaches (the count grows by one per generation-1 collection)


def freeze_loaded() -> None:
    """Collect, then move every tracked object to the permanent generation (gc.freeze)."""
    gc.collect()
    gc.freeze()


@contextmanager
def after_the_job() -> Iterator[None]:
    """Full collections wait until the block ends; then one runs (young ones go on as usual within)."""
    young, middle, full = gc.get_threshold()
    paused = gc.isenabled() and full != _NEVER  # a nested block, or collection turned off: leave it as it is
    if paused:
        gc.set_threshold(young, middle, _NEVER)
    try:
        yield
    finally:
        if paused:
            gc.set_threshold(young, middle, full)
            started = time.monotonic()
            found = gc.collect()
            log.debug(
                "full collection after the job: %d unreachable objects in %.3f s", found, time.monotonic() - started
            )
