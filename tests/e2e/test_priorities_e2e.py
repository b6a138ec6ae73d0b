"""A STAT study sent behind routine ones is processed and delivered before the routine ones still waiting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from pacsai.jobs import JobState, Priority
from pacsai.state import State
from tests.checks import reuid_series
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROUTES = """
rules:
  - {name: ct, model: ct-organs-tiny, match: {modality: [CT], min_instances: 10}}
  - {name: ct-stat, model: ct-organs-tiny, priority: stat, match: {modality: [CT], store_priority: [HIGH]}}
"""
HIGH = 1  # C-STORE Priority (0000,0700)


def send_with_priority(port: int, files: list[Path], priority: int) -> None:
    """One association, every file as a C-STORE with the given Priority (pynetdicom; storescu sends MEDIUM)."""
    ae = AE(ae_title="STORESCU")
    first = dcmread(files[0], stop_before_pixels=True)
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    for path in files:
        assert assoc.send_c_store(dcmread(path), priority=priority).Status == 0x0000
    assoc.release()


def delivered_order(data: Path) -> list[str]:
    """Study keys of delivered jobs, in the order they were delivered (from the job events)."""
    state = State(data / "pacsai.db")
    try:
        rows = {row.job_id: row for row in state.jobs_in(*JobState)}
        events = [(e.at, job_id) for job_id in rows for e in state.job_events(job_id) if e.to_state == "delivered"]
        return [rows[job_id].study_key for _, job_id in sorted(events)]
    finally:
        state.close()


def test_a_stat_study_overtakes_waiting_routine_studies(
    tmp_path: Path, ct_series: Path, redis_url: str, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Four routine CT studies, then one sent with C-STORE priority HIGH, which a rule makes STAT."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    studies = []
    for index in range(5):
        folder = tmp_path / "studies" / str(index)
        reuid_series(ct_series, folder, f"1.2.826.0.1.3680043.10.1051.7.{index}")
        studies.append(sorted(folder.iterdir()))
    pacsai = stack(peers=pacs.peer, broker_url=redis_url, PACSAI_ROUTES_FILE=str(routes))
    pacsai.start("node")
    pacsai.start("worker")
    for files in studies[:4]:
        pacsai.send(files, "STORESCU")  # routine: storescu asks MEDIUM
    send_with_priority(pacsai.port, studies[4], HIGH)
    pacsai.wait_jobs({"delivered": 5}, 600)
    state = State(pacsai.data / "pacsai.db")
    stat = [row.study_key for row in state.jobs_in(*JobState) if row.priority is Priority.STAT]
    assert len(stat) == 1, "only the study sent with C-STORE priority HIGH is STAT"
    order = delivered_order(pacsai.data)
    # in arrival order it would be last; it waits only for what already ran when it arrived (a study or two)
    assert order.index(stat[0]) <= 2, order
    assert len(pacs.modalities()) == 10
