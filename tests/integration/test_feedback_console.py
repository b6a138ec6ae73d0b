"""The job page shows the radiologists' feedback (real app, Starlette's TestClient, real SQLite state)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicom_node.console import app as console_app
from dicom_node.console.auth import hash_password
from pacsai.console_db import ConsoleTables
from pacsai.feedback_table import FeedbackKind, FeedbackRow, SegmentAgreement
from pacsai.jobs import JobState, SeriesState
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import SpooledInstance
from tests.services import free_port

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def test_job_page_lists_corrections_and_rejections(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": f"PACS@127.0.0.1:{free_port()}", "PACSAI_LOG_KEY": "k"}
    )
    state = State(settings.storage.database)
    state.record_instance(
        SpooledInstance("study", "series", "sop", "study/series/sop.dcm"),
        calling_ae="PACS", called_ae="PACSAI", header={"Modality": "CT"},
    )  # fmt: skip
    row = JobRow("job1", "series", "study", "ct-organs-tiny", "m", "PACS", JobState.PENDING, "", 0)
    state.close_series("series", SeriesState.COMPLETE, "", [row])
    liver = SegmentAgreement("liver", 0.8125, 120.0, 100.5)
    state.record_feedback(FeedbackRow("f1", "job1", "ct-organs-tiny", "0.1.0", FeedbackKind.CORRECTED, "", (liver,)))
    reason = "Rejected for Quality Reasons"
    state.record_feedback(FeedbackRow("f2", "job1", "ct-organs-tiny", "0.1.0", FeedbackKind.REJECTED, reason, ()))
    ConsoleTables(state).add_user("vera", hash_password(PASSWORD), "viewer", phi=False)
    client = TestClient(console_app.create_app(settings, state=state))
    assert client.get("/jobs/job1", follow_redirects=False).status_code in (303, 401), "anonymous: no page"
    token = CSRF.search(client.get("/login").text)
    assert token is not None
    login = {"csrf": token.group(1), "username": "vera", "password": PASSWORD}
    assert client.post("/login", data=login, follow_redirects=False).status_code == 303
    page = client.get("/jobs/job1").text
    section = page[page.index('id="feedback"') :]
    assert "liver" in section and "0.812" in section and "-19.5 mL" in section
    assert reason in section and "rejected" in section and "corrected" in section
    state.close()
