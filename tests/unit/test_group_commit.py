"""Group commit of the instances table (issue 11): concurrent associations share one transaction, each thread
returns only once its own row is committed, and a failed commit fails every row it carried."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pacsai.group_commit import GroupCommit
from pacsai.state import State
from pacsai.storage import SpooledInstance


def test_rows_waiting_while_a_commit_runs_are_written_together() -> None:
    batches: list[list[int]] = []
    first_started = threading.Event()

    def write(rows: Sequence[int]) -> None:
        first_started.set()
        time.sleep(0.2)  # a slow fsync: the other threads queue up meanwhile
        batches.append(list(rows))

    group = GroupCommit(write)
    first = threading.Thread(target=group.commit, args=(0,))
    first.start()
    first_started.wait(5)
    others = [threading.Thread(target=group.commit, args=(n,)) for n in range(1, 6)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(10)
    assert batches[0] == [0]
    assert len(batches) <= 3  # the five that waited went in one or two transactions, not five
    assert sorted(sum(batches, [])) == list(range(6))


def test_a_failed_commit_fails_every_row_it_carried() -> None:
    def write(rows: Sequence[int]) -> None:
        raise OSError("disk gone")

    group = GroupCommit(write)
    with pytest.raises(OSError, match="disk gone"):
        group.commit(1)


def test_instances_recorded_from_many_threads_are_all_there(tmp_path: Path) -> None:
    state = State(tmp_path / "pacsai.db")

    def record(n: int) -> None:
        state.record_instance(
            SpooledInstance("study", f"series{n % 2}", f"sop{n}", f"study/series{n % 2}/sop{n}.dcm"),
            calling_ae="SCU",
            called_ae="PACSAI",
            header={"Modality": "CT"},
        )

    threads = [threading.Thread(target=record, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert state.instance_count("series0") == state.instance_count("series1") == 20
    assert {row.series_key for row in state.receiving_series()} == {"series0", "series1"}
    state.close()
