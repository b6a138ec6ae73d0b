"""Completeness timing: quiet period, release + grace, and a series still open on another association."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.assemble import Assembler, declared_instances, is_complete
from dicom_node.route import load_rules
from pacsai.jobs import JobState, SeriesJob, SeriesState
from pacsai.settings import Settings
from pacsai.state import SeriesRow, State
from pacsai.storage import Spool


def row(last: float, released: float | None) -> SeriesRow:
    return SeriesRow("s", "t", last, released, "ORTHANC", "PACSAI", {})


def test_quiet_period() -> None:
    assert not is_complete(row(100.0, None), 109.9, quiet_s=10, grace_s=2, open_elsewhere=False)
    assert is_complete(row(100.0, None), 110.0, quiet_s=10, grace_s=2, open_elsewhere=False)
    assert is_complete(row(100.0, None), 110.0, quiet_s=10, grace_s=2, open_elsewhere=True)


def test_release_plus_grace() -> None:
    assert not is_complete(row(100.0, 100.5), 102.0, quiet_s=10, grace_s=2, open_elsewhere=False)
    assert is_complete(row(100.0, 100.5), 102.5, quiet_s=10, grace_s=2, open_elsewhere=False)
    assert not is_complete(row(100.0, 100.5), 102.5, quiet_s=10, grace_s=2, open_elsewhere=True)
    assert not is_complete(row(101.0, 100.5), 103.0, quiet_s=10, grace_s=2, open_elsewhere=False)


def _record(state: State, spool: Spool, sop: str, series: str, calling: str, header: dict[str, str]) -> None:
    stored = spool.put("1.2.3", series, sop, b"DICM")
    state.record_instance(
        stored,
        calling_ae=calling,
        called_ae="PACSAI",
        header=header,
    )


@pytest.mark.catalogue("C13", "C14")
def test_study_over_several_associations_becomes_one_job_per_series(tmp_path: Path, database: str) -> None:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "ORTHANC@127.0.0.1:4242"})
    state, spool = State(database), Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    queued: list[SeriesJob] = []
    assembler = Assembler(settings, state, spool, load_rules(settings.node.routes_file), queued.append, lambda: set())
    ct = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "SeriesDescription": "abdomen"}
    for index in range(12):  # first association: 12 slices; second: 8 more of the same series
        _record(state, spool, f"1.2.3.4.{index}", "1.2.3.4", "ORTHANC", ct)
    _record(state, spool, "1.2.3.9.1", "1.2.3.9", "ORTHANC", {"Modality": "OT", "SOPClassUID": "1.2"})
    for index in range(12, 20):
        _record(state, spool, f"1.2.3.4.{index}", "1.2.3.4", "ORTHANC", ct)
    assembler.tick(now=0.0)
    assert queued == []
    import time

    assembler.tick(now=time.time() + 11)
    assert [job.model for job in queued] == ["ct-organs-tiny"]
    assert len(spool.read_manifest(queued[0].manifest)) == 20
    assert queued[0].destination == "ORTHANC"
    assert state.counts()["series"] == {SeriesState.COMPLETE.value: 1, SeriesState.NO_MODEL.value: 1}
    assert [job.state for job in state.jobs_in(JobState.QUEUED)] == [JobState.QUEUED]
    # the no-model series was cleaned from the spool
    assert len([p for p in settings.storage.spool_dir.rglob("*.dcm")]) == 20
    # the same 20 instances sent again: same job id, no second job
    for index in range(20):
        _record(state, spool, f"1.2.3.4.{index}", "1.2.3.4", "ORTHANC", ct)
    assembler.tick(now=time.time() + 11)
    assert len(queued) == 1


def test_declared_instances() -> None:
    assert declared_instances({"ImagesInAcquisition": "300"}) == 300
    assert declared_instances({"ImagesInAcquisition": "30", "NumberOfTemporalPositions": "4"}) == 120
    assert declared_instances({"ImagesInAcquisition": "120", "NumberOfTemporalPositions": "4"}) == 120
    assert declared_instances({"NumberOfFrames": "200", "ImagesInAcquisition": "1"}) == 1
    assert declared_instances({"NumberOfFrames": "1", "ImagesInAcquisition": "40"}) == 40
    for header in ({}, {"ImagesInAcquisition": ""}, {"ImagesInAcquisition": "0"}, {"ImagesInAcquisition": "x"}):
        assert declared_instances(header) is None


def test_whole_and_released_completes_without_the_grace() -> None:
    assert is_complete(row(100.0, 100.5), 100.6, quiet_s=10, grace_s=2, open_elsewhere=False, whole=True)
    assert not is_complete(row(100.0, 100.5), 100.6, quiet_s=10, grace_s=2, open_elsewhere=True, whole=True)
    assert not is_complete(row(100.0, None), 100.6, quiet_s=10, grace_s=2, open_elsewhere=False, whole=True)
    assert not is_complete(row(101.0, 100.5), 101.1, quiet_s=10, grace_s=2, open_elsewhere=False, whole=True)


@pytest.mark.parametrize("sent", [12, 11])
def test_released_series_with_its_declared_count_completes_at_once(tmp_path: Path, database: str, sent: int) -> None:
    """12 of 12 declared: complete on the first tick after the release; 11 of 12: waits out the grace."""
    import time

    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "ORTHANC@127.0.0.1:4242"})
    state, spool = State(database), Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    queued: list[SeriesJob] = []
    assembler = Assembler(settings, state, spool, load_rules(settings.node.routes_file), queued.append, lambda: set())
    ct = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "ImagesInAcquisition": "12"}
    for index in range(sent):
        _record(state, spool, f"1.2.3.4.{index}", "1.2.3.4", "ORTHANC", ct)
    (series,) = state.receiving_series()
    state.mark_released([series.series_key])
    assembler.tick(now=time.time())
    assert len(queued) == (1 if sent == 12 else 0)
    assembler.tick(now=time.time() + settings.node.release_grace_s)
    assert len(queued) == 1
