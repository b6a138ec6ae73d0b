"""The limits several receiver processes share (dicom_node/shared_limits.py): each row written by its own process."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest

from dicom_node import shared_limits
from dicom_node.shared_limits import ADDRESS_SLOTS, SharedLimits


def _rows(receivers: int) -> SharedLimits:
    return SharedLimits(receivers, multiprocessing.get_context("spawn"))


def test_each_process_sees_the_others_rows_and_not_its_own() -> None:
    limits = _rows(3)
    limits.publish_associations(2)
    limits.publish_connections({"10.0.0.1": 2, "10.0.0.2": 1})
    limits.index = 1
    limits.publish_associations(1)
    limits.publish_connections({"10.0.0.1": 3})
    assert limits.associations_elsewhere() == 2
    assert limits.connections_elsewhere("10.0.0.1") == 2
    assert limits.connections_elsewhere("10.0.0.2") == 1
    limits.index = 2
    assert limits.associations_elsewhere() == 3
    assert limits.connections_elsewhere("10.0.0.1") == 5
    assert limits.connections_elsewhere("10.0.0.9") == 0


def test_a_new_publication_replaces_the_old_one_and_a_cleared_row_counts_nothing() -> None:
    limits = _rows(2)
    limits.publish_connections({f"10.0.0.{n}": 1 for n in range(10)})
    limits.publish_connections({"10.0.0.3": 4})  # fewer addresses than before: the rest of the row is emptied
    limits.publish_associations(3)
    limits.index = 1
    assert limits.connections_elsewhere("10.0.0.3") == 4
    assert sum(limits.connections_elsewhere(f"10.0.0.{n}") for n in range(10)) == 4
    limits.clear(0)  # receiver 0 died
    assert limits.connections_elsewhere("10.0.0.3") == 0
    assert limits.associations_elsewhere() == 0


def test_more_addresses_than_slots_publish_the_busiest() -> None:
    limits = _rows(2)
    held = {f"10.1.{n // 256}.{n % 256}": 1 for n in range(ADDRESS_SLOTS + 50)}
    held["10.9.9.9"] = 7
    limits.publish_connections(held)
    limits.index = 1
    assert limits.connections_elsewhere("10.9.9.9") == 7
    assert sum(limits.connections_elsewhere(address) for address in held) == 7 + ADDRESS_SLOTS - 1


def _die_holding(lock: Any) -> None:
    lock.acquire()
    os._exit(0)  # killed while holding it, as kill -9 would leave it


def test_a_lock_left_held_by_a_dead_receiver_is_freed_and_never_stops_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    context = multiprocessing.get_context("spawn")
    limits = SharedLimits(2, context)
    process = context.Process(target=_die_holding, args=(limits.lock,))
    process.start()
    process.join(timeout=30)
    monkeypatch.setattr(shared_limits, "LOCK_WAIT_S", 0.1)
    with limits.locked():  # held by the dead process: decided without it, with an error in the log
        limits.publish_associations(1)
    assert "not free" in caplog.text
    limits.recover()  # what the node does when a receiver ends
    assert "freed it" in caplog.text
    caplog.clear()
    with limits.locked():
        pass
    assert caplog.text == ""
    limits.recover()  # a free lock stays free
    assert limits.lock.acquire(timeout=1)
