"""Completion without idle waiting (issue 11 goal 4), through a real node and dcmtk storescu: a series released with
as many instances as it declares (ImagesInAcquisition) completes at once; one instance short, it waits for the
timers (here a 60 s release grace, so waiting shows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench.make_ct import write_ct
from pacsai.state import State
from tests.services import wait_until
from tests.stack import Stack


def series_states(stack: Stack) -> dict[str, int]:
    state = State(stack.data / "pacsai.db")
    try:
        return dict(state.counts()["series"])
    finally:
        state.close()


def test_released_series_with_its_declared_count_completes_without_the_grace(
    stack: Callable[..., Stack], tmp_path: Path
) -> None:
    node = stack(peers="SENDER@127.0.0.1:1", PACSAI_RELEASE_GRACE_S="60", PACSAI_QUIET_PERIOD_S="300")
    node.start("node")
    whole = write_ct(tmp_path / "whole", slices=12, size=32, study=0)  # declares ImagesInAcquisition 12
    short = write_ct(tmp_path / "short", slices=12, size=32, study=1)
    node.send(whole, "SENDER")
    released = time.monotonic()
    wait_until(lambda: series_states(node).get("complete") == 1, 10, "the whole series complete", 0.2)
    assert time.monotonic() - released < 10  # far below the 60 s grace
    assert sum(node.jobs().values()) == 1  # its job, recorded (no worker runs here)
    node.send(short[:11], "SENDER")  # 11 of the 12 it declares
    time.sleep(3)  # several assembler ticks
    assert series_states(node) == {"complete": 1, "receiving": 1}
    assert sum(node.jobs().values()) == 1
