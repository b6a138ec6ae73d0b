"""E5: a PACS that cannot store SEG gets the configured fallback, the refusal is logged and recorded, and the job
is delivered (never dead or failed merely because the SEG was refused)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

from pacsai.jobs import JobState
from pacsai.state import State
from tests.checks import dciodvfy_errors
from tests.conftest import need
from tests.pacs import ScriptedPacs
from tests.services import (
    free_port,
    port_open,
    require_binary,
    spawn,
    wait_until,
)
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# dcmtk storescp association configuration (-xf): Verification, CT, Comprehensive 3D SR and Secondary Capture;
# no Segmentation Storage
NO_SEG_CONFIG = f"""
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[NoSegmentation]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
PresentationContext3 = {COMPREHENSIVE_3D_SR}\\Uncompressed
PresentationContext4 = {SecondaryCaptureImageStorage}\\Uncompressed

[[Profiles]]
[NoSeg]
PresentationContexts = NoSegmentation
"""


def _send_study(port: int, series: Path) -> None:
    subprocess.run(
        ["storescu", "-xv", "-aet", "PACS", "-aec", "PACSAI", "+sd", "127.0.0.1", str(port), str(series)],
        check=True,
        timeout=120,
        capture_output=True,
    )


def _finished_job(data: Path) -> tuple[JobState, list[tuple[str, str, int, str]]]:
    def finished() -> bool:
        state = State(data / "pacsai.db")
        counts = state.counts()["jobs"]
        state.close()
        return set(counts) & {"delivered", "failed", "dead"} != set()

    wait_until(finished, 300, "the job to finish", 1.0)
    state = State(data / "pacsai.db")
    (job,) = state.jobs_in(*JobState)
    deliveries = state.deliveries(job.job_id)
    state.close()
    return job.state, deliveries


@pytest.mark.catalogue("E5")
def test_a_pacs_without_seg_gets_the_seg_as_sc_overlays(
    tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """dcmtk storescp accepts no SEG context: the default fallback (sc) sends an overlay per slice with a finding."""
    need("storescu"), need("storescp"), need("dciodvfy")
    (tmp_path / "no-seg.cfg").write_text(NO_SEG_CONFIG)
    pacs_port, port = free_port(), free_port()
    received = tmp_path / "received"
    received.mkdir()
    storescp = spawn(
        "storescp",
        [
            require_binary("storescp"),
            "-aet",
            "PACS",
            "-od",
            str(received),
            "-xf",
            str(tmp_path / "no-seg.cfg"),
            "NoSeg",
            str(pacs_port),
        ],
        tmp_path,
    )
    pacsai = stack(peers=f"PACS@127.0.0.1:{pacs_port}", port=port)
    pacsai.adopt(storescp)
    wait_until(lambda: port_open(pacs_port), 20, "storescp")
    run = pacsai.start("run")
    _send_study(port, ct_series)
    job_state, deliveries = _finished_job(tmp_path / "data")
    log = run.log()

    assert job_state is JobState.DELIVERED
    status = {name: (state, detail) for name, state, _, detail in deliveries}
    assert status.pop("seg.dcm") == (
        "fallback",
        f"0x0122: no presentation context accepted; fallback sc, {len(status) - 1} file(s)",
    )
    assert status.pop("sr.dcm")[0] == "success"
    assert status and all(name.startswith("overlay-") and state == "success" for name, (state, _) in status.items())
    assert "PACS cannot store SEG (no presentation context accepted); fallback sc" in log
    files = sorted(p for p in received.iterdir() if p.is_file())
    by_class: dict[str, list[Dataset]] = {}
    for path in files:
        by_class.setdefault(str(dcmread(path).SOPClassUID), []).append(dcmread(path))
    assert sorted(by_class) == [SecondaryCaptureImageStorage, COMPREHENSIVE_3D_SR]  # no SEG
    seg = dcmread(next((tmp_path / "data" / "outbox").glob("*/seg.dcm")))
    marked = {
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    overlays = by_class[SecondaryCaptureImageStorage]
    assert {str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in overlays} == marked
    assert len(overlays) == len(marked) == len(status)
    assert all(sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == seg.StudyInstanceUID for sc in overlays)
    assert dciodvfy_errors(next(p for p in files if dcmread(p).SOPClassUID == SecondaryCaptureImageStorage)) == []


@pytest.mark.catalogue("E5")
def test_a_seg_answered_0x0122_falls_back_to_the_sr_alone(
    tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]
) -> None:
    """The peer's profile lists only the SEG, with seg_fallback sr-only: the SR goes instead, no image."""
    need("storescu")
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("peers:\n  PACS:\n    outputs: [seg]\n    seg_fallback: sr-only\n")
    pacs_port, port = free_port(), free_port()
    pacs = ScriptedPacs(port=pacs_port, refuse_sop_classes=[SegmentationStorage])  # answers a SEG 0x0122
    pacsai = stack(peers=f"PACS@127.0.0.1:{pacs_port}", port=port, PACSAI_PROFILES_FILE=str(profiles))
    try:
        run = pacsai.start("run")
        _send_study(port, ct_series)
        job_state, deliveries = _finished_job(tmp_path / "data")
        log = run.log()
    finally:
        pacs.stop()
    assert job_state is JobState.DELIVERED
    assert [(name, state, detail) for name, state, _, detail in deliveries] == [
        ("seg.dcm", "fallback", "0x0122: C-STORE answered 0x0122; fallback sr-only, 1 file(s)"),
        ("sr.dcm", "success", "0x0000"),
    ]
    assert [str(ds.SOPClassUID) for ds in pacs.received] == [COMPREHENSIVE_3D_SR]
    assert "PACS cannot store SEG (C-STORE answered 0x0122); fallback sr-only: sending 1 file(s) instead" in log
    assert not list((tmp_path / "data" / "outbox").glob("*/overlay-*.dcm"))  # no overlay made: none needed
