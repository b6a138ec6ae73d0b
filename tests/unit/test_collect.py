"""worker.collect: no full collection while a job runs, one after it; thresholds restored."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker import collect


@pytest.fixture
def full_collections() -> Iterator[list[int]]:
    """The generation of every collection that starts while the test runs."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    try:
        yield seen
    finally:
        gc.callbacks.remove(note)


def churn() -> None:
    """Enough surviving cyclic garbage for CPython to start full collections on its own (default thresholds)."""
    kept = []
    for _ in range(300_000):
        node: dict[str, object] = {}
        node["self"] = node
        kept.append(node)
    del kept


def test_full_collections_wait_for_the_end_of_the_job(full_collections: list[int]) -> None:
    before = gc.get_threshold()
    churn()
    assert 2 in full_collections  # without the block, the same work sets them off
    full_collections.clear()
    with collect.after_the_job():
        churn()
        assert 2 not in full_collections
        assert 0 in full_collections  # young generations still run
        assert gc.get_threshold()[:2] == before[:2]
    assert full_collections[-1] == 2
    assert gc.get_threshold() == before


def test_a_nested_block_or_a_disabled_collector_is_left_alone(full_collections: list[int]) -> None:
    before = gc.get_threshold()
    with collect.after_the_job():
        with collect.after_the_job():
            pass
        assert 2 not in full_collections  # the inner block did not collect, nor restore the thresholds
        assert gc.get_threshold() != before
    assert gc.get_threshold() == before
    gc.disable()
    try:
        full_collections.clear()
        with collect.after_the_job():
            assert gc.get_threshold() == before
        assert full_collections == []
    finally:
        gc.enable()


def test_freeze_moves_what_is_alive_out_of_every_collection() -> None:
    try:
        collect.freeze_loaded()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
