"""Superseding results (issue #5 item 2): a later instance set of a series makes a new revision whose results name
the ones they replace, on a real State (SQLite and PostgreSQL), spool, assembler, model and pipeline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import UID, Comprehensive3DSRStorage

from dicom_node.assemble import Assembler
from dicom_node.route import load_rules
from pacsai.jobs import JobState, SeriesJob, SeriesState
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool
from tests.checks import dciodvfy_errors, to_bytes
from tests.conftest import need
from tests.job_paths import move_job
from worker import pipeline
from worker.uids import output_uids

ROOT = "2.25.31415926535897932384626433832795"
STUDY, SERIES = f"{ROOT}.1", f"{ROOT}.2"
CT_HEADER = {"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "SeriesDescription": "abdomen"}
LATE = 2  # the two top slices arrive after the series was complete


def slices_by_position(ct_series: Path) -> list[Path]:
    """The CT's files ordered along z, so that the late ones extend the volume without a gap."""
    files = [p for p in ct_series.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md")]
    return sorted(files, key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def receive(state: State, spool: Spool, files: list[tuple[int, Path]]) -> None:
    """What the node does for each C-STORE: spool the instance (fresh UIDs under ROOT) and record it."""
    for index, path in files:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{ROOT}.3.{index + 1}")
        stored = spool.put(STUDY, SERIES, ds.SOPInstanceUID, to_bytes(ds))
        state.record_instance(
            stored,
            calling_ae="ORTHANC",
            called_ae="PACSAI",
            header=CT_HEADER,
        )


def complete(assembler: Assembler) -> None:
    """One assembler tick after the quiet period: complete series are closed, ready jobs queued."""
    assembler.tick(now=time.time() + 11)


def run_encoded(job: SeriesJob, settings: Settings, state: State, spool: Spool) -> dict[str, Dataset]:
    """The worker's part: run the job and record it encoded; its outbox files by name."""
    results = pipeline.run(job, settings, spool)
    move_job(state, job.job_id, JobState.ENCODED)
    return {path.name: dcmread(path) for path in results.files}


def row_of(state: State, job_id: str) -> JobRow:
    row = state.job(job_id)
    assert row is not None
    return row


def test_a_late_instance_makes_a_second_revision_that_supersedes_the_first(
    tmp_path: Path, database: str, ct_series: Path
) -> None:
    """18 slices are complete, processed and delivered; 2 more slices of the same series arrive later.

    The second job waits until the first has ended, runs on all 20 slices and its results are new instances
    (nothing delivered is overwritten): the SR names the first SR in its Predecessor Documents Sequence, the SEG's
    descriptions say v2 and that it replaces the earlier result, and the jobs rows record revision, supersedes and
    superseded_by. The same 20 instances sent again make no third job.
    """
    need("dciodvfy")
    settings = Settings.from_env(
        {"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "ORTHANC@127.0.0.1:4242", "PACSAI_DEVICE": "cpu"}
    )
    state, spool = State(database), Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    queued: list[SeriesJob] = []
    assembler = Assembler(settings, state, spool, load_rules(settings.node.routes_file), queued.append, lambda: set())
    files = list(enumerate(slices_by_position(ct_series)))
    receive(state, spool, files[:-LATE])
    complete(assembler)
    [first] = queued
    assert (first.revision, first.supersedes) == (1, "")
    first_outbox = run_encoded(first, settings, state, spool)  # its delivery is still under way when more arrives

    receive(state, spool, files[-LATE:])
    complete(assembler)
    [waiting] = state.jobs_in(JobState.PENDING)
    assert waiting.revision == 2 and len(queued) == 1, "the second job waits for the first to be delivered"
    move_job(state, first.job_id, JobState.DELIVERED)
    complete(assembler)
    second = queued[-1]
    assert (second.job_id, second.revision, second.supersedes) == (waiting.job_id, 2, first.job_id)
    assert SeriesJob.from_message(second.to_message()) == second
    second_outbox = run_encoded(second, settings, state, spool)
    assert row_of(state, first.job_id).superseded_by == "", "superseded once the new results are delivered"
    move_job(state, second.job_id, JobState.DELIVERED)

    first_sr, second_sr, second_seg = first_outbox["sr.dcm"], second_outbox["sr.dcm"], second_outbox["seg.dcm"]
    assert "PredecessorDocumentsSequence" not in first_sr
    [study] = second_sr.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [instance] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (STUDY, first_sr.SeriesInstanceUID)
    assert instance.ReferencedSOPClassUID == Comprehensive3DSRStorage
    assert instance.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    new_uids = output_uids(SERIES, "ct-organs-tiny", "0.1.0", revision=2)
    assert (second_sr.SeriesInstanceUID, second_sr.SOPInstanceUID) == (new_uids["sr_series"], new_uids["sr_instance"])
    assert {ds.SOPInstanceUID for ds in first_outbox.values()}.isdisjoint(
        ds.SOPInstanceUID for ds in second_outbox.values()
    ), "a superseding result never overwrites the earlier one"
    assert first_outbox["seg.dcm"].SeriesDescription == "AI ct-organs-tiny 0.1.0 SEG - not for diagnosis"
    assert second_seg.SeriesDescription == "AI ct-organs-tiny 0.1.0 SEG v2 - not for diagnosis"
    assert second_seg.ContentDescription == "AI ct-organs-tiny 0.1.0 v2 replaces earlier - not for diagnosis"
    assert second_sr.SeriesDescription == "AI ct-organs-tiny 0.1.0 SR v2 - not for diagnosis"
    referenced = {
        str(item.ReferencedSOPInstanceUID) for item in second_seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert len(referenced) == len(files), "the second revision is made from every slice, the late ones too"
    assert dciodvfy_errors(tmp_path / "outbox" / second.job_id / "sr.dcm") == []

    rows = {job_id: row_of(state, job_id) for job_id in (first.job_id, second.job_id)}
    assert (rows[first.job_id].revision, rows[first.job_id].supersedes, rows[first.job_id].superseded_by) == (
        1,
        "",
        second.job_id,
    )
    assert (rows[second.job_id].revision, rows[second.job_id].supersedes, rows[second.job_id].superseded_by) == (
        2,
        first.job_id,
        "",
    )
    assert all(row.state is JobState.DELIVERED for row in rows.values())

    receive(state, spool, files)  # the whole series sent again, unchanged
    complete(assembler)
    assert len(queued) == 2 and len(state.jobs_for_series(second.series_key)) == 2, "no job for a re-sent series"


def add_job(state: State, job_id: str, *, series_key: str = "series", destination: str = "PACS") -> JobRow:
    """Close the series with one more job of model m (as the assembler does after more instances)."""
    row = JobRow(job_id, series_key, "study", "m", f"manifest-{job_id}", destination, JobState.PENDING, "", 0)
    assert state.close_series(series_key, SeriesState.COMPLETE, "", [row]) == [job_id]
    return row_of(state, job_id)


def test_revisions_count_per_series_and_model_and_supersede_only_delivered_results(database: str) -> None:
    """A failed first job leaves nothing to supersede; a result for another destination is not replaced; a job
    waits while any earlier one of its series and model has not ended."""
    state = State(database)
    assert add_job(state, "a").revision == 1
    assert add_job(state, "other", series_key="another series").revision == 1
    move_job(state, "a", JobState.FAILED, "model error")
    b = add_job(state, "b")
    assert b.revision == 2 and state.supersedes_for(b) == ""
    c = add_job(state, "c", destination="VIEWER")
    assert state.supersedes_for(c) is None  # b has not ended
    move_job(state, "b", JobState.DELIVERED)
    assert state.supersedes_for(c) == ""  # b went to PACS, c goes to VIEWER
    d = add_job(state, "d")
    move_job(state, "c", JobState.DEAD, "retries exhausted")
    assert d.revision == 4 and state.supersedes_for(d) == "b"
    move_job(state, "d", JobState.RUNNING)
    assert row_of(state, "b").superseded_by == ""  # only once d's results are delivered
    move_job(state, "d", JobState.DELIVERED)
    assert [row_of(state, job).superseded_by for job in "abcd"] == ["", "d", "", ""]
    assert row_of(state, "d").to_job().supersedes == "b"  # a retry sends the same message


def test_an_older_message_is_a_first_revision() -> None:
    """Messages queued by the release before revisions decode as revision 1, superseding nothing."""
    old = {"job_id": "j", "study_key": "s", "series_key": "r", "model": "m", "manifest": "x", "destination": "PACS"}
    job = SeriesJob.from_message(old)
    assert (job.revision, job.supersedes) == (1, "")
    assert job.to_message() == {**old, "revision": "1", "supersedes": ""}


def test_revision_one_keeps_the_uids_results_always_had() -> None:
    """A first job's results keep their UIDs, so a redelivered job replaces its own results as before."""
    first = output_uids("1.2.3.4", "ct-organs-tiny", "0.1.0")
    assert output_uids("1.2.3.4", "ct-organs-tiny", "0.1.0", revision=1) == first
    second = output_uids("1.2.3.4", "ct-organs-tiny", "0.1.0", revision=2)
    assert second == output_uids("1.2.3.4", "ct-organs-tiny", "0.1.0", revision=2)
    assert set(first.values()).isdisjoint(second.values())
    with pytest.raises(ValueError, match="revision 0"):
        output_uids("1.2.3.4", "ct-organs-tiny", "0.1.0", revision=0)
