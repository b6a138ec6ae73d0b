"""Each worker process of a pool gets its share of the host's cores for torch (issue 11 goal 5)."""

from __future__ import annotations

import os

from worker.pipeline import cpu_threads


def test_each_of_the_pool_processes_gets_its_share_of_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(1) == cores
    assert cpu_threads(cores) == 1
    assert cpu_threads(cores * 4) == 1  # never none
    assert cpu_threads(0) == cores
