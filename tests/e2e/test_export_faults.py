"""Export faults E2, E6, E7: a PACS that rejects associations, one slower than the DIMSE timeout, wrong peer config.

The PACS are pynetdicom SCPs in the test, scripted per case. E2/E6 run results through a real `pacsai worker`:
each test puts a job's results in the outbox, records the job as encoded and enqueues its delivery, as the
worker's own inference task does after encoding.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsai.celery_app import create_app
from pacsai.enqueue import enqueue_delivery
from pacsai.jobs import Delivery, JobState, SeriesState
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import write_atomic
from tests.job_paths import move_job
from tests.pacs import ScriptedPacs
from tests.services import Process, free_port, pacsai_env, run_cli, start_pacsai, supervised, wait_until
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DIMSE_TIMEOUT_S = 2.0


@dataclass
class Deployment:
    data: Path
    settings: Settings
    worker: Process
    pacs: dict[str, ScriptedPacs]

    def deliver(self, destination: str, files: int = 2, *, corrupt: bool = False) -> str:
        """A job encoded for `destination`, with `files` results in its outbox, and its delivery enqueued.

        The results are written as the pipeline writes them (write_atomic records their hash); `corrupt` flips a
        byte of the first one afterwards, as a failing disk would."""
        job_id = uuid.uuid4().hex[:24]
        state = State(self.data / "pacsai.db")
        row = JobRow(
            job_id,
            f"series-{job_id}",
            f"study-{job_id}",
            "ct-organs-tiny",
            "manifest.json",
            destination,
            JobState.PENDING,
            "",
            1,
        )
        state.close_series(row.series_key, SeriesState.COMPLETE, "", [row])
        move_job(state, job_id, JobState.ENCODED)
        state.close()
        outbox = self.settings.storage.outbox_dir / job_id
        outbox.mkdir(parents=True)
        for index in range(files):
            ds = dcmread(str(get_testdata_file("CT_small.dcm")))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            write_atomic(outbox / f"result-{index}.dcm", buffer.getvalue())
        if corrupt:
            with open(outbox / "result-0.dcm", "r+b") as handle:
                handle.seek(-1, 2)
                last = handle.read(1)
                handle.seek(-1, 2)
                handle.write(bytes([last[0] ^ 0xFF]))
        enqueue_delivery(create_app(self.settings), Delivery(job_id, destination))
        return job_id

    def job(self, job_id: str) -> JobRow:
        state = State(self.data / "pacsai.db")
        try:
            row = state.job(job_id)
        finally:
            state.close()
        assert row is not None
        return row

    def wait_for(self, job_id: str, *states: JobState, timeout_s: float = 60) -> JobRow:
        wait_until(lambda: self.job(job_id).state in states, timeout_s, f"job {' or '.join(s.value for s in states)}")
        return self.job(job_id)


def pool_child(pid: int) -> int:
    """The worker's one pool process (forked: same command line), which runs the tasks."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    (child,) = [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == cmdline]
    return child


def threads_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One delivery worker for the E2/E6 PACS: WRONGAE is a PACS that knows itself as PACS (called AE unknown),
    BUSY takes one association at a time, SLOW answers C-STOREs after scripted delays."""
    tmp = tmp_path_factory.mktemp("export")
    pacs = {
        "WRONGAE": ScriptedPacs("PACS", require_called_aet=True),
        "BUSY": ScriptedPacs("BUSY", maximum_associations=1),
        "SLOW": ScriptedPacs("SLOW"),
    }
    peers = ",".join(f"{name}@127.0.0.1:{scp.port}" for name, scp in pacs.items())
    env = pacsai_env(
        tmp / "data",
        port=free_port(),
        peers=peers,
        PACSAI_WORKER_MODELS="ct-organs-tiny",
        PACSAI_DIMSE_TIMEOUT_S=str(DIMSE_TIMEOUT_S),
        PACSAI_SEND_BACKOFF_MAX_S="2",
    )
    settings = Settings.from_env(env)
    try:
        with supervised() as processes:
            worker = start_pacsai("worker", tmp, env)
            processes.append(worker)
            wait_until(
                lambda: "pacsai.deliver" in worker.log() or worker.popen.poll() is not None, 90, "the worker's banner"
            )
            yield Deployment(tmp / "data", settings, worker, pacs)
    finally:
        for scp in pacs.values():
            scp.stop()


@pytest.mark.catalogue("E2")
def test_a_permanent_association_rejection_fails_the_job_at_once_with_an_alert(deployment: Deployment) -> None:
    """E2: RJ (1, 1, 7) "called AE title not recognised" is a configuration error: failed, reason, ALERT, no retry."""
    job_id = deployment.deliver("WRONGAE")
    row = deployment.wait_for(job_id, JobState.FAILED, JobState.DEAD, JobState.DELIVERED)
    assert row.state is JobState.FAILED
    assert row.reason == (
        "association with WRONGAE rejected permanently by the service user: called AE title not recognised (1, 1, 7)"
    )
    assert f"ALERT: delivery failed for good, not retried: {row.reason}" in deployment.worker.log()
    time.sleep(2.0)  # twice PACSAI_SEND_BACKOFF_S: a retry would have come by now
    assert deployment.pacs["WRONGAE"].connections == 1 and not deployment.pacs["WRONGAE"].received


@pytest.mark.catalogue("E2")
def test_a_transient_association_rejection_is_retried_until_the_pacs_accepts(deployment: Deployment) -> None:
    """E2: RJ (2, 3, 2) "local limit exceeded" while BUSY's one association is taken; delivered once it is free."""
    busy = deployment.pacs["BUSY"]
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", busy.port, ae_title="BUSY")
    assert held.is_established
    try:
        job_id = deployment.deliver("BUSY")
        wait_until(
            lambda: "local limit exceeded (2, 3, 2)" in deployment.job(job_id).reason,
            30,
            "a transient rejection to be recorded",
        )
        row = deployment.job(job_id)
        assert row.state is JobState.ENCODED  # waiting for another attempt, not failed
        assert row.reason.startswith(
            "delivery failing: association with BUSY rejected transiently by the service "
            "provider (presentation): local limit exceeded"
        )
    finally:
        held.release()
    deployment.wait_for(job_id, JobState.DELIVERED, JobState.FAILED, JobState.DEAD)
    assert deployment.job(job_id).state is JobState.DELIVERED
    assert busy.connections >= 3 and len({ds.SOPInstanceUID for ds in busy.received}) == 2


@pytest.mark.catalogue("E6")
def test_a_pacs_slower_than_the_dimse_timeout_is_aborted_retried_and_leaks_no_thread(deployment: Deployment) -> None:
    """E6: C-STOREs answered after the DIMSE timeout abort the association; the retry that gets timely answers
    delivers; the worker's pool process ends with no more threads than it had before."""
    slow, child = deployment.pacs["SLOW"], pool_child(deployment.worker.popen.pid)
    warm_up = deployment.deliver("SLOW")  # imports and first association done before counting
    deployment.wait_for(warm_up, JobState.DELIVERED)
    before = threads_of(child)
    slow.delays_s = [DIMSE_TIMEOUT_S + 1.5, DIMSE_TIMEOUT_S + 1.5]  # the first C-STORE of two attempts
    slow.received.clear()
    job_id = deployment.deliver("SLOW")
    row = deployment.wait_for(job_id, JobState.DELIVERED, JobState.FAILED, JobState.DEAD, timeout_s=60)
    assert row.state is JobState.DELIVERED
    log = deployment.worker.log()
    assert (
        log.count(f"no C-STORE reply from SLOW within the DIMSE timeout of {DIMSE_TIMEOUT_S:g} s; association aborted")
        == 2
    )
    assert len({ds.SOPInstanceUID for ds in slow.received}) == 2  # late answers stored, resent: same UIDs
    assert pool_child(deployment.worker.popen.pid) == child  # the same process ran all attempts
    wait_until(lambda: threads_of(child) <= before, 10, f"the worker's threads back to {before}")


# --- E7 ------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def peers() -> Iterator[dict[str, int]]:
    """GOOD answers C-ECHO, PICKY rejects our calling AE (RJ 1, 1, 3), CLOSED is a port nothing listens on."""
    good, picky = ScriptedPacs("GOOD"), ScriptedPacs("PICKY", calling_aets=["SOMEONE"])
    yield {"GOOD": good.port, "PICKY": picky.port, "CLOSED": free_port()}
    good.stop()
    picky.stop()


def peers_env(tmp_path: Path, ports: dict[str, int], **extra: str) -> dict[str, str]:
    peers = ",".join(f"{name}@127.0.0.1:{port}" for name, port in ports.items())
    return pacsai_env(tmp_path / "data", port=free_port(), peers=peers, PACSAI_DIMSE_TIMEOUT_S="5", **extra)


@pytest.mark.catalogue("E7")
def test_check_peers_names_what_fails_for_each_peer(tmp_path: Path, peers: dict[str, int]) -> None:
    run = run_cli("check-peers", env=peers_env(tmp_path, peers))
    assert run.returncode == 1
    lines = {line.split()[0]: line for line in run.stdout.splitlines()}
    assert f"127.0.0.1:{peers['GOOD']}" in lines["GOOD"] and "ok" in lines["GOOD"] and "0x0000" in lines["GOOD"]
    assert f"127.0.0.1:{peers['CLOSED']}" in lines["CLOSED"] and "FAILED  connection refused" in lines["CLOSED"]
    assert lines["PICKY"].endswith(
        "FAILED  association with PICKY rejected permanently by the service user: "
        "calling AE title not recognised (1, 1, 3)"
    )
    for name in ("CLOSED", "PICKY"):
        assert (
            f"ERROR dicom_node.echo_peers: peer {name} at 127.0.0.1:{peers[name]} failed its C-ECHO check" in run.stderr
        )


@pytest.mark.catalogue("E7")
def test_the_node_starts_with_unreachable_peers_but_says_so(peers: dict[str, int], stack: Callable[..., Stack]) -> None:
    """E7: the node still takes studies (a PACS briefly down must not cost us incoming studies), logs an ERROR per
    failing peer naming its AE title, address and what failed, and exports pacsai_peer_reachable."""
    metrics_port = free_port()
    listed = ",".join(f"{name}@127.0.0.1:{port}" for name, port in peers.items())
    pacsai = stack(peers=listed, PACSAI_DIMSE_TIMEOUT_S="5", PACSAI_METRICS_PORT=str(metrics_port))
    node = pacsai.start("node")
    wait_until(lambda: node.log().count("C-ECHO check") >= 2, 30, "the startup peer check")
    log = node.log()
    assert (
        f"ERROR dicom_node.echo_peers: peer CLOSED at 127.0.0.1:{peers['CLOSED']} failed its C-ECHO check: "
        "connection refused"
    ) in log
    assert "peer PICKY at" in log and "calling AE title not recognised (1, 1, 3)" in log
    wait_until(lambda: "peer GOOD at" in node.log(), 30, "GOOD's check")
    caller = AE(ae_title="GOOD")  # the node still answers its callers
    caller.add_requested_context(Verification)
    assoc = caller.associate("127.0.0.1", pacsai.port, ae_title="PACSAI")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'pacsai_peer_reachable{peer="GOOD"} 1.0' in metrics
    assert 'pacsai_peer_reachable{peer="CLOSED"} 0.0' in metrics
    assert 'pacsai_peer_reachable{peer="PICKY"} 0.0' in metrics


@pytest.mark.catalogue("S7")
def test_a_result_changed_on_disk_after_it_was_written_is_never_sent(deployment: Deployment) -> None:
    """S7 for results: the outbox file no longer matches the hash recorded when it was written: the job fails with
    the reason and nothing reaches the PACS (a healthy one: the same delivery without the flipped byte arrives)."""
    pacs = deployment.pacs["SLOW"]
    before = len(pacs.received)
    job_id = deployment.deliver("SLOW", corrupt=True)
    row = deployment.wait_for(job_id, JobState.FAILED, JobState.DEAD, JobState.DELIVERED)
    assert row.state is JobState.FAILED
    assert row.reason == "spooled result corrupted: 1 of 2 file(s) differ from what was received"
    assert "ALERT: results not sent: spooled result corrupted" in deployment.worker.log()
    assert len(pacs.received) == before
    good = deployment.deliver("SLOW")
    assert deployment.wait_for(good, JobState.FAILED, JobState.DEAD, JobState.DELIVERED).state is JobState.DELIVERED
    assert len(pacs.received) == before + 2
