"""DICOMweb with the real Orthanc DICOMweb plugin: results out by STOW-RS (basic auth), studies in by STOW-RS."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.conftest import need
from tests.dicomweb import add_user, stow, wait_for_web
from tests.services import Orthanc, free_port, start_orthanc
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
USER, PASSWORD = "pacsai", "stow-secret-0123"  # pacsai's account at Orthanc
PUSHER, PUSH_PASSWORD = "ORTHANCWEB", "orthanc-pushes-4567"  # Orthanc's account at pacsai (a console user, sender)


def profiles(tmp_path: Path, peer: str) -> str:
    """A profile for the DICOMweb peer: SEG and SR, SR only should it refuse the SEG (no SC overlays to make)."""
    path = tmp_path / "profiles.yaml"
    path.write_text(f"peers:\n  {peer}: {{outputs: [seg, sr], seg_fallback: sr-only}}\n")
    return str(path)


def orthanc_modalities(orthanc: Orthanc) -> list[str]:
    """Modalities of the series Orthanc holds, sorted."""
    series = orthanc.request("GET", "/series?expand")
    return sorted(item["MainDicomTags"].get("Modality", "") for item in series)


def test_results_go_to_orthanc_by_stow_rs(tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]) -> None:
    """storescu → pacsai; SEG and SR are POSTed to Orthanc's /dicom-web/studies with HTTP basic auth; the
    password is in a secret file and never in a log."""
    need("Orthanc"), need("storescu")
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={}, lua=None, users={USER: PASSWORD})
    secret = tmp_path / "dicomweb-credentials"
    secret.write_text(f"ORTHANCWEB basic {USER}:{PASSWORD}\n")
    pacsai = stack(
        peers="",
        PACSAI_ALLOWED_CALLERS="STORESCU",
        PACSAI_DICOMWEB_PEERS=f"ORTHANCWEB={orthanc.base}/dicom-web",
        PACSAI_DICOMWEB_CREDENTIALS_FILE=str(secret),
        PACSAI_DESTINATION="ORTHANCWEB",
        PACSAI_PROFILES_FILE=profiles(tmp_path, "ORTHANCWEB"),
    )
    pacsai.adopt(orthanc.process)
    pacsai.start("run")
    pacsai.send(sorted(ct_series.iterdir()), "STORESCU")
    pacsai.wait_jobs({"delivered": 1}, timeout_s=120)
    assert orthanc_modalities(orthanc) == ["SEG", "SR"]
    assert PASSWORD not in pacsai.logs()
    assert "STOW-RS to ORTHANCWEB: HTTP 200" in pacsai.logs()


def test_series_posted_by_stow_rs_is_inferred_and_results_stowed(
    tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """A real CT series POSTed with httpx to /dicom-web/studies (a sender account) → the job runs → SEG and SR go
    to Orthanc by STOW-RS; the series was closed by the request's end, as a released association is."""
    need("Orthanc")
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={}, lua=None, users={USER: PASSWORD})
    web_port = free_port()
    pacsai = stack(
        peers="",
        PACSAI_ALLOWED_CALLERS="STORESCU",
        PACSAI_DICOMWEB_PEERS=f"ORTHANCWEB={orthanc.base}/dicom-web",
        PACSAI_DICOMWEB_CREDENTIALS=f"ORTHANCWEB basic {USER}:{PASSWORD}",
        PACSAI_DESTINATION="ORTHANCWEB",
        PACSAI_PROFILES_FILE=profiles(tmp_path, "ORTHANCWEB"),
        PACSAI_WEB_PORT=str(web_port),
        PACSAI_WEB_HOST="127.0.0.1",
    )
    pacsai.adopt(orthanc.process)
    pacsai.data.mkdir(parents=True, exist_ok=True)
    add_user(pacsai.data, "modality1", PUSH_PASSWORD, "sender")
    run = pacsai.start("run")
    wait_for_web(web_port)
    parts = [path.read_bytes() for path in sorted(ct_series.iterdir())]
    answer = stow(
        f"http://127.0.0.1:{web_port}/dicom-web/studies", parts, auth=httpx.BasicAuth("modality1", PUSH_PASSWORD)
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["00081199"]["Value"]) == len(parts)  # ReferencedSOPSequence: every instance
    pacsai.wait_jobs({"delivered": 1}, timeout_s=120)
    assert orthanc_modalities(orthanc) == ["SEG", "SR"]
    assert "series complete" in run.log() and PASSWORD not in pacsai.logs()
    ours = "".join(process.log() for process in pacsai.processes if process.name.startswith("pacsai"))
    first = dcmread(sorted(ct_series.iterdir())[0], stop_before_pixels=True)
    assert str(first.StudyInstanceUID) not in ours and str(first.SOPInstanceUID) not in ours  # no UID logged


def test_orthanc_pushes_by_stow_rs_and_gets_results_back(
    tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """Orthanc's own DICOMweb client sends a study to pacsai (its DicomWeb "Servers" entry, basic auth as
    ORTHANCWEB); the results go back to the sender, a DICOMweb peer, by STOW-RS: DICOMweb both ways."""
    need("Orthanc")
    web_port = free_port()
    servers = {
        "pacsai": {"Url": f"http://127.0.0.1:{web_port}/dicom-web/", "Username": PUSHER, "Password": PUSH_PASSWORD}
    }
    extra = {"DicomWeb": {"Enable": True, "Servers": servers}}
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={}, lua=None, users={USER: PASSWORD}, extra=extra)
    pacsai = stack(
        peers="",
        PACSAI_ALLOWED_CALLERS="STORESCU",
        PACSAI_DICOMWEB_PEERS=f"{PUSHER}={orthanc.base}/dicom-web",
        PACSAI_DICOMWEB_CREDENTIALS=f"{PUSHER} basic {USER}:{PASSWORD}",
        PACSAI_PROFILES_FILE=profiles(tmp_path, PUSHER),
        PACSAI_WEB_PORT=str(web_port),
        PACSAI_WEB_HOST="127.0.0.1",
    )
    pacsai.adopt(orthanc.process)
    pacsai.data.mkdir(parents=True, exist_ok=True)
    add_user(pacsai.data, PUSHER, PUSH_PASSWORD, "sender")
    pacsai.start("run")
    wait_for_web(web_port)
    study = {orthanc.upload(path)["ParentStudy"] for path in sorted(ct_series.iterdir())}
    orthanc.request("POST", "/dicom-web/servers/pacsai/stow", json.dumps({"Resources": sorted(study)}).encode())
    pacsai.wait_jobs({"delivered": 1}, timeout_s=120)
    assert orthanc_modalities(orthanc) == ["CT", "SEG", "SR"]
