"""E1–E4: how delivery behaves for each answer a PACS can give (a pynetdicom SCP in the test plays the PACS)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pacsai.jobs import JobState
from pacsai.state import State
from tests.conftest import need
from tests.pacs import ABORT, ScriptedPacs
from tests.services import free_port, wait_until
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture()
def node_and_worker(stack: Callable[..., Stack]) -> tuple[int, int, Path]:
    need("storescu")
    pacs_port = free_port()
    pacsai = stack(peers=f"PACS@127.0.0.1:{pacs_port}")
    pacsai.start("node")
    pacsai.start("worker")
    return pacsai.port, pacs_port, pacsai.data


@pytest.mark.parametrize(
    ("script", "job_state", "outcomes", "stored"),
    [
        ([0xB000, 0xB007], "delivered", ["warning", "warning"], 2),  # E3: warnings count as delivered
        ([0xA700, 0x0000, 0x0000], "delivered", ["success", "success"], 2),  # E3: out of resources: retried
        ([ABORT, 0x0000, 0x0000], "delivered", ["success", "success"], 2),  # E4: dropped after data: resent
        ([0xA900, 0x0000], "failed", ["permanent", "success"], 1),  # E3: refused: failed, no retry
        ([0xC000, 0xC000], "failed", ["permanent", "permanent"], 0),
    ],
)
@pytest.mark.catalogue("E3", "E4")
def test_each_answer_class(
    script: list[int],
    job_state: str,
    outcomes: list[str],
    stored: int,
    ct_series: Path,
    node_and_worker: tuple[int, int, Path],
) -> None:
    port, pacs_port, data = node_and_worker
    pacs = ScriptedPacs(script=script, port=pacs_port)
    try:
        subprocess.run(
            ["storescu", "-xv", "-aet", "PACS", "-aec", "PACSAI", "+sd", "127.0.0.1", str(port), str(ct_series)],
            check=True,
            timeout=120,
            capture_output=True,
        )

        def finished() -> bool:
            state = State(data / "pacsai.db")
            counts = state.counts()["jobs"]
            state.close()
            return counts in ({"delivered": 1}, {"failed": 1})

        wait_until(finished, 180, "the job to finish", 0.5)
        state = State(data / "pacsai.db")
        (job,) = state.jobs_in(*JobState)
        assert job.state.value == job_state
        assert [status for _, status, _, _ in state.deliveries(job.job_id)] == outcomes
        assert len(pacs.received) == stored
        assert len({ds.SOPInstanceUID for ds in pacs.received}) == stored  # nothing stored twice
    finally:
        pacs.stop()
