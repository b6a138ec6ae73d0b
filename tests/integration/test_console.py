"""The console's security on the real app (Starlette's TestClient) over a real SQLite state, spool and audit trail.

Over 300 lines: every check shares one fixture (a console over a real state, a canary patient, users of each role).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from httpx2 import Response
from pydicom import dcmread
from starlette.routing import Mount

from dicom_node.console import app as console_app
from dicom_node.console.auth import Sessions, hash_password
from dicom_node.console.stow import ROOT as STOW
from dicom_node.read_audit import read_entries
from dicom_node.route import load_rules
from pacsai import audit
from pacsai.celery_app import create_app as create_celery
from pacsai.console_db import ConsoleTables
from pacsai.enqueue import broker_queues
from pacsai.jobs import JobState, SeriesState
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool
from tests.checks import to_bytes
from tests.job_paths import move_job
from tests.services import REPO, free_port, run_cli

pytestmark = pytest.mark.integration
CANARY_NAME, CANARY_ID = "CANARY^CONSOLE^Vb8", "CANARYPID4Tq"
PASSWORD = "correct horse battery"
CHROME_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
JOB_ACTION_EVENT, PHI_VIEW_EVENT = console_app.JOB_ACTION[2], console_app.PHI_VIEW[2]
PUBLIC = {("/login", "GET"), ("/login", "POST")}  # and the stylesheet under /static (test_static_serves_only_its_files)


@dataclass
class Site:
    settings: Settings
    state: State
    job_id: str
    client: TestClient

    def login(self, username: str, password: str = PASSWORD, client: TestClient | None = None) -> TestClient:
        """A client logged in as `username` (a new one unless given); the response must be the redirect home."""
        client = client or TestClient(self.client.app)
        response = self.try_login(client, username, password)
        assert response.status_code == 303, response.text
        return client

    def try_login(self, client: TestClient, username: str, password: str) -> Response:
        token = _csrf(client.get("/login").text)
        return client.post(
            "/login", data={"csrf": token, "username": username, "password": password}, follow_redirects=False
        )

    def job(self) -> JobRow:
        row = self.state.job(self.job_id)
        assert row is not None
        return row

    def audit(self) -> list[tuple[str, str, str]]:
        """(event, participants, description) of each audit message."""
        return [(e.event, " ".join(e.participants), e.description) for e in read_entries(self.settings.audit_path)]


def _csrf(page: str) -> str:
    match = CSRF.search(page)
    assert match, "no CSRF token in the page"
    return match.group(1)


def _spool_canary(settings: Settings, state: State, ct_series: Path) -> str:
    """One real CT slice with a canary patient, spooled and recorded; a dead job for it. Returns the job id."""
    ds = dcmread(sorted(ct_series.glob("CT.*"))[0])
    ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
    spool = Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    stored = spool.put(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, to_bytes(ds))
    header = {"Modality": "CT", "SOPClassUID": str(ds.SOPClassUID), "SeriesDescription": "abdomen"}
    state.record_instance(
        stored,
        calling_ae="PACS",
        called_ae="PACSAI",
        header=header,
    )
    job_id = "a1b2c3d4e5f6a7b8c9d0"
    row = JobRow(job_id, stored.series_key, stored.study_key, "ct-organs-tiny", "m", "PACS", JobState.PENDING, "", 0)
    state.close_series(stored.series_key, SeriesState.COMPLETE, "", [row])
    (settings.storage.spool_dir / "m").write_text("{}")  # its manifest: the input is there to run again
    move_job(state, job_id, JobState.DEAD, "PACS answered 0xC000")
    return job_id


@pytest.fixture()
def site(tmp_path: Path, ct_series: Path) -> Iterator[Site]:
    """The console app on its own data dir, one dead job of a canary patient, users of each role."""
    env = {
        "PACSAI_DATA_DIR": str(tmp_path / "data"),
        "PACSAI_PEERS": f"PACS@127.0.0.1:{free_port()}",
        "PACSAI_LOG_KEY": "test-log-key",
        "PACSAI_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",  # nobody listens: the broker is down
    }
    settings = Settings.from_env(env)
    state = State(settings.storage.database)
    job_id = _spool_canary(settings, state, ct_series)
    tables = ConsoleTables(state)
    hashed = hash_password(PASSWORD)
    for name, role, phi in (("vera", "viewer", False), ("otto", "operator", False), ("otis", "operator", False)):
        tables.add_user(name, hashed, role, phi=phi)
    tables.add_user("ada", hashed, "admin", phi=False)
    app = console_app.create_app(settings, state=state)
    yield Site(settings, state, job_id, TestClient(app))
    state.close()


def _env(site: Site) -> dict[str, str]:
    return {
        "PACSAI_DATA_DIR": str(site.settings.storage.data_dir),
        "PACSAI_PEERS": "PACS@127.0.0.1:104",
        "PACSAI_LOG_KEY": "test-log-key",
    }


def _concrete(path: str, job_id: str) -> str:
    """A route's path with its parameters filled in (an existing job, so a refusal is not a 404)."""
    values = {"job_id": job_id, "action": "retry", "name": "x.dcm-0.png"}
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: values.get(m.group(1), "x"), path)


def test_every_route_refuses_an_anonymous_or_forged_session(site: Site) -> None:
    """Routes are taken from the app itself, so a route added later is covered without editing this test."""
    forged = Sessions(b"another key").issue("ada")[0]
    checked = []
    app = site.client.app
    assert isinstance(app, FastAPI)
    for route in app.routes:
        if isinstance(route, Mount):
            assert route.path == "/static", f"unexpected mount {route.path}"
            continue
        assert isinstance(route, APIRoute), f"a route of another kind: {route!r}"
        for method in sorted(route.methods or ()):
            if (route.path, method) in PUBLIC:
                continue
            path = _concrete(route.path, site.job_id)
            for cookies in ({}, {"pacsai_session": forged}):
                client = TestClient(site.client.app, cookies=cookies)
                response = client.request(method, path, data={"csrf": "x"}, follow_redirects=False)
                assert response.status_code == 401, f"{method} {path}: {response.status_code}"
                if method == "GET":  # a browser's navigation (Chrome's Accept header) is sent to the login page
                    page = client.get(path, headers={"accept": CHROME_ACCEPT}, follow_redirects=False)
                    assert (page.status_code, page.headers.get("location")) == (303, "/login"), path
            checked.append(f"{method} {route.path}")
    assert {"GET /", "GET /jobs/{job_id}/patient", "POST /jobs/{job_id}/{action}", "POST /rules"} <= set(checked)
    assert site.job().state is JobState.DEAD


def test_static_serves_only_its_files(site: Site) -> None:
    assert site.client.get("/static/console.css").status_code == 200
    for path in ("/static/../templates/base.html", "/static/%2e%2e/app.py", "/static/nothing.css"):
        assert site.client.get(path).status_code == 404, path


def test_an_action_without_this_sessions_csrf_token_is_refused(site: Site) -> None:
    otto = site.login("otto")
    otis_token = _csrf(site.login("otis").get("/jobs").text)
    for form in ({}, {"csrf": ""}, {"csrf": otis_token}, {"csrf": "0" * 64}):
        response = otto.post(f"/jobs/{site.job_id}/retry", data=form, follow_redirects=False)
        assert response.status_code == 403 and "CSRF" in response.text
    assert site.job().state is JobState.DEAD
    stranger = TestClient(site.client.app)  # a login form posted from elsewhere has no login cookie
    response = stranger.post("/login", data={"csrf": "x", "username": "otto", "password": PASSWORD})
    assert response.status_code == 403


def test_an_operators_retry_is_confirmed_done_and_audited(site: Site) -> None:
    otto = site.login("otto")
    page = otto.get(f"/jobs/{site.job_id}")
    assert 'id="action-retry"' in page.text
    confirm = otto.get(f"/jobs/{site.job_id}/retry")
    assert confirm.status_code == 200 and "Confirm: retry" in confirm.text
    response = otto.post(f"/jobs/{site.job_id}/retry", data={"csrf": _csrf(confirm.text)}, follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, f"/jobs/{site.job_id}")
    row = site.state.job(site.job_id)
    assert row is not None and (row.state, row.attempts) == (JobState.PENDING, 0)
    (action,) = [entry for entry in site.audit() if entry[0] == JOB_ACTION_EVENT]
    assert "otto" in action[1] and f"job {site.job_id[:8]}" in action[2] and "restarted from dead" in action[2]
    again = otto.post(f"/jobs/{site.job_id}/retry", data={"csrf": _csrf(confirm.text)})
    assert again.status_code == 409 and "cannot retry a pending job" in again.text


def test_a_redelivery_with_the_broker_down_is_left_to_the_node(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    move_job(site.state, site.job_id, JobState.DELIVERED)
    (site.settings.storage.outbox_dir / site.job_id).mkdir(parents=True)  # its results, still kept
    otto = site.login("otto")
    token = _csrf(otto.get(f"/jobs/{site.job_id}/redeliver").text)
    response = otto.post(f"/jobs/{site.job_id}/redeliver", data={"csrf": token}, follow_redirects=False)
    assert response.status_code == 303
    assert site.job().state is JobState.ENCODED
    assert "broker unreachable" in caplog.text


def test_redelivery_and_rerun_of_purged_files_are_refused_with_the_reason(site: Site) -> None:
    """As `pacsai jobs`: results deleted after the retention period cannot be sent again, nor a purged series re-run."""
    move_job(site.state, site.job_id, JobState.DELIVERED)  # and no outbox: its results were deleted
    (site.settings.storage.spool_dir / site.job().manifest).unlink()  # nor its instances (purged with the series)
    otto = site.login("otto")
    token = _csrf(otto.get(f"/jobs/{site.job_id}/redeliver").text)
    response = otto.post(f"/jobs/{site.job_id}/redeliver", data={"csrf": token}, follow_redirects=False)
    assert response.status_code == 409
    assert "were deleted after the retention period; re-run it" in response.text
    assert not (site.settings.storage.spool_dir / site.job().manifest).exists()  # its instances' manifest is gone
    response = otto.post(f"/jobs/{site.job_id}/rerun", data={"csrf": token}, follow_redirects=False)
    assert response.status_code == 409
    assert "instances were deleted after the retention period; the series must be sent again" in response.text
    assert site.job().state is JobState.DELIVERED and len(site.state.jobs_for_series(site.job().series_key)) == 1
    assert [entry for entry in site.audit() if entry[0] == JOB_ACTION_EVENT] == []  # nothing done, nothing audited


def test_a_viewer_can_neither_act_nor_see_patient_names(site: Site) -> None:
    vera = site.login("vera")
    token = _csrf(vera.get("/jobs").text)
    page = vera.get(f"/jobs/{site.job_id}")
    assert page.status_code == 200 and "not shown to your role" in page.text and "action-retry" not in page.text
    assert vera.get(f"/jobs/{site.job_id}/retry").status_code == 403
    for action in ("retry", "rerun", "cancel", "redeliver"):
        response = vera.post(f"/jobs/{site.job_id}/{action}", data={"csrf": token})
        assert response.status_code == 403 and "operator role" in response.text
    patient = vera.get(f"/jobs/{site.job_id}/patient")
    assert patient.status_code == 403
    rules = vera.post("/rules", data={"csrf": token, "series_key": site.job().series_key})
    assert rules.status_code == 200 and "ct-abdominal-organs" in rules.text
    for text in (page.text, patient.text, rules.text, vera.get("/jobs").text, vera.get("/series").text):
        assert "CANARY" not in text
    assert site.job().state is JobState.DEAD
    assert not [entry for entry in site.audit() if entry[0] in (JOB_ACTION_EVENT, PHI_VIEW_EVENT)]


def test_a_sender_sees_no_page_and_may_only_log_out(site: Site) -> None:
    """The STOW-RS role: a valid login, but every page and action of the console (all but STOW-RS) is refused."""
    ConsoleTables(site.state).add_user("stow", hash_password(PASSWORD), "sender", phi=False)
    sender = site.login("stow")
    token = CSRF.search(sender.get("/login").text)  # the login form's token is not a session's
    assert token is not None
    app = sender.app
    assert isinstance(app, FastAPI)
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path not in ("/login", "/logout") and not route.path.startswith(STOW):
            for method in route.methods or ():
                path = _concrete(route.path, site.job_id)
                response = sender.request(method, path, data={"csrf": token.group(1)}, follow_redirects=False)
                assert response.status_code == 403, f"{method} {path}: {response.status_code}"
    page = sender.get(f"/jobs/{site.job_id}", headers={"accept": CHROME_ACCEPT})
    assert page.status_code == 403 and "needs the viewer role" in page.text
    assert site.job().state is JobState.DEAD


def test_an_admin_sees_the_patient_and_the_view_is_audited_without_phi_in_logs(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ada = site.login("ada")
    patient = ada.get(f"/jobs/{site.job_id}/patient")
    assert patient.status_code == 200 and CANARY_NAME in patient.text and CANARY_ID in patient.text
    (view,) = [entry for entry in site.audit() if entry[0] == PHI_VIEW_EVENT]
    assert "ada" in view[1]
    trail = site.settings.audit_path.read_text()
    assert "CANARY" not in trail and "CANARY" not in caplog.text


def test_logins_are_locked_after_five_failures(site: Site) -> None:
    client = TestClient(site.client.app)
    for _ in range(5):
        assert site.try_login(client, "otto", "wrong password!").status_code == 401
    locked = site.try_login(client, "otto", PASSWORD)
    assert locked.status_code == 429 and "too many failed logins" in locked.text
    elsewhere = TestClient(site.client.app, client=("192.0.2.7", 50000))  # the user name is locked everywhere
    assert site.try_login(elsewhere, "otto", PASSWORD).status_code == 429
    assert site.try_login(elsewhere, "vera", PASSWORD).status_code == 303
    failures = [entry for entry in site.audit() if entry[0] == audit.USER_AUTHENTICATION[2] and "failed" in entry[2]]
    assert len(failures) == 5


def test_overview_lists_every_queue_tier_and_says_when_the_broker_is_down(site: Site) -> None:
    page = site.login("vera").get("/")
    assert page.status_code == 200
    queues = broker_queues(["ct-organs-tiny"])
    assert queues == ["infer.ct-organs-tiny.stat", "infer.ct-organs-tiny", "infer.ct-organs-tiny.background", "deliver"]
    for queue in queues:
        assert f"<code>{queue}</code>" in page.text
    assert "broker unreachable" in page.text and 'style="' not in page.text  # the CSP forbids inline styles
    assert page.headers["content-security-policy"].startswith("default-src 'self'")


def _pacsai(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"PACSAI_DATA_DIR": str(data), "PACSAI_LOG_KEY": "test-log-key"})


def test_users_cli_adds_lists_and_removes(site: Site, tmp_path: Path) -> None:
    data = site.settings.storage.data_dir
    short, good = tmp_path / "short", tmp_path / "good"
    short.write_text("short\n")
    good.write_text("a long enough pass phrase\n")
    refused = _pacsai(data, "users", "add", "carol", "--role", "operator", "--password-file", str(short))
    assert refused.returncode == 2 and "at least 10 characters" in refused.stderr
    added = _pacsai(data, "users", "add", "carol", "--role", "operator", "--phi", "--password-file", str(good))
    assert added.returncode == 0, added.stderr
    listing = _pacsai(data, "users", "list").stdout
    assert re.search(r"^carol\s+operator\s+yes$", listing, re.M) and re.search(r"^vera\s+viewer\s+no$", listing, re.M)
    assert "argon2" not in listing
    site.login("carol", "a long enough pass phrase")
    assert _pacsai(data, "users", "remove", "carol").returncode == 0
    assert "carol" not in _pacsai(data, "users", "list").stdout
    assert _pacsai(data, "users", "remove", "carol").returncode == 1
    retried = _pacsai(data, "jobs", "retry", site.job_id[:10])
    assert retried.returncode == 0 and "restarted from dead" in retried.stdout, retried.stderr
    assert site.job().state is JobState.PENDING


def test_templates_and_static_files_are_package_data() -> None:
    """An installed wheel has the console's pages: every file under console/ matches a package-data pattern."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["dicom_node"]
    root = REPO / "dicom_node"
    files = [p.relative_to(root).as_posix() for d in ("templates", "static") for p in (root / "console" / d).iterdir()]
    assert len(files) > 10
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_overview_counts_the_messages_of_each_tier(site: Site, redis_url: str) -> None:
    """With a real Redis: a STAT job waiting shows under the model's .stat queue, the other tiers are empty."""
    settings = Settings.from_env({**_env(site), "PACSAI_BROKER_URL": redis_url})
    celery = create_celery(settings)
    celery.send_task("pacsai.infer", args=[{}], queue="infer.ct-organs-tiny.stat")
    app = console_app.create_app(settings, state=site.state, celery=celery)
    page = site.login("vera", client=TestClient(app)).get("/")
    depths = dict(re.findall(r"<code>([\w.-]+)</code></td><td class=\"num\">(\d+|broker unreachable)<", page.text))
    assert set(broker_queues(rule.model for rule in load_rules(settings.node.routes_file))) == set(depths)
    assert {queue: n for queue, n in depths.items() if "ct-organs" in queue or queue == "deliver"} == {
        "infer.ct-organs-tiny.stat": "1",
        "infer.ct-organs-tiny": "0",
        "infer.ct-organs-tiny.background": "0",
        "deliver": "0",
    }
