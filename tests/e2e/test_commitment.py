"""Proof of delivery with real peers: Orthanc commits our results (Storage Commitment, report on a new association
to the node) or finds them (C-FIND); dcmtk storescp supports neither and the job stays delivered with the reason."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pacsai.commitment_table import Confirmation
from pacsai.jobs import DeliveryStatus, JobState
from pacsai.state import State
from tests.conftest import need
from tests.services import free_port, start_orthanc, start_storescp, wait_until
from tests.stack import Stack

pytestmark = [pytest.mark.e2e]
FAST = {"PACSAI_VERIFY_TIMEOUT_S": "10", "PACSAI_VERIFY_RETRY_S": "2", "PACSAI_VERIFY_MAX_ATTEMPTS": "2"}


def _profiles(tmp_path: Path, peer: str, verify: str) -> str:
    path = tmp_path / "profiles.yaml"
    path.write_text(f"peers:\n  {peer}:\n    verify: {verify}\n")
    return str(path)


def _send(port: int, calling_ae: str, series: Path) -> None:
    argv = ["storescu", "-xv", "-aet", calling_ae, "-aec", "PACSAI", "+sd", "127.0.0.1", str(port), str(series)]
    subprocess.run(argv, check=True, timeout=60, capture_output=True)


def _ended_job(data: Path, states: set[JobState], reason: str = "", timeout_s: float = 25) -> str:
    """The one job, once it is in one of `states` (and its reason contains `reason`)."""

    def ended() -> str:
        state = State(data / "pacsai.db")
        try:
            jobs = state.jobs_in(*JobState)
            done = len(jobs) == 1 and jobs[0].state in states and reason in jobs[0].reason
            return jobs[0].job_id if done else ""
        finally:
            state.close()

    job_id: str = wait_until(ended, timeout_s, f"the job to be {sorted(s.value for s in states)}", 0.3)
    return job_id


def _orthanc_stack(tmp_path: Path, stack: Callable[..., Stack], verify: str) -> Stack:
    need("Orthanc"), need("storescu")
    port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"pacsai": ("PACSAI", "127.0.0.1", port)}, lua=None)
    pacsai = stack(
        peers=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        port=port,
        PACSAI_PROFILES_FILE=_profiles(tmp_path, "ORTHANC", verify),
        **FAST,
    )
    pacsai.adopt(orthanc.process)
    pacsai.start("node")
    pacsai.start("worker")
    return pacsai


@pytest.mark.parametrize("verify", ["commitment", "query"])
def test_orthanc_confirms_every_result_and_the_job_ends_committed(
    verify: str, tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """commitment: N-ACTION, Orthanc's N-EVENT-REPORT on a new association to the node; query: C-FIND IMAGE level."""
    pacsai = _orthanc_stack(tmp_path, stack, verify)
    _send(pacsai.port, "ORTHANC", ct_series)
    job_id = _ended_job(pacsai.data, {JobState.COMMITTED})
    state = State(pacsai.data / "pacsai.db")
    try:
        stored = {f for f, status, _, _ in state.deliveries(job_id) if status == DeliveryStatus.SUCCESS.value}
        instances = state.result_instances(job_id)
        assert {i.file for i in instances} == stored and len(stored) >= 2  # SEG and SR at least
        assert {i.status for i in instances} == {Confirmation.COMMITTED}
        events = [(e.from_state, e.to_state) for e in state.job_events(job_id)][-2:]
        assert events == [("encoded", "delivered"), ("delivered", "committed")]
        row = state.job(job_id)
        assert row is not None and "confirmed by ORTHANC" in row.reason
    finally:
        state.close()
    if verify == "commitment":
        node_log = next(p for p in pacsai.processes if p.name == "pacsai-node").log()
        assert "storage commitment report from ORTHANC" in node_log  # the report came to the node's SCP


def test_a_peer_without_commitment_or_c_find_leaves_the_job_delivered_with_the_reason(
    tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """dcmtk storescp refuses both services: no retries (they cannot help), an ALERT and the reason on the job."""
    need("storescp"), need("storescu")
    storescp, pacs_port, _ = start_storescp(tmp_path / "pacs", ae_title="STORESCU")
    pacsai = stack(
        peers=f"STORESCU@127.0.0.1:{pacs_port}",
        PACSAI_PROFILES_FILE=_profiles(tmp_path, "STORESCU", "commitment"),
        **FAST,
    )
    pacsai.adopt(storescp)
    pacsai.start("node")
    worker = pacsai.start("worker")
    _send(pacsai.port, "STORESCU", ct_series)
    job_id = _ended_job(pacsai.data, {JobState.DELIVERED}, reason="not verified")
    state = State(pacsai.data / "pacsai.db")
    try:
        row = state.job(job_id)
        assert row is not None and row.reason == (
            "not verified: STORESCU does not support Storage Commitment Push Model (presentation context refused); "
            "STORESCU does not support C-FIND (Study Root) (presentation context refused)"
        )
        assert state.verifications_due(float("inf")) == []  # given up at once: nothing left to follow up
    finally:
        state.close()
    assert "ALERT: results of job" in worker.log()


def test_a_commitment_pending_when_the_node_stops_is_completed_after_its_restart(
    tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """The node is down when Orthanc sends its report (lost); the Transaction UID is in the database, so the
    restarted node asks again after PACSAI_VERIFY_TIMEOUT_S and the job ends committed."""
    need("Orthanc"), need("storescu")
    port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"pacsai": ("PACSAI", "127.0.0.1", port)}, lua=None)
    pacsai = stack(
        peers=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        port=port,
        PACSAI_PROFILES_FILE=_profiles(tmp_path, "ORTHANC", "commitment"),
        **{**FAST, "PACSAI_VERIFY_TIMEOUT_S": "4"},
    )
    pacsai.adopt(orthanc.process)
    node = pacsai.start("node")
    pacsai.start("worker")
    _send(pacsai.port, "ORTHANC", ct_series)
    _ended_job(pacsai.data, {JobState.RUNNING, JobState.ENCODED})  # before the delivery and its request
    node.stop()
    job_id = _ended_job(pacsai.data, {JobState.DELIVERED})

    def confirmations() -> set[Confirmation]:  # the request is recorded just after the job is marked delivered
        state = State(pacsai.data / "pacsai.db")
        try:
            return {i.status for i in state.result_instances(job_id)}
        finally:
            state.close()

    wait_until(confirmations, 10, "the commitment request's instances")
    assert confirmations() == {Confirmation.PENDING}  # the report was lost
    pacsai.start("node", workdir=tmp_path / "node-again")
    _ended_job(pacsai.data, {JobState.COMMITTED})
