"""DICOMweb peers checked like DIMSE peers (issue 14): a QIDO-RS query with the configured credentials against the
real Orthanc DICOMweb plugin; reachable, credentials refused, no service at the URL, nothing listening; recorded in
the peer-status table and the gauge, and printed by `pacsai check-peers`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.echo_peers import check_peers
from dicom_node.metrics import PEER_REACHABLE, peer_recorder
from pacsai.console_db import ConsoleTables
from pacsai.settings import Settings
from pacsai.state import State
from tests.conftest import need
from tests.services import Orthanc, free_port, run_cli, start_orthanc

pytestmark = pytest.mark.integration
USER, PASSWORD = "pacsai", "qido-secret-0123"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    need("Orthanc")
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), modalities={}, lua=None, users={USER: PASSWORD})
    yield server
    server.stop()


def web_env(tmp_path: Path, orthanc: Orthanc) -> dict[str, str]:
    """Four DICOMweb peers: the real one, the same with a wrong password, a wrong path, a port nobody listens on."""
    secret = tmp_path / "dicomweb-credentials"
    secret.write_text(
        f"GOODWEB basic {USER}:{PASSWORD}\nBADPASS basic {USER}:wrong-password\nWRONGPATH basic {USER}:{PASSWORD}\n"
    )
    peers = {
        "GOODWEB": f"{orthanc.base}/dicom-web",
        "BADPASS": f"{orthanc.base}/dicom-web",
        "WRONGPATH": f"{orthanc.base}/no-such-service",
        "NOBODY": f"http://127.0.0.1:{free_port()}/dicom-web",
    }
    return {
        "PACSAI_DATA_DIR": str(tmp_path / "data"),
        "PACSAI_LOG_KEY": "test-log-key",
        "PACSAI_DICOMWEB_PEERS": ",".join(f"{name}={url}" for name, url in peers.items()),
        "PACSAI_DICOMWEB_CREDENTIALS_FILE": str(secret),
        "PACSAI_DESTINATION": "GOODWEB",
        "PACSAI_DIMSE_TIMEOUT_S": "5",
    }


def test_dicomweb_peers_are_checked_and_recorded_like_dimse_peers(tmp_path: Path, orthanc: Orthanc) -> None:
    settings = Settings.from_env(web_env(tmp_path, orthanc))
    checks = {check.peer.ae_title: check for check in check_peers(settings)}
    assert {name: (c.reachable, c.detail) for name, c in checks.items()} == {
        "GOODWEB": (True, "QIDO-RS answered HTTP 200"),
        "BADPASS": (False, "credentials refused (HTTP 401)"),
        "WRONGPATH": (False, "no DICOMweb service at that URL (HTTP 404)"),
        "NOBODY": (False, "cannot connect (refused, or the host name does not resolve)"),
    }
    state = State(settings.storage.database)
    try:
        record = peer_recorder(state)
        for check in checks.values():
            record(check)
        rows = {row.ae_title: row for row in ConsoleTables(state).peers()}
        assert rows["GOODWEB"].reachable and rows["GOODWEB"].address == f"{orthanc.base}/dicom-web"
        assert not rows["BADPASS"].reachable and rows["BADPASS"].detail == "credentials refused (HTTP 401)"
    finally:
        state.close()
    assert PEER_REACHABLE.labels(peer="GOODWEB")._value.get() == 1
    assert PEER_REACHABLE.labels(peer="BADPASS")._value.get() == 0


def test_check_peers_cli_prints_each_dicomweb_peer_without_its_password(tmp_path: Path, orthanc: Orthanc) -> None:
    run = run_cli("check-peers", env=web_env(tmp_path, orthanc))
    assert run.returncode == 1, run.stdout + run.stderr
    lines = {line.split()[0]: line for line in run.stdout.splitlines()}
    assert f"{orthanc.base}/dicom-web" in lines["GOODWEB"] and " ok " in lines["GOODWEB"]
    assert lines["BADPASS"].endswith("FAILED  credentials refused (HTTP 401)")
    assert "ERROR dicom_node.echo_peers: peer BADPASS at" in run.stderr and "failed its DICOMweb check" in run.stderr
    assert PASSWORD not in run.stdout + run.stderr
