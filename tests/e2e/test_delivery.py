"""E1–E4: how delivery behaves for each answer a PACS can give (a pynetdicom SCP in the test plays the PACS)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.receive import set_nodelay
from tests.conftest import need
from tests.services import free_port, pacsai_env, start_pacsai, supervised, wait_until
from worker.jobs import JobState
from worker.state import State

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ABORT = -1


class ScriptedPacs:
    """A real Storage SCP that answers C-STOREs from a script (status codes, or ABORT after the data arrived)."""

    def __init__(self, script: list[int], port: int) -> None:
        self.script, self.received = list(script), []  # type: list[int], list[Dataset]
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_CONN_OPEN, set_nodelay)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            answer = self.script.pop(0) if self.script else 0x0000
            if answer == ABORT:
                event.assoc.abort()
                return 0x0000
            if answer in (0x0000,) or 0xB000 <= answer <= 0xBFFF:
                self.received.append(event.dataset)
            return answer


@pytest.fixture()
def node_and_worker(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    need("storescu")
    port, pacs_port = free_port(), free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"PACS@127.0.0.1:{pacs_port}")
    with supervised() as processes:
        processes += [start_pacsai("node", tmp_path, env), start_pacsai("worker", tmp_path, env)]
        yield port, pacs_port, tmp_path / "data"


@pytest.mark.parametrize(("script", "job_state", "outcomes", "stored"), [
    ([0xB000, 0xB007], "delivered", ["warning", "warning"], 2),                  # E3: warnings count as delivered
    ([0xA700, 0x0000, 0x0000], "delivered", ["success", "success"], 2),          # E3: out of resources: retried
    ([ABORT, 0x0000, 0x0000], "delivered", ["success", "success"], 2),           # E4: dropped after data: resent
    ([0xA900, 0x0000], "failed", ["permanent", "success"], 1),                   # E3: refused: failed, no retry
    ([0xC000, 0xC000], "failed", ["permanent", "permanent"], 0),
])
@pytest.mark.catalogue("E3", "E4")
def test_each_answer_class(script: list[int], job_state: str, outcomes: list[str], stored: int, ct_series: Path,
                           node_and_worker: tuple[int, int, Path]) -> None:
    port, pacs_port, data = node_and_worker
    pacs = ScriptedPacs(script, pacs_port)
    try:
        subprocess.run(["storescu", "-xv", "-aet", "PACS", "-aec", "PACSAI", "+sd", "127.0.0.1", str(port),
                        str(ct_series)], check=True, timeout=120, capture_output=True)

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
        assert len({ds.SOPInstanceUID for ds in pacs.received}) == stored      # nothing stored twice
    finally:
        pacs.server.shutdown()
