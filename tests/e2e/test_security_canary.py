"""A7–A9: canary patient data driven through every error path; none of it may leak, and every access is audited.

Node and worker as processes on a password-protected Redis. Canary studies go through: a refused association, malformed
and inconsistent instances, a series no model takes, a job that fails, a delivery that fails until the job is dead,
a delivery that succeeds, and deletion after retention. Then the canary values, the UIDs and the Redis password are
searched for in every process log, in Redis (keys and values), in the metrics, in the audit trail and in every file
name under the data directory.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE, _config

from dicom_node.read_audit import read_entries
from tests.checks import find_leaks, make_canary_series
from tests.conftest import need
from tests.services import (
    free_port,
    port_open,
    redis_dump,
    require_binary,
    spawn,
    start_storescp,
    status_counts,
    wait_until,
)
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CANARY_ROOT = "1.2.826.0.1.3680043.10.1051.777"
EXTRA = {
    "AccessionNumber": "CANARYACC55",
    "InstitutionName": "CANARY HOSPITAL Qx",
    "ReferringPhysicianName": "CANARY^DOCTOR",
    "StudyDescription": "CANARY study Wv3",
}


def canary_variant(canary_dir: Path, target: Path, number: int, *, count: int = 20, **values: object) -> str:
    """A copy of the canary series under its own UID root (…777.<number>), with more canary values; returns the root."""
    root = f"{CANARY_ROOT}.{number}"
    target.mkdir(parents=True)
    for index, path in enumerate(sorted(canary_dir.iterdir())[:count]):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{root}.1", f"{root}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{root}.3.{index + 1}")
        for keyword, value in {**EXTRA, **values}.items():
            setattr(ds, keyword, value)
        ds.save_as(target / path.name, enforce_file_format=True)
    return root


def storescu(calling: str, port: int, folder: Path, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    time.sleep(1.1)  # one sender, paced: a margin under the node's per-address connection cap (N9)
    return subprocess.run(
        ["storescu", "-xv", "-aet", calling, "-aec", "PACSAI", "+sd", "127.0.0.1", str(port), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def send_malformed(port: int, canary_dir: Path, workdir: Path) -> list[int]:
    """Instances carrying the canary values that the node must refuse, each for another reason."""
    files = sorted(canary_dir.iterdir())
    bad_uid, no_pixels, mismatch = (dcmread(files[i]) for i in (0, 1, 2))
    bad_uid.StudyInstanceUID = "CANARY.not.a.uid"  # invalid UID: 0xC000
    del no_pixels.PixelData  # image without pixels: 0xA900
    mismatch.SOPInstanceUID = f"{CANARY_ROOT}.9.9"  # differs from the command's: 0xA900
    mismatch.save_as(workdir / "mismatch.dcm", enforce_file_format=False)  # the file meta keeps the old UID
    truncated = workdir / "truncated.dcm"
    truncated.write_bytes(files[3].read_bytes()[:-4000])  # pixel data cut short: 0xC000
    ae = AE(ae_title="GOODPACS")
    ae.add_requested_context(str(bad_uid.SOPClassUID), [str(bad_uid.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in (bad_uid, no_pixels)]
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files as they are: the command's UID comes from the file meta
    try:
        statuses += [int(assoc.send_c_store(path).Status) for path in (workdir / "mismatch.dcm", truncated)]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assoc.release()
    return statuses


@pytest.mark.catalogue("A7", "A8", "A9")
def test_canary_through_every_error_path_leaks_nowhere(
    tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    need("storescu"), need("storescp"), need("redis-server")
    canaries = make_canary_series(ct_series, tmp_path / "canary")
    canary = tmp_path / "canary"
    no_model = canary_variant(canary, tmp_path / "no-model", 1, count=3, SeriesDescription="CANARY scout Pz")
    failing = canary_variant(canary, tmp_path / "failing", 2, count=12)
    failing_files = sorted((tmp_path / "failing").iterdir())
    twin = dcmread(failing_files[1])
    twin.ImagePositionPatient = dcmread(failing_files[0]).ImagePositionPatient  # duplicate positions: job fails
    twin.save_as(failing_files[1], enforce_file_format=True)
    undeliverable = canary_variant(canary, tmp_path / "undeliverable", 3)
    canaries += [no_model, failing, undeliverable, *EXTRA.values()]

    password = f"pw-{secrets.token_hex(8)}"
    (tmp_path / "redis-password").write_text(password + "\n")
    redis_port = free_port()
    redis = spawn(
        "redis",
        [
            require_binary("redis-server"),
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp_path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            password,
        ],
        tmp_path / "redis",
    )
    wait_until(lambda: port_open(redis_port), 20, "redis-server")
    storescp, pacs_port, received = start_storescp(tmp_path / "pacs", ae_title="GOODPACS")
    metrics_port = free_port()
    pacsai = stack(
        peers=f"GOODPACS@127.0.0.1:{pacs_port},DOWNPACS@127.0.0.1:{free_port()}",
        broker_url=f"redis://127.0.0.1:{redis_port}/0",
        PACSAI_QUIET_PERIOD_S="3",
        PACSAI_BROKER_PASSWORD_FILE=str(tmp_path / "redis-password"),
        PACSAI_SEND_MAX_ATTEMPTS="2",
        PACSAI_METRICS_PORT=str(metrics_port),
        PACSAI_RETENTION_H="0.0005",
    )  # ~2 s after a job ends
    pacsai.adopt(redis)
    pacsai.adopt(storescp)
    port, env = pacsai.port, pacsai.env
    pacsai.start("node")
    pacsai.start("worker")
    refused = storescu("INTRUDER", port, canary, check=False)  # refused association
    assert refused.returncode != 0
    assert send_malformed(port, canary, tmp_path) == [0xC000, 0xA900, 0xA900, 0xC000]
    storescu("GOODPACS", port, tmp_path / "no-model")  # no model takes it
    storescu("GOODPACS", port, tmp_path / "failing")  # the job fails
    storescu("DOWNPACS", port, tmp_path / "undeliverable")  # delivery fails: job dead
    storescu("GOODPACS", port, canary)  # success, delivered

    def settled() -> dict[str, dict[str, int]] | None:
        now = status_counts(env)
        done = now["jobs"] == {"delivered": 1, "failed": 1, "dead": 1}
        return now if done and now["series"].get("purged") == 3 else None

    final = wait_until(settled, 240, "failed, dead and delivered jobs, then purged series", 2.0)
    assert final["series"] == {"no_model": 1, "purged": 3}
    assert len([p for p in received.iterdir() if p.is_file()]) == 2
    texts = {proc.name: proc.log() for proc in pacsai.processes if proc.name.startswith("pacsai")}
    texts["redis"] = redis_dump(f"redis://127.0.0.1:{redis_port}/0", password)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        texts["metrics"] = response.read().decode()
    audit_path = tmp_path / "data" / "audit.log"
    texts["audit"] = audit_path.read_text()
    texts["status"] = json.dumps(final)

    assert "series not loadable" in texts["pacsai-worker"] and "transport:   redis://:**@" in texts["pacsai-worker"]
    assert 'pacsai_associations_total{result="rejected"} 1.0' in texts["metrics"]
    assert find_leaks([*canaries, password], texts, tmp_path / "data") == []
    events = [(e.event, e.outcome) for e in read_entries(audit_path)]
    for expected in [
        ("Application Activity", "success"),
        ("Security Alert", "minor failure"),
        ("User Authentication", "success"),
        ("DICOM Instances Transferred", "minor failure"),
        ("DICOM Instances Transferred", "success"),
        ("DICOM Study Deleted", "success"),
    ]:
        assert expected in events, f"no {expected} event in the audit trail"
    sent = [e for e in read_entries(audit_path) if e.description.startswith("results:")]
    assert [e.description for e in sent] == ["results: 2 of 2 file(s) accepted"]
    assert sent[0].participants[-1].startswith("GOODPACS (127.0.0.1)")
