"""The SR built beside the SEG (issue 11 goal 2): from the SEG's reference alone it is the SR the SEG itself gives,
and the job's results do not depend on the child process that builds it (worker/forked.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.spec import Code, Label
from tests.checks import segmentation_spec
from worker import encode_seg, forked, pipeline
from worker.encode_sr import encode_sr, measure_labels
from worker.result_bytes import Written, to_bytes
from worker.uids import output_uids
from worker.volume import Volume

ANATOMY = Code("123037004", "Anatomical Structure")
LIVER = Label(1, "liver", ANATOMY, Code("10200004", "Liver"), (221, 130, 101))
SPLEEN = Label(2, "spleen", ANATOMY, Code("78961009", "Spleen"), (157, 108, 162))
KIDNEY = Label(3, "kidney", ANATOMY, Code("64033007", "Kidney"), (185, 102, 83))
SPEC = segmentation_spec(LIVER, SPLEEN, KIDNEY)
TIMES = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")
needs_fork = pytest.mark.skipif(not forked.available(), reason="needs Linux and a second core")


def _labels(volume: Volume) -> NDArray[np.uint8]:
    """Labels 1 and 3, not 2: segment numbers (1, 2) differ from label numbers (1, 3)."""
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    slices, rows, columns = volume.array.shape
    labels[1 : slices - 1, rows // 4 : rows // 2, columns // 4 : columns // 2] = 1
    labels[: slices // 2, 2:6, 2:6] = 3
    return labels


def _same_time(sr: Dataset, like: Dataset) -> bytes:
    for keyword in TIMES:  # highdicom stamps each document with the time it was built
        setattr(sr, keyword, like.get(keyword))
    equipment = (dataset.get("ContributingEquipmentSequence", []) for dataset in (sr, like))
    for item, like_item in zip(*equipment, strict=True):
        item.ContributionDateTime = like_item.ContributionDateTime  # highdicom's own entry: when it was built
    return to_bytes(sr)


def test_the_sr_from_the_segs_reference_is_the_sr_from_the_seg(ct: Volume) -> None:
    label_map = _labels(ct)
    uids = output_uids(str(ct.datasets[0].SeriesInstanceUID), SPEC.name, SPEC.version)
    stats = measure_labels(ct, label_map, SPEC)
    labels = [measured.label for measured in stats]
    assert labels == [LIVER, KIDNEY]
    seg = encode_seg.encode_seg(ct, label_map, SPEC, uids, software_version="0.1.0", labels=labels)
    reference = encode_seg.seg_reference(ct, labels, uids)
    from_seg = encode_sr(seg, ct, label_map, SPEC, uids, software_version="0.1.0", stats=stats)
    from_reference = encode_sr(reference, ct, label_map, SPEC, uids, software_version="0.1.0", stats=stats)
    assert _same_time(from_reference, from_seg) == to_bytes(from_seg)
    assert [(int(item.SegmentNumber), str(item.TrackingUID)) for item in seg.SegmentSequence] == [
        (int(item.SegmentNumber), str(item.TrackingUID)) for item in reference.SegmentSequence
    ]


@needs_fork
@pytest.mark.parametrize("child_fails", [False, True], ids=["built in the child", "child failed, built here"])
def test_the_jobs_sr_is_the_same_whether_the_child_builds_it_or_not(
    ct: Volume, child_fails: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    label_map = _labels(ct)
    model = SimpleNamespace(spec=SPEC)
    monkeypatch.setattr(forked, "available", lambda: False)
    seg, serial = pipeline._encode_segmentation(model, ct, label_map, None, pipeline.Options())  # type: ignore[arg-type]
    monkeypatch.setattr(forked, "available", lambda: True)
    if child_fails:  # a reference without segments: the SR cannot be built from it, only from the SEG
        made = encode_seg.seg_reference

        def without_segments(*args: object) -> Dataset:
            reference = made(*args)  # type: ignore[arg-type]
            reference.SegmentSequence = []
            return reference

        monkeypatch.setattr(encode_seg, "seg_reference", without_segments)
    with caplog.at_level(logging.WARNING, logger="worker.forked"):
        seg_too, parallel = pipeline._encode_segmentation(model, ct, label_map, None, pipeline.Options())  # type: ignore[arg-type]
    assert isinstance(parallel, Written) is not child_fails
    assert ("did not complete" in caplog.text) is child_fails
    if child_fails:  # built here twice
        assert _same_time(parallel, serial) == to_bytes(serial)
    else:  # the child's bytes, as they will be written
        assert _same_time(serial, parallel) == parallel.written
    organisation = seg.DimensionOrganizationSequence[0].DimensionOrganizationUID  # highdicom draws one per SEG
    for item in (*seg_too.DimensionOrganizationSequence, *seg_too.DimensionIndexSequence):
        item.DimensionOrganizationUID = organisation
    assert _same_time(seg_too, seg) == to_bytes(seg)


@needs_fork
def test_a_childs_bytes_come_back_whole() -> None:
    payload = os.urandom(3 << 20)  # several pipe buffers' worth
    assert forked.Child(lambda: payload, "test").result() == payload


@needs_fork
def test_a_child_that_fails_or_stops_short_gives_nothing_and_logs_no_value(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    def raises() -> bytes:
        raise ValueError("Doe^Jane 19700101")  # as a pydicom error may quote a value

    def exits_without_a_word() -> bytes:
        os._exit(0)

    to_file = logging.FileHandler(tmp_path / "worker.log")  # the child logs through the handlers it inherits
    logging.getLogger("worker.forked").addHandler(to_file)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.forked"):
            assert forked.Child(raises, "raising").result() is None
            assert forked.Child(exits_without_a_word, "silent").result() is None
    finally:
        logging.getLogger("worker.forked").removeHandler(to_file)
        to_file.close()
    assert "raising in a child process did not complete (status 1)" in caplog.text
    assert "silent in a child process did not complete (status 0)" in caplog.text
    logged = (tmp_path / "worker.log").read_text()
    assert "raising in a child process failed (ValueError)" in logged
    assert "Doe^Jane" not in logged and "19700101" not in logged


@needs_fork
def test_a_child_past_its_deadline_or_no_longer_wanted_is_stopped_and_reaped() -> None:
    def sleeps() -> bytes:
        time.sleep(60)
        return b"late"

    started = time.monotonic()
    late = forked.Child(sleeps, "slow")
    pid = late._pid
    assert late.result(wait_s=0.5) is None
    assert time.monotonic() - started < 10
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped: not even a zombie
    unwanted = forked.Child(sleeps, "unwanted")
    pid = unwanted._pid
    unwanted.cancel()
    assert not Path(f"/proc/{pid}").exists()


def test_without_a_second_core_nothing_is_forked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forked, "available", lambda: False)
    child = forked.Child(lambda: b"never", "nothing")
    assert child._pid == 0 and child.result() is None
    child.cancel()  # nothing to stop


@needs_fork
@pytest.mark.catalogue("W1", "W4")
def test_the_child_dies_with_a_worker_killed_hard(tmp_path: Path) -> None:
    """kill -9 of the worker process (the OOM killer, Celery's hard time limit) takes its encoding child with it."""
    script = (
        "import sys, time\n"
        "from worker import forked\n"
        "child = forked.Child(lambda: time.sleep(300) or b'', 'orphan')\n"
        "print(child._pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    try:
        assert worker.stdout is not None
        pid = int(worker.stdout.readline())
        assert _state(pid) not in ("", "Z")  # working
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 10
    while _state(pid) not in ("", "Z") and time.monotonic() < deadline:  # gone, or dead and not yet reaped by init
        time.sleep(0.05)
    assert _state(pid) in ("", "Z")


def _state(pid: int) -> str:
    """The process' state letter from /proc ('' when there is no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
