"""The radiologist's corrections with real processes: a CT through `pacsai run` to a storescp PACS; our SEG, edited
with highdicom, and a rejecting KOS go back with storescu from the PACS's AE; recorded, never inferred on."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from pacsai.feedback_table import FeedbackKind, FeedbackRow
from pacsai.state import State
from tests.feedback_edit import edit_seg, erase_half, frames_by_code, numpy_dice, rejection, voxels
from tests.services import REPO, wait_until
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e]


def _results(pacs: StoreScpPacs, stack: Stack) -> dict[str, Path]:
    """Run the CT through the stack and return the SEG and SR the PACS received, by modality."""
    stack.wait_jobs({"delivered": 1}, timeout_s=180)
    files = [p for p in pacs.inbox.iterdir() if p.is_file()]
    return {dcmread(p, stop_before_pixels=True).Modality: p for p in files}


def _feedback(stack: Stack) -> list[FeedbackRow]:
    state = State(stack.data / "pacsai.db")
    try:
        return state.feedback()
    finally:
        state.close()


def _send_back(stack: Stack, ds: Dataset, path: Path, ae_title: str) -> None:
    """dcmtk storescu from the PACS's AE title (-R: its default contexts lack SEG), as a PACS forwards a viewer's."""
    ds.save_as(path, enforce_file_format=True)
    argv = ["storescu", "-R", "-aet", ae_title, "-aec", "PACSAI", "127.0.0.1", str(stack.port), str(path)]
    done = subprocess.run(argv, timeout=30, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _started(pacs: StoreScpPacs, stack: Callable[..., Stack], ct_series: Path) -> Stack:
    profiles = pacs.inbox.parent / "profiles.yaml"  # SEG + SR only: no SC overlays to make (keeps the test short)
    profiles.write_text(f"peers:\n  {pacs.ae_title}: {{outputs: [seg, sr], seg_fallback: sr-only}}\n")
    pacsai = stack(peers=pacs.peer, PACSAI_QUIET_PERIOD_S="5", PACSAI_PROFILES_FILE=str(profiles))
    pacsai.start("run")
    pacsai.send(sorted(ct_series.iterdir()), pacs.ae_title)
    return pacsai


def _corrected(tmp_path: Path, pacsai: Stack, ours_path: Path, ct_series: Path, ae_title: str) -> None:
    """Half of the largest segment erased by the 'radiologist': each recorded Dice is numpy's."""
    ours = dcmread(ours_path)
    by_code = frames_by_code(ours)
    codes = ["{0.CodingSchemeDesignator}:{0.CodeValue}".format(s.SegmentedPropertyTypeCodeSequence[0])
             for s in ours.SegmentSequence]  # fmt: skip
    edited_code = max(codes, key=lambda code: voxels(by_code[code]))
    number = int(ours.SegmentSequence[codes.index(edited_code)].SegmentNumber)
    _send_back(pacsai, edit_seg(ours_path, ct_series, erase_half, number), tmp_path / "edited.dcm", ae_title)
    (row,) = wait_until(lambda: _feedback(pacsai), 20, "feedback recorded", 0.5)
    assert row.kind is FeedbackKind.CORRECTED and row.model == "ct-organs-tiny"
    theirs = frames_by_code(dcmread(tmp_path / "edited.dcm"))
    recorded = {s.label: s for s in row.segments}
    labels = {code: str(s.SegmentLabel) for code, s in zip(codes, ours.SegmentSequence, strict=True)}
    for code in codes:
        assert recorded[labels[code]].dice == pytest.approx(numpy_dice(by_code[code], theirs.get(code, {})), abs=1e-6)
    assert recorded[labels[edited_code]].dice < 1.0 and recorded[labels[edited_code]].volume_diff_ml < 0
    assert (pacsai.data / row.corrected_file).is_file()


def _pacsai(stack: Stack, *argv: str) -> str:
    env = {**os.environ, **stack.env, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "worker.cli", *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_corrections_and_rejections_are_recorded(
    tmp_path: Path, pacs: StoreScpPacs, stack: Callable[..., Stack], ct_series: Path
) -> None:
    """Our SEG edited and sent back is recorded with numpy's Dice; a KOS 'Rejected for Patient Safety Reasons'
    naming our SR marks the job rejected; neither makes a job; status and export show both."""
    pacsai = _started(pacs, stack, ct_series)
    results = _results(pacs, pacsai)
    _corrected(tmp_path, pacsai, results["SEG"], ct_series, pacs.ae_title)
    _send_back(pacsai, rejection(dcmread(results["SR"]), safety=True), tmp_path / "kos.dcm", pacs.ae_title)
    rows = wait_until(lambda: [r for r in _feedback(pacsai) if r.kind is FeedbackKind.REJECTED], 20, "rejection")
    assert rows[0].detail == "Rejected for Patient Safety Reasons" and rows[0].model_version != "unknown"
    assert pacsai.jobs() == {"delivered": 1}, "a returned SEG or KOS never makes a job"
    status = _pacsai(pacsai, "status")
    assert "feedback    corrected=1  rejected=1  mean Dice ct-organs-tiny" in status
    printed = _pacsai(pacsai, "feedback", "export", str(tmp_path / "export"))
    assert "2 feedback row(s)" in printed and "1 image + label pair(s)" in printed
    assert len(list((tmp_path / "export").glob("*/label.nii.gz"))) == 1
