"""STOW-RS SCU (worker/stow.py) against real servers: Orthanc's DICOMweb plugin with basic auth, and pacsai's own
STOW-RS endpoint over HTTPS with a bearer token and a CA bundle; each failure class becomes the right error."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from dicom_node.send import SendResult
from pacsai.dimse import StoreOutcome
from pacsai.errors import PeerRefused, PeerUnavailable
from pacsai.peers import WebAuth, WebPeer
from tests.conftest import need
from tests.dicomweb import add_user, wait_for_web
from tests.notice_peers import server_tls
from tests.services import free_port, start_orthanc
from tests.stack import Stack, StoreScpPacs
from worker.stow import stow_files

pytestmark = pytest.mark.integration
USER, PASSWORD = "pacsai", "stow-secret-0123"


def outcomes(results: list[SendResult]) -> list[tuple[str, StoreOutcome, int]]:
    return [(r.path.name, r.outcome, r.code) for r in results]


def test_orthanc_with_basic_auth(tmp_path: Path, ct_series: Path) -> None:
    """Stored with the right password; a wrong one is a refusal naming HTTP 401 (not retried); a stopped server is
    unavailable (retried). (Debian's Orthanc 1.10 crashes on its first HTTPS request here: TLS is tested below.)"""
    need("Orthanc")
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={}, lua=None, users={USER: PASSWORD})
    files = sorted(ct_series.iterdir())[:2]
    url = f"{orthanc.base}/dicom-web"
    peer = WebPeer("ORTHANCWEB", url, WebAuth("basic", USER, PASSWORD))
    try:
        results = stow_files(files, peer, timeout_s=30)
        assert outcomes(results) == [(path.name, StoreOutcome.SUCCESS, 0) for path in files]
        assert len(orthanc.request("GET", "/instances")) == 2
        with pytest.raises(PeerRefused, match="HTTP 401"):
            stow_files(files, WebPeer("ORTHANCWEB", url, WebAuth("basic", USER, "wrong")), timeout_s=30)
    finally:
        orthanc.stop()
    with pytest.raises(PeerUnavailable, match="ConnectError"):
        stow_files(files, peer, timeout_s=5)


def test_pacsai_endpoint_with_a_bearer_token(
    ct_series: Path, stack: Callable[..., Stack], pacs: StoreScpPacs, tmp_path: Path
) -> None:
    """Our client against our server over HTTPS (PACSAI_TLS_CERT) with a bearer token and the CA bundle: the
    instance it refuses (no PixelData) is PERMANENT with its FailureReason 0xA900, the other SUCCESS; without the
    CA bundle the TLS handshake fails (unavailable), with a forged token HTTP 401 (refused)."""
    need("openssl")
    web_port = free_port()
    (tmp_path / "pki").mkdir()
    _, cert = server_tls(tmp_path / "pki")
    pacsai = stack(
        peers=pacs.peer,
        PACSAI_WEB_PORT=str(web_port),
        PACSAI_WEB_HOST="127.0.0.1",
        PACSAI_TLS_CERT=str(cert),
        PACSAI_TLS_KEY=str(tmp_path / "pki" / "server.key"),
        PACSAI_TLS_PORT=str(free_port()),
    )
    pacsai.data.mkdir(parents=True, exist_ok=True)
    add_user(pacsai.data, "modality1", PASSWORD, "sender")
    pacsai.start("node")
    wait_for_web(web_port)
    url = f"https://127.0.0.1:{web_port}/dicom-web"
    verify = ssl.create_default_context(cafile=str(cert))
    token = httpx.post(f"{url}/token", auth=("modality1", PASSWORD), verify=verify).json()["access_token"]
    good = sorted(ct_series.iterdir())[0]
    broken = dcmread(sorted(ct_series.iterdir())[1])
    del broken.PixelData
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    peer = WebPeer("PACSAI2", url, WebAuth("bearer", secret=token), ca=cert)
    results = stow_files([good, tmp_path / "broken.dcm"], peer, timeout_s=30)
    assert outcomes(results) == [(good.name, StoreOutcome.SUCCESS, 0), ("broken.dcm", StoreOutcome.PERMANENT, 0xA900)]
    with pytest.raises(PeerUnavailable, match="ConnectError"):  # the system's CAs do not know ours
        stow_files([good], WebPeer("PACSAI2", url, peer.auth), timeout_s=30)
    with pytest.raises(PeerRefused, match="HTTP 401"):
        stow_files([good], WebPeer("PACSAI2", url, WebAuth("bearer", secret="forged"), ca=cert), timeout_s=30)
