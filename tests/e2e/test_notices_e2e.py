"""Issue 14 item 4 through the stack: a CT study sent to `pacsai run` comes back to the PACS (dcmtk storescp), then
the RIS gets an ORU^R01 over MLLP (a real listener) and the EHR a DiagnosticReport (a real, validating FHIR server)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hl7
import pytest
from pydicom import dcmread

from pacsai.jobs import JobState
from pacsai.notice_table import NoticeRow
from pacsai.state import State
from tests.notice_peers import FhirReceiver, MllpListener
from tests.services import wait_until
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOKEN = "e2e-token"


def with_patient(series: Path, folder: Path) -> list[Path]:
    """The shared CT (which has no Patient ID) with a patient and an accession, in the test's folder."""
    folder.mkdir()
    copies = []
    for path in sorted(series.iterdir()):
        ds = dcmread(path)
        ds.PatientID, ds.PatientName, ds.AccessionNumber = "E2E-0001", "NOTICE^TEST", "ACC-E2E"
        ds.save_as(folder / path.name, enforce_file_format=True)
        copies.append(folder / path.name)
    return copies


def state_notices(data: Path) -> list[NoticeRow]:
    state = State(data / "pacsai.db")
    try:
        (job,) = state.jobs_in(*JobState)
        return state.notices(job.job_id)
    finally:
        state.close()


@pytest.mark.parametrize("deidentified", [False, True], ids=["identified", "deidentified"])
def test_a_delivered_study_is_announced_by_hl7_and_fhir(
    tmp_path: Path, ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack], deidentified: bool
) -> None:
    """Also for a job whose model gets a de-identified copy: the notices carry the original patient and UIDs."""
    listener, fhir = MllpListener([("AR", "busy")]), FhirReceiver(TOKEN, [503])  # each refuses once: retried
    try:
        (tmp_path / "token").write_text(TOKEN)
        profiles = tmp_path / "profiles.yaml"
        profiles.write_text(
            f"peers:\n  {pacs.ae_title}:\n    notify:\n"
            f"      hl7: {{host: 127.0.0.1, port: {listener.port}, receiving_application: RIS}}\n"
            f"      fhir: {{url: '{fhir.url}', auth: bearer, token_file: '{tmp_path / 'token'}'}}\n"
            "      critical: [{finding: liver, measurement: Volume, at_least: 100}]\n"
            "      backoff_s: 1\n"
        )
        extra = {"PACSAI_DEIDENTIFY_FOR": "ct-organs-tiny"} if deidentified else {}
        pacsai = stack(peers=pacs.peer, PACSAI_PROFILES_FILE=str(profiles), **extra)
        pacsai.start("run")
        pacsai.send(with_patient(ct_series, tmp_path / "study"), pacs.ae_title)

        def notified() -> bool:
            state = State(pacsai.data / "pacsai.db")
            try:
                jobs = state.jobs_in(*JobState)
                return bool(jobs) and len([n for n in state.notices(jobs[0].job_id) if n.status == "sent"]) == 2
            finally:
                state.close()

        wait_until(notified, 240, "both notices sent", 1.0)
    finally:
        listener.stop()
        fhir.stop()
    assert pacs.modalities() == ["SEG", "SR"]
    state = State(pacsai.data / "pacsai.db")
    assert state.counts()["notices"] == {"fhir_sent": 1, "hl7_sent": 1}  # what `pacsai status` prints
    state.close()
    assert [(n.channel, n.attempts) for n in state_notices(pacsai.data)] == [("fhir", 2), ("hl7", 2)]
    oru = hl7.parse(listener.received[-1])
    first = hl7.parse(listener.received[0])
    assert len(listener.received) == 2 and str(first.segment("MSH")(10)) == str(oru.segment("MSH")(10))  # same ID
    assert str(oru.segment("PID")(3)(1)(1)) == "E2E-0001" and str(oru.segment("OBR")(5)) == "S"
    report = fhir.received[-1]
    assert report["subject"]["identifier"]["value"] == "E2E-0001"
    sop_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.inbox.iterdir() if p.is_file()}
    linked = {str(obx(5)(1)(1)) for obx in oru.segments("OBX") if str(obx(2)) == "RP"}
    assert sop_uids < linked  # the SEG and SR the PACS holds, plus the study
    study = next(item for item in report["contained"] if item["resourceType"] == "ImagingStudy")
    original = str(dcmread(next(ct_series.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    assert study["identifier"][0]["value"] == f"urn:oid:{original}"
    [outbox_sr] = (pacsai.data / "outbox").glob("*/sr.dcm")  # what the worker made: pseudonymous when de-identified
    assert (dcmread(outbox_sr).StudyInstanceUID != original) is deidentified
    assert {i["uid"] for s in study["series"] for i in s["instance"]} == sop_uids
