"""STOW-RS into a running node (the console's HTTP port): authentication, media type, and per-instance outcomes;
what is accepted is in the spool and the series table, what is not is named in FailedSOPSequence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO

from pacsai.state import State
from tests.dicomweb import STOW_TYPE, add_user, body_of, stow, wait_for_web
from tests.services import free_port
from tests.stack import Stack, StoreScpPacs

pytestmark = pytest.mark.integration
SENDER, VIEWER, PASSWORD = ("modality1", "looker", "stow-password-42")


@pytest.fixture()
def node_url(stack: Callable[..., Stack], pacs: StoreScpPacs) -> tuple[str, Path]:
    """A node with the console on a free port, a sender and a viewer; (service root URL, data dir)."""
    web_port = free_port()
    pacsai = stack(
        peers=pacs.peer,
        PACSAI_WEB_PORT=str(web_port),
        PACSAI_WEB_HOST="127.0.0.1",
        PACSAI_RELEASE_GRACE_S="120",  # the series stay open while the test looks at them
        PACSAI_QUIET_PERIOD_S="120",
    )
    pacsai.data.mkdir(parents=True, exist_ok=True)
    add_user(pacsai.data, SENDER, PASSWORD, "sender")
    add_user(pacsai.data, VIEWER, PASSWORD, "viewer")
    pacsai.start("node")
    wait_for_web(web_port)
    return f"http://127.0.0.1:{web_port}/dicom-web", pacsai.data


def as_bytes(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_who_may_send_and_what(node_url: tuple[str, Path], ct_series: Path) -> None:
    """401 without or with wrong credentials (and a challenge), 403 for a viewer, 415 for another media type;
    HTTP basic and a bearer token from /dicom-web/token both work."""
    url, _ = node_url
    one = sorted(ct_series.iterdir())[0].read_bytes()
    nobody = stow(f"{url}/studies", [one])
    assert nobody.status_code == 401 and "Basic" in nobody.headers["www-authenticate"]
    assert stow(f"{url}/studies", [one], auth=httpx.BasicAuth(SENDER, "wrong-password")).status_code == 401
    assert stow(f"{url}/studies", [one], headers={"Authorization": "Bearer forged.token"}).status_code == 401
    assert stow(f"{url}/studies", [one], auth=httpx.BasicAuth(VIEWER, PASSWORD)).status_code == 403
    wrong_type = httpx.post(
        f"{url}/studies", content=one, headers={"Content-Type": "application/dicom"}, auth=(SENDER, PASSWORD)
    )
    assert wrong_type.status_code == 415
    json_parts = httpx.post(
        f"{url}/studies",
        content=body_of([b"{}"], "application/dicom+json"),
        headers={"Content-Type": STOW_TYPE.replace("application/dicom", "application/dicom+json")},
        auth=(SENDER, PASSWORD),
    )
    assert json_parts.status_code == 415
    token = httpx.post(f"{url}/token", auth=(SENDER, PASSWORD)).json()["access_token"]
    answer = stow(f"{url}/studies", [one], headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    assert httpx.post(f"{url}/token", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_broken_instance_is_named_and_the_others_kept(node_url: tuple[str, Path], ct_series: Path) -> None:
    """Three instances, one a CT image without PixelData, one part that is not DICOM: 202, the two good
    ones referenced, spooled and recorded, the others failed with their specific reasons; audited per study."""
    url, data = node_url
    files = sorted(ct_series.iterdir())[:3]
    broken = dcmread(files[2])
    del broken.PixelData  # a CT image without pixels: 0xA900
    parts = [files[0].read_bytes(), files[1].read_bytes(), as_bytes(broken), b"not a DICOM file at all"]
    answer = stow(f"{url}/studies", parts, auth=httpx.BasicAuth(SENDER, PASSWORD))
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    result = Dataset.from_json(answer.json())
    good = [str(dcmread(path).SOPInstanceUID) for path in files[:2]]
    assert [str(item.ReferencedSOPInstanceUID) for item in result.ReferencedSOPSequence] == good
    failed = [(str(item.ReferencedSOPInstanceUID), int(item.FailureReason)) for item in result.FailedSOPSequence]
    assert failed == [(str(broken.SOPInstanceUID), 0xA900), ("", 0xC000)]
    state = State(data / "pacsai.db")
    try:
        (series,) = state.receiving_series()
        spooled = [data / "spool" / path for _, path in state.series_instances(series.series_key)]
    finally:
        state.close()
    assert len(spooled) == 2 and all(path.is_file() for path in spooled)
    assert series.calling_ae == SENDER and series.released_at is not None  # the request's end is a release
    assert not list((data / "incoming").glob("incoming-stow-*"))  # refused parts leave nothing behind
    assert "2 instance(s) stored, 1 refused" in (data / "audit.log").read_text()


def test_study_in_the_url_must_match(node_url: tuple[str, Path], ct_series: Path) -> None:
    """POST /studies/{study}: an instance of another study fails with 0xA900; none stored: 409."""
    url, _ = node_url
    one = sorted(ct_series.iterdir())[0].read_bytes()
    answer = stow(f"{url}/studies/1.2.3.4", [one], auth=httpx.BasicAuth(SENDER, PASSWORD))
    assert answer.status_code == 409
    (item,) = Dataset.from_json(answer.json()).FailedSOPSequence
    assert int(item.FailureReason) == 0xA900
    assert stow(f"{url}/studies/not-a-uid", [one], auth=httpx.BasicAuth(SENDER, PASSWORD)).status_code == 400
