"""A10: a model run on a remote worker sees only a de-identified copy; its results reach the PACS re-identified.

The deployment of docs/security.md §8, on one machine: the node and a delivery worker on the node's data directory;
a "remote" inference worker (`pacsai worker --no-deliver`) with its own data directory, in its own mount namespace
where only the node's `spool/deid` and `outbox` are mounted (as a volume would be on a GPU host); PostgreSQL and Redis
shared. dcmtk storescu plays the modality and storescp the PACS.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.checks import check_seg_and_sr, find_leaks, make_canary_series
from tests.conftest import IN_CI, need
from tests.services import (
    REPO,
    Process,
    files_arrived,
    send_folder,
    spawn,
    start_storescp,
)
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CANARY_ROOT = "1.2.826.0.1.3680043.10.1051.777"  # tests.checks.make_canary_series
EXTRA = {
    "AccessionNumber": "CANARYACC55",
    "ReferringPhysicianName": "CANARY^DOCTOR",
    "StudyDescription": "CANARY study Wv3",
    "InstitutionName": "CANARY HOSPITAL Qx",
}
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def mount_namespaces_work() -> None:
    """Skip (fail in CI) where this kernel or container gives no unprivileged mount namespace."""
    need("unshare")
    if subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30).returncode != 0:
        message = "unshare cannot create a user and mount namespace here"
        pytest.fail(message) if IN_CI else pytest.skip(message)


def canary_series(ct_series: Path, target: Path) -> list[str]:
    """The canary series of the other tests, with more identifying values; returns every value that must not leak."""
    canaries = make_canary_series(ct_series, target)
    for path in target.iterdir():
        ds = dcmread(path)
        for keyword, value in EXTRA.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return [*canaries, *EXTRA.values()]


def start_remote_worker(node_data: Path, workdir: Path, env: dict[str, str]) -> Process:
    """`pacsai worker --no-deliver` seeing, of the node's data, only spool/deid and the outbox (bind mounts)."""
    remote = workdir / "remote-data"
    for folder in ("spool/deid", "outbox"):
        (remote / folder).mkdir(parents=True)
        (node_data / folder).mkdir(parents=True, exist_ok=True)
    mounts = " && ".join(
        f"mount --bind {shlex.quote(str(node_data / f))} {shlex.quote(str(remote / f))}"
        for f in ("spool/deid", "outbox")
    )
    worker = f"exec {shlex.quote(sys.executable)} -m worker.cli worker --no-deliver"
    remote_env = {
        **env,
        "PACSAI_DATA_DIR": str(remote),
        "PACSAI_WORKER_MODELS": "ct-organs-tiny",
        "PACSAI_LOG_KEY": "another-key-on-the-gpu-host",
        "PYTHONPATH": str(REPO),
    }
    return spawn("pacsai-remote-worker", [*UNSHARE, "sh", "-c", f"{mounts} && {worker}"], workdir, remote_env)


@pytest.mark.catalogue("A10")
@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_remote_model_sees_only_a_deidentified_copy(
    tmp_path: Path, ct_series: Path, redis_url: str, database: str, stack: Callable[..., Stack]
) -> None:
    need("storescu"), need("storescp"), need("dciodvfy")
    mount_namespaces_work()
    source = tmp_path / "canary-series"
    canaries = canary_series(ct_series, source)
    storescp, pacs_port, received = start_storescp(tmp_path / "pacs", ae_title="STORESCU")
    node_data = tmp_path / "node-data"
    pacsai = stack(
        peers=f"STORESCU@127.0.0.1:{pacs_port}",
        broker_url=redis_url,
        data=node_data,
        PACSAI_DATABASE_URL=database,
        PACSAI_DEIDENTIFY_FOR="ct-organs-tiny",
    )
    pacsai.adopt(storescp)
    port, env = pacsai.port, pacsai.env
    pacsai.start("node")
    # on the node's host: delivery, and only a model no rule sends this CT to (it never takes the CT job)
    local = pacsai.start("worker", PACSAI_WORKER_MODELS="cxr-pneumonia")
    remote = pacsai.adopt(start_remote_worker(node_data, tmp_path, env))
    send_folder(port, source)
    files = files_arrived(received, 2)  # SEG and SR
    assert "job encoded" in remote.log() and "job encoded" not in local.log()

    # what the remote worker read: a de-identified copy, under spool/deid only
    copies = sorted((node_data / "spool" / "deid").rglob("*.dcm"))
    assert len(copies) == 20
    for path in copies:
        data = path.read_bytes()
        assert [canary for canary in canaries if canary.encode() in data] == []
        copy = dcmread(path, stop_before_pixels=True)
        assert copy.PatientIdentityRemoved == "YES"
        assert copy.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    # what it wrote: results about nobody, in the shared outbox
    outbox = sorted((node_data / "outbox").rglob("*.dcm"))
    assert len(outbox) == 2
    assert [c for path in outbox for c in canaries if c.encode() in path.read_bytes()] == []
    # the identity map stayed next to the originals, outside what the remote worker mounts
    (identity,) = (node_data / "spool").glob("*/*/identity-*.json")
    assert "deid" not in identity.relative_to(node_data / "spool").parts

    # what the PACS got: the original study, patient and references, dciodvfy clean
    by_modality = {dcmread(p, stop_before_pixels=True).Modality: p for p in files}
    assert sorted(by_modality) == ["SEG", "SR"]
    check_seg_and_sr(by_modality["SEG"], by_modality["SR"], source)  # references original SOP UIDs
    original = dcmread(next(source.iterdir()), stop_before_pixels=True)
    for path in files:
        result = dcmread(path)
        assert result.StudyInstanceUID == f"{CANARY_ROOT}.1"
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyDescription",
        ):
            assert result.get(keyword) == original.get(keyword), keyword
        assert "PatientIdentityRemoved" not in result
    evidence = dcmread(by_modality["SR"]).CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == f"{CANARY_ROOT}.1"
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == f"{CANARY_ROOT}.2"
    assert dcmread(by_modality["SEG"]).FrameOfReferenceUID == original.FrameOfReferenceUID

    audit = (node_data / "audit.log").read_text()
    assert "110106" in audit and "de-identified copy" in audit
    texts = {proc.name: proc.log() for proc in pacsai.processes if proc.name.startswith("pacsai")}
    texts["audit"] = audit
    assert find_leaks(canaries, texts, node_data) == []
    assert find_leaks(canaries, {}, tmp_path / "remote-data") == []
