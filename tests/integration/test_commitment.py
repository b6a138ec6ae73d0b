"""Proof of delivery pieces: the tables (SQLite, PostgreSQL), a report on the requesting association (a pynetdicom
SCP in the test plays a PACS that answers there), and the node's SCP answering reports it cannot use."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

from dicom_node import verify_results
from dicom_node.commitment import (
    COMMITMENT,
    COMMITMENT_INSTANCE,
    INVALID_ARGUMENT,
    NO_SUCH_EVENT_TYPE,
    Report,
    parse_report,
    request_commitment,
)
from dicom_node.metrics import StateCollector
from pacsai.commitment_table import Confirmation, Request, ResultInstance, Verification
from pacsai.jobs import JobState, SeriesJob, SeriesState
from pacsai.profiles import Verify
from pacsai.settings import Peer, Settings
from pacsai.state import State
from pacsai.storage import Spool, SpooledInstance, outbox_for
from tests.conftest import need
from tests.job_paths import move_job
from tests.services import free_port, start_orthanc
from tests.stack import Stack

pytestmark = [pytest.mark.integration]
SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.22"
INSTANCES = [
    ResultInstance("seg.dcm", SEG, "1.2.3.1", "1.2.3", "1.2.3.9"),
    ResultInstance("sr.dcm", SR, "1.2.3.2", "1.2.3", "1.2.3.8"),
]


@pytest.fixture()
def delivered(database: str) -> Iterator[State]:
    """A delivered job "j" whose results went to ORTHANC."""
    state = State(database)
    state.record_instance(SpooledInstance("t", "s", "i", "t/s/i.dcm"), calling_ae="PACS", called_ae="PACSAI", header={})
    state.close_series("s", SeriesState.COMPLETE, "", [SeriesJob("j", "t", "s", "model", "m.json", "ORTHANC")])
    move_job(state, "j", JobState.DELIVERED)
    yield state
    state.close()


def _request(uid: str, attempt: int = 1) -> Verification:
    return Verification(uid, "j", "ORTHANC", "commitment", attempt, Request.REQUESTED, time.time() + 60)


def test_the_job_is_committed_only_when_every_instance_is(delivered: State) -> None:
    state = delivered
    state.start_verification(_request("9.1"), INSTANCES)
    assert state.record_confirmations("9.1", ["1.2.3.1"], [], 0, reporter="OTHER") is None  # not asked of OTHER
    assert state.record_confirmations("9.9", ["1.2.3.1"], [], 0) is None  # no such transaction
    tally = state.record_confirmations("9.1", ["1.2.3.1"], [("1.2.3.2", "0x0112 no such object instance")], 0)
    assert tally is not None and (tally.confirmed, tally.failed, tally.pending) == (1, 1, 0)
    assert state.job("j").state is JobState.DELIVERED  # type: ignore[union-attr]
    assert [r.transaction_uid for r in state.verifications_due(time.time())] == ["9.1"]  # retry due
    state.next_verification(_request("9.2", attempt=2))
    assert state.record_confirmations("9.1", ["1.2.3.2"], [], 0) is None  # the first request is closed now
    assert [(i.file, i.status) for i in state.result_instances("j")] == [
        ("seg.dcm", Confirmation.COMMITTED),
        ("sr.dcm", Confirmation.PENDING),
    ]
    tally = state.record_confirmations("9.2", ["1.2.3.2"], [], 0, reporter="ORTHANC")
    assert tally is not None and tally.all_confirmed
    row = state.job("j")
    assert row is not None and row.state is JobState.COMMITTED and row.reason.startswith("2 result instance(s)")
    assert state.verifications_due(float("inf")) == []


def test_giving_up_keeps_the_job_delivered_with_the_reason(delivered: State) -> None:
    delivered.start_verification(_request("9.1"), INSTANCES)
    delivered.close_verification("j", "not verified: no answer")
    row = delivered.job("j")
    assert row is not None and (row.state, row.reason) == (JobState.DELIVERED, "not verified: no answer")
    assert delivered.verifications_due(float("inf")) == []


def test_the_verifications_gauge_counts_jobs_by_proof_of_delivery(delivered: State) -> None:
    """pacsai_verifications{state}: what the alert PacsaiDeliveryNotVerified watches (deploy/prometheus)."""

    def gauge() -> dict[str, float]:
        family = StateCollector(delivered, 3)._verifications()
        return {sample.labels["state"]: sample.value for sample in family.samples}

    assert gauge() == {"verifying": 0, "committed": 0, "failed": 0}
    delivered.start_verification(_request("9.1"), INSTANCES)
    assert gauge() == {"verifying": 1, "committed": 0, "failed": 0}
    delivered.close_verification("j", "not verified: no answer")
    assert gauge() == {"verifying": 0, "committed": 0, "failed": 1}
    delivered.start_verification(_request("9.2"), INSTANCES)  # re-delivered: asked again, and confirmed
    delivered.record_confirmations("9.2", ["1.2.3.1", "1.2.3.2"], [], 0)
    assert gauge() == {"verifying": 0, "committed": 1, "failed": 0}


def test_a_report_without_transaction_or_of_another_event_is_refused() -> None:
    info = Dataset()
    with pytest.raises(ValueError, match="no Transaction UID"):
        parse_report(1, info)
    with pytest.raises(ValueError, match="event type 3"):
        parse_report(3, info)
    info.TransactionUID = "9.1"
    failed = Dataset()
    failed.ReferencedSOPClassUID, failed.ReferencedSOPInstanceUID, failed.FailureReason = SR, "1.2.3.2", 0x0112
    info.FailedSOPSequence = [failed]
    assert parse_report(2, info) == Report("9.1", (), (("1.2.3.2", "0x0112 no such object instance"),))


def _pacs_reporting_on_the_same_association(port: int) -> AE:
    """A commitment SCP that answers the N-ACTION, then sends its report on the same association."""
    ae = AE(ae_title="PACS")
    ae.add_supported_context(COMMITMENT)

    def on_action(event: evt.Event) -> tuple[int, Dataset | None]:
        request = event.action_information
        assoc = event.assoc

        def report() -> None:
            time.sleep(0.2)
            info = Dataset()
            info.TransactionUID = request.TransactionUID
            info.ReferencedSOPSequence = request.ReferencedSOPSequence
            assoc.send_n_event_report(info, 1, COMMITMENT, COMMITMENT_INSTANCE)

        threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_ACTION, on_action)])
    return ae


def test_a_report_on_the_requesting_association_is_recorded() -> None:
    port = free_port()
    pacs = _pacs_reporting_on_the_same_association(port)
    reports: list[tuple[Report, str]] = []

    def record(report: Report, calling_ae: str) -> bool:
        reports.append((report, calling_ae))
        return True

    try:
        request_commitment(
            Peer("PACS", "127.0.0.1", port),
            "9.1",
            INSTANCES,
            record,
            calling_ae="PACSAI",
            timeout_s=10,
            wait_report_s=5,
        )
    finally:
        pacs.shutdown()
    assert reports == [(Report("9.1", ("1.2.3.1", "1.2.3.2"), ()), "PACS")]


def _send_report(port: int, event_type: int, transaction_uid: str) -> int:
    """A peer in the SCP role opening a new association to the node to report (as Orthanc does)."""
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(COMMITMENT)
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = COMMITMENT, False, True
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI", ext_neg=[role])
    assert assoc.is_established
    info = Dataset()
    info.TransactionUID = transaction_uid
    info.ReferencedSOPSequence = []
    status, _ = assoc.send_n_event_report(info, event_type, COMMITMENT, COMMITMENT_INSTANCE)
    assoc.release()
    return int(status.Status)


def test_the_node_answers_reports_it_cannot_use_with_a_specific_status(
    stack: Callable[..., Stack], tmp_path: Path
) -> None:
    pacsai = stack(peers="ORTHANC@127.0.0.1:11112")
    pacsai.start("node")
    assert _send_report(pacsai.port, 1, "9.8.7") == INVALID_ARGUMENT  # a transaction we never asked for
    assert _send_report(pacsai.port, 3, "9.8.7") == NO_SUCH_EVENT_TYPE
    node_log = pacsai.processes[0].log()
    assert "for a transaction it was not asked" in node_log and "9.8.7" not in node_log  # no UID in the logs


def _settings(tmp_path: Path, peer_port: int, verify: str) -> Settings:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(f"peers:\n  ORTHANC:\n    verify: {verify}\n")
    return Settings.from_env(
        {
            "PACSAI_DATA_DIR": str(tmp_path / "data"),
            "PACSAI_PORT": str(free_port()),
            "PACSAI_LOG_KEY": "test-log-key",
            "PACSAI_PEERS": f"ORTHANC@127.0.0.1:{peer_port}",
            "PACSAI_PROFILES_FILE": str(profiles),
            "PACSAI_VERIFY_MAX_ATTEMPTS": "2",
        }
    )


def _results_in_outbox(settings: Settings, job_id: str) -> list[Path]:
    """Two small result files (pydicom's CT with UIDs of our own) in the job's outbox."""
    outbox = outbox_for(settings, job_id)
    outbox.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for name in ("seg.dcm", "sr.dcm"):
        source = get_testdata_file("CT_small.dcm")
        assert isinstance(source, str)
        ds = dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(outbox / name)
        files.append(outbox / name)
    return files


def test_an_instance_the_pacs_lacks_is_sent_again_and_then_found(delivered: State, tmp_path: Path) -> None:
    """query with Orthanc: the SR never arrived (only the SEG did); C-FIND misses it, the follow-up sends it again
    (C-STORE from the outbox, same SOP Instance UID) and asks again: committed."""
    need("Orthanc")
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"pacsai": ("PACSAI", "127.0.0.1", free_port())}, lua=None)
    try:
        settings = _settings(tmp_path, orthanc.dicom_port, "query")
        seg, sr = _results_in_outbox(settings, "j")
        orthanc.upload(seg)
        for path in (seg, sr):
            delivered.record_delivery("j", path.name, "ORTHANC", "success", "0x0000")
        spool = Spool(settings.storage.spool_dir, settings.log_key, reserve_bytes=0)
        job, peer = delivered.job("j"), settings.delivery.peer("ORTHANC")
        assert job is not None and peer is not None
        verify_results.begin(settings, delivered, spool, job, peer, Verify.QUERY)
        assert [(i.file, i.status, i.detail) for i in delivered.result_instances("j")] == [
            ("seg.dcm", Confirmation.COMMITTED, ""),
            ("sr.dcm", Confirmation.FAILED, verify_results.NOT_FOUND),
        ]
        assert verify_results.follow_up(settings, delivered, spool, time.time() + 3600) == 1
        row = delivered.job("j")
        assert row is not None and row.state is JobState.COMMITTED
        assert len(orthanc.request("GET", "/instances")) == 2
    finally:
        orthanc.stop()


def test_a_pacs_that_never_answers_is_given_up_on_after_the_last_attempt(
    delivered: State, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, free_port(), "commitment")  # nothing listens there
    _results_in_outbox(settings, "j")
    for name in ("seg.dcm", "sr.dcm"):
        delivered.record_delivery("j", name, "ORTHANC", "success", "0x0000")
    spool = Spool(settings.storage.spool_dir, settings.log_key, reserve_bytes=0)
    job, peer = delivered.job("j"), settings.delivery.peer("ORTHANC")
    assert job is not None and peer is not None
    verify_results.begin(settings, delivered, spool, job, peer, Verify.COMMITMENT)  # unreachable: retried later
    later = time.time() + 3600
    assert verify_results.follow_up(settings, delivered, spool, later) == 1  # attempt 2, unreachable again
    assert verify_results.follow_up(settings, delivered, spool, later) == 1  # the last: given up
    assert verify_results.follow_up(settings, delivered, spool, later) == 0
    row = delivered.job("j")
    assert row is not None and row.state is JobState.DELIVERED
    assert (
        row.reason == "not verified: 2 of 2 result instance(s) not committed by ORTHANC after 2 request(s) (no answer)"
    )
    assert "ALERT: results of job" in caplog.text
