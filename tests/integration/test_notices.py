"""Notices to the RIS/EHR (issue 14 item 4): the pipeline's real SEG/SR → ORU^R01 over MLLP to a real listener and a
FHIR DiagnosticReport to a real HTTP server that validates it; ACK/NACK and HTTP statuses; no patient data in logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import highdicom as hd
import hl7
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.metrics import StateCollector
from models.registry import load_model, load_spec
from pacsai.jobs import JobState
from pacsai.notices import CriticalRule, FhirAuth, FhirTarget, Hl7Target, Notices
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool, outbox_for
from tests.conftest import need
from tests.notice_peers import FhirReceiver, MllpListener, server_tls
from worker import encode_not_evaluated, encode_sr, load_volume
from worker.classify import Classification
from worker.findings import NoticeError, read_report
from worker.notify import load_report, send_notices
from worker.notify_fhir import build_report
from worker.notify_hl7 import build_oru, control_id
from worker.pipeline import SOFTWARE_VERSION, process_series
from worker.uids import output_uids

pytestmark = pytest.mark.integration
PATIENT_ID, NAME = "CANARY-4711", "CANARY^PHI"
TOKEN = "secret-token-for-tests"


def identified(ds: Dataset) -> Dataset:
    """Our result read back from its bytes (as the notice task reads the outbox), with a patient to report."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    back = dcmread(BytesIO(buffer.getvalue()))
    back.PatientID, back.PatientName, back.AccessionNumber = PATIENT_ID, NAME, "ACC-0042"
    back.PatientBirthDate, back.PatientSex = "19700101", "F"
    return back


@pytest.fixture(scope="module")
def ct_results(ct_series: Path) -> tuple[Dataset, Dataset]:
    """The tiny CT model's SEG and SR of the shared abdomen CT (organ volumes measured by the pipeline)."""
    seg, sr = process_series(sorted(ct_series.iterdir()), load_model(load_spec("ct-organs-tiny"), "cpu"))[:2]
    return identified(seg), identified(sr)


@pytest.fixture(scope="module")
def pneumonia_sr(shared: Path) -> Dataset:
    """cxr-pneumonia's classification SR (the encoder the pipeline uses) for a CR with probability 0.93."""
    spec = load_spec("cxr-pneumonia")
    assert spec.classification is not None
    source = load_volume.read_source(shared / "dicom" / "pydicom-data" / "RG1_UNCR.dcm")
    heatmap = np.zeros((2, 2), dtype=np.float32)
    result = Classification(spec.classification.finding, 0.93, spec.classification.threshold, True, heatmap)
    uids = output_uids(str(source.SeriesInstanceUID), spec.name, spec.version, 1)
    sr = encode_sr.encode_classification_sr(source, result, spec, uids, software_version=SOFTWARE_VERSION)
    return identified(sr)


@pytest.fixture()
def listener() -> Iterator[MllpListener]:
    peer = MllpListener()
    yield peer
    peer.stop()


@pytest.fixture()
def fhir() -> Iterator[FhirReceiver]:
    peer = FhirReceiver(TOKEN)
    yield peer
    peer.stop()


@pytest.fixture()
def state(tmp_path: Path) -> Iterator[State]:
    db = State(tmp_path / "state.db")
    yield db
    db.close()


def volumes_in(sr: Dataset) -> dict[str, float]:
    """Organ volumes as highdicom reads them from the SR (independent of worker/findings.py)."""
    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return {
        str(group.tracking_identifier): float(group.get_measurements(name=codes.SCT.Volume)[0].value)
        for group in content.get_volumetric_roi_measurement_groups()
    }


def hl7_notices(port: int) -> Notices:
    return Notices(hl7=Hl7Target("127.0.0.1", port, receiving_application="RIS", timeout_s=5), max_attempts=3)


def fhir_notices(url: str, token_file: Path) -> Notices:
    target = FhirTarget(url, FhirAuth.BEARER, token_file=token_file, patient_system="urn:oid:1.2.3.4", timeout_s=5)
    return Notices(fhir=target, critical=(CriticalRule("233604007", "Probability", 0.5),), max_attempts=3)


def test_oru_over_mllp_carries_our_measurements(
    ct_results: tuple[Dataset, Dataset], listener: MllpListener, state: State
) -> None:
    seg, sr = ct_results
    rules = (CriticalRule("liver", "Volume", 100.0),)
    report = read_report("job-ct-1", sr, [sr, seg], rules)
    assert send_notices(report, hl7_notices(listener.port), state) == {"hl7": "sent"}

    assert len(listener.received) == 1
    message = hl7.parse(listener.received[0])
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01" and str(message.segment("MSH")(12)) == "2.5.1"
    pid = message.segment("PID")
    assert (str(pid(3)(1)(1)), str(pid(5)(1)(1)), str(pid(5)(1)(2))) == (PATIENT_ID, "CANARY", "PHI")
    obr = message.segment("OBR")
    assert (str(obr(5)), str(obr(18)), str(obr(25))) == ("S", "ACC-0042", "P")  # a critical finding: STAT
    measured = volumes_in(sr)
    sent = {
        str(obx(3)(1)(2)).removesuffix(" Volume"): (float(str(obx(5))), str(obx(8)))
        for obx in message.segments("OBX")
        if str(obx(2)) == "NM" and str(obx(3)(1)(1)) == "118565006"
    }
    assert sent.keys() == measured.keys() and len(sent) == 5
    for organ, volume_ml in measured.items():
        assert sent[organ][0] == pytest.approx(volume_ml, rel=1e-5)
        assert sent[organ][1] == ("AA" if organ == "liver" else "")  # liver >= 100 mL: critical by the rule
    links = {str(obx(3)(1)(1)): str(obx(5)(1)(1)) for obx in message.segments("OBX") if str(obx(2)) == "RP"}
    assert links == {"113014": sr.StudyInstanceUID, "SR": sr.SOPInstanceUID, "SEG": seg.SOPInstanceUID}
    [row] = state.notices("job-ct-1")
    assert (row.channel, row.status, row.detail, row.urgent, row.attempts) == ("hl7", "sent", "ACK AA", True, 1)
    assert send_notices(report, hl7_notices(listener.port), state) == {}  # sent once: never again
    assert len(listener.received) == 1


def test_ar_is_retried_and_ae_fails_with_the_receivers_reason(
    ct_results: tuple[Dataset, Dataset], listener: MllpListener, state: State
) -> None:
    seg, sr = ct_results
    listener.answers = [("AR", "busy"), ("AA", ""), ("AE", "unknown patient")]
    report = read_report("job-ct-2", sr, [sr, seg], ())
    with pytest.raises(NoticeError) as rejected:
        send_notices(report, hl7_notices(listener.port), state)
    assert rejected.value.retryable and state.notices("job-ct-2")[0].status == "retrying"
    assert send_notices(report, hl7_notices(listener.port), state) == {"hl7": "sent"}  # the task's retry
    controls = {str(hl7.parse(text).segment("MSH")(10)) for text in listener.received}
    assert controls == {control_id(report)} and len(listener.received) == 2  # the same message again
    assert state.notices("job-ct-2")[0].attempts == 2

    other = read_report("job-ct-3", sr, [sr, seg], ())
    assert send_notices(other, hl7_notices(listener.port), state) == {"hl7": "failed"}  # no retry
    [row] = state.notices("job-ct-3")
    assert (row.status, row.detail) == ("failed", "AE: unknown patient")


def test_unreachable_listener_is_retried_until_the_attempts_run_out(
    ct_results: tuple[Dataset, Dataset], state: State
) -> None:
    closed = MllpListener()
    closed.stop()  # nothing listens on its port now
    report = read_report("job-ct-4", ct_results[1], [], ())
    for _ in range(2):
        with pytest.raises(NoticeError):
            send_notices(report, hl7_notices(closed.port), state)
        assert state.notices("job-ct-4")[0].status == "retrying"
    assert send_notices(report, hl7_notices(closed.port), state) == {"hl7": "failed"}  # max_attempts 3
    assert "ConnectionRefusedError" in state.notices("job-ct-4")[0].detail


def test_fhir_report_is_valid_and_flags_pneumonia_urgent(
    pneumonia_sr: Dataset, fhir: FhirReceiver, state: State, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    notices = fhir_notices(fhir.url, tmp_path / "token")
    report = read_report("job-cr-1", pneumonia_sr, [pneumonia_sr], notices.critical)
    assert send_notices(report, notices, state) == {"fhir": "sent"}

    [posted] = fhir.received  # the server parsed it with fhir.resources before answering 201
    assert fhir.headers[0]["If-None-Exist"] == "identifier=urn:pacsai:job|job-cr-1"
    assert posted["status"] == "preliminary" and posted["extension"][0]["valueCode"] == "stat"
    assert posted["subject"]["identifier"] == {"system": "urn:oid:1.2.3.4", "value": PATIENT_ID}
    contained = {item["id"]: item for item in posted["contained"]}
    study = contained["study"]
    assert study["identifier"][0]["value"] == f"urn:oid:{pneumonia_sr.StudyInstanceUID}"
    assert study["series"][0]["instance"][0]["uid"] == pneumonia_sr.SOPInstanceUID
    finding = contained["finding-1"]
    assert finding["code"]["coding"][0]["code"] == "233604007"
    assert finding["valueCodeableConcept"]["coding"][0]["code"] == "52101004"  # present
    assert finding["interpretation"][0]["coding"][0]["code"] == "AA"
    assert finding["derivedFrom"] == [{"reference": "#study"}]
    values = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in finding["component"]}
    assert values["122157"] == pytest.approx(0.93)  # probability
    [row] = state.notices("job-cr-1")
    assert row.status == "sent" and row.detail.startswith(f"HTTP 201 {fhir.url}/DiagnosticReport/1")


def test_fhir_500_is_retried_and_400_fails_with_the_operation_outcome(
    pneumonia_sr: Dataset, fhir: FhirReceiver, state: State, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    notices = fhir_notices(fhir.url, tmp_path / "token")
    fhir.statuses = [500, 201, 422]
    report = read_report("job-cr-2", pneumonia_sr, [pneumonia_sr], notices.critical)
    with pytest.raises(NoticeError) as failed:
        send_notices(report, notices, state)
    assert failed.value.retryable and state.notices("job-cr-2")[0].status == "retrying"
    assert send_notices(report, notices, state) == {"fhir": "sent"}

    other = read_report("job-cr-3", pneumonia_sr, [pneumonia_sr], notices.critical)
    assert send_notices(other, notices, state) == {"fhir": "failed"}  # 4xx: not retried
    assert state.notices("job-cr-3")[0].detail == "HTTP 422: error invalid: scripted 422"
    (tmp_path / "token").write_text("wrong")
    assert send_notices(read_report("job-cr-4", pneumonia_sr, [], ()), notices, state) == {"fhir": "failed"}
    assert state.notices("job-cr-4")[0].detail == "HTTP 401: error login: bearer token required"


def test_the_task_reads_the_outbox_and_sends_both_without_patient_data_in_logs(
    ct_results: tuple[Dataset, Dataset],
    listener: MllpListener,
    fhir: FhirReceiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """load_report + send_notices as the notify task runs them: outbox files, delivered SEG and SR linked; the
    listener first answers AE quoting the patient: that text reaches the table, never the logs."""
    (tmp_path / "token").write_text(TOKEN)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        "peers:\n  PACS:\n    notify:\n"
        f"      hl7: {{host: 127.0.0.1, port: {listener.port}, receiving_application: RIS}}\n"
        f"      fhir: {{url: '{fhir.url}', auth: bearer, token_file: '{tmp_path / 'token'}'}}\n"
        "      critical: [{finding: liver, measurement: Volume, at_least: 100}]\n"
    )
    settings = Settings.from_env(
        {
            "PACSAI_DATA_DIR": str(tmp_path / "data"),
            "PACSAI_PEERS": "PACS@127.0.0.1:104",
            "PACSAI_PROFILES_FILE": str(profiles),
        }
    )
    notices = settings.delivery.profile_for("PACS").notices
    assert notices is not None
    outbox = outbox_for(settings, "job-task")
    outbox.mkdir(parents=True)
    seg, sr = ct_results
    seg.save_as(outbox / "seg.dcm", enforce_file_format=True)
    sr.save_as(outbox / "sr.dcm", enforce_file_format=True)
    job = JobRow("job-task", "s", "t", "ct-organs-tiny", "manifest", "PACS", JobState.DELIVERED, "", 1)
    spool = Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    state = State(tmp_path / "state.db")
    listener.answers = [("AE", f"patient {PATIENT_ID} {NAME} unknown")]
    with caplog.at_level(logging.DEBUG):
        report = load_report(settings, spool, job, ["seg.dcm", "sr.dcm"], notices)
        assert {item.modality for item in report.instances} == {"SEG", "SR"} and report.urgent
        assert send_notices(report, notices, state) == {"hl7": "failed", "fhir": "sent"}
    assert "unknown" in state.notices("job-task")[1].detail and PATIENT_ID in state.notices("job-task")[1].detail
    logged = caplog.text
    for secret in (PATIENT_ID, "CANARY", sr.StudyInstanceUID, sr.SOPInstanceUID, "ACC-0042", TOKEN):
        assert secret not in logged
    state.close()


def test_notice_rows_and_counts_on_sqlite_and_postgres(database: str) -> None:
    db = State(database)
    try:
        db.record_notice("job-db", "hl7", "retrying", "AR: busy", urgent=True)
        db.record_notice("job-db", "hl7", "sent", "ACK AA", urgent=True)
        db.record_notice("job-db", "fhir", "failed", "HTTP 422: invalid", urgent=True)
        rows = {row.channel: (row.status, row.attempts, row.detail) for row in db.notices("job-db")}
        assert rows == {"hl7": ("sent", 2, "ACK AA"), "fhir": ("failed", 1, "HTTP 422: invalid")}
        assert db.counts()["notices"] == {"hl7_sent": 1, "fhir_failed": 1}
        [family] = [f for f in StateCollector(db, 3)._counts() if f.name == "pacsai_notices"]  # the node's gauge
        assert {sample.labels["state"]: sample.value for sample in family.samples} == {"hl7_sent": 1, "fhir_failed": 1}
        with pytest.raises(ValueError, match="unknown notice status"):
            db.record_notice("job-db", "hl7", "maybe", "", urgent=False)
    finally:
        db.close()


def test_both_channels_over_tls_trusting_the_configured_ca_only(
    ct_results: tuple[Dataset, Dataset], state: State, tmp_path: Path
) -> None:
    """MLLP over TLS and FHIR over https to servers with a self-signed certificate: sent when `ca` names it,
    retried (certificate not trusted) with the system's CAs."""
    need("openssl")
    context, ca = server_tls(tmp_path)
    (tmp_path / "token").write_text(TOKEN)
    listener, receiver = MllpListener(tls=context), FhirReceiver(TOKEN, tls=context)
    try:
        hl7_target = Hl7Target("127.0.0.1", listener.port, timeout_s=5, tls=True)
        fhir_target = FhirTarget(receiver.url, FhirAuth.BEARER, token_file=tmp_path / "token", timeout_s=5)
        untrusted = Notices(hl7=hl7_target, fhir=fhir_target)
        report = read_report("job-tls", ct_results[1], [], ())
        with pytest.raises(NoticeError) as failed:
            send_notices(report, untrusted, state)
        assert failed.value.retryable and {row.status for row in state.notices("job-tls")} == {"retrying"}
        trusted = Notices(hl7=replace(hl7_target, ca=ca), fhir=replace(fhir_target, ca=ca))
        assert send_notices(report, trusted, state) == {"hl7": "sent", "fhir": "sent"}
        assert len(listener.received) == 1 and len(receiver.received) == 1
    finally:
        listener.stop()
        receiver.stop()


def test_a_series_the_model_did_not_evaluate_is_reported_as_such(shared: Path) -> None:
    """The 'not evaluated' SR (outside the model's domain) gives valid notices that say why, with nothing critical."""
    spec = load_spec("cxr-pneumonia")
    source = load_volume.read_source(shared / "dicom" / "pydicom-data" / "RG1_UNCR.dcm")
    uids = output_uids(str(source.SeriesInstanceUID), spec.name, spec.version, 1)
    reason = "outside the model's domain: age not stated"
    sr = encode_not_evaluated.encode_not_evaluated_sr(
        [source], reason, None, spec, uids, software_version=SOFTWARE_VERSION
    )
    rules = (CriticalRule("233604007"), CriticalRule("233604007", "Probability", 0.1))
    report = read_report("job-ne", identified(sr), [], rules)
    assert not report.urgent and reason in report.conclusion
    oru = hl7.parse(build_oru(report, Hl7Target("127.0.0.1", 1)))
    assert str(oru.segment("OBR")(5)) == "R" and not any(str(obx(2)) == "CWE" for obx in oru.segments("OBX"))
    resource = build_report(report, FhirTarget("https://ehr/fhir"))
    assert reason in str(resource.conclusion) and "extension" in resource.model_dump()
