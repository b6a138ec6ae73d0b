"""Radiologists' feedback without processes: Dice and volumes of two SEGs against numpy, KOS reading, the export."""

from __future__ import annotations

import csv
import time
from io import BytesIO
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import feedback
from dicom_node.agreement import compare
from dicom_node.reconcile import purge_expired
from pacsai.feedback_table import FeedbackKind, FeedbackRow, SegmentAgreement
from pacsai.jobs import JobState, SeriesJob, SeriesState
from pacsai.logs import key_of
from pacsai.series_table import SeriesRow
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool, outbox_for
from tests.feedback_edit import frames_by_code, make_seg, numpy_dice, rejection, voxels
from tests.job_paths import move_job
from worker.feedback_export import CSV_NAME, export

LIVER, SPLEEN, KIDNEY = codes.SCT.Liver, codes.SCT.Spleen, codes.SCT.Kidney


def _description(number: int, label: str, code: Code) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


@pytest.fixture(scope="module")
def sources(ct_series: Path) -> list[Dataset]:
    return [dcmread(p) for p in sorted(ct_series.iterdir())]


def _boxes(sources: list[Dataset], *boxes: tuple[int, int, int, int, int, int]) -> np.ndarray:
    """One mask per box (first slice, last slice, top, bottom, left, right), stacked as segments."""
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    masks = np.zeros((len(sources), rows, columns, len(boxes)), dtype=bool)
    for index, (z0, z1, y0, y1, x0, x1) in enumerate(boxes):
        masks[z0:z1, y0:y1, x0:x1, index] = True
    return masks


def _pair(sources: list[Dataset]) -> tuple[hd.seg.Segmentation, hd.seg.Segmentation]:
    """Ours: liver and spleen. Theirs: liver shrunk, spleen as ours but labelled 'Milz', and a kidney added."""
    ours = make_seg(
        sources,
        _boxes(sources, (2, 14, 100, 300, 100, 300), (5, 10, 200, 260, 350, 420)),
        [_description(1, "liver", LIVER), _description(2, "spleen", SPLEEN)],
    )
    theirs = make_seg(
        sources,
        _boxes(sources, (4, 14, 120, 300, 100, 280), (5, 10, 200, 260, 350, 420), (8, 12, 300, 340, 300, 340)),
        [_description(1, "Leber", LIVER), _description(2, "Milz", SPLEEN), _description(3, "kidney", KIDNEY)],
    )
    return ours, theirs


def test_dice_and_volumes_match_numpy(sources: list[Dataset]) -> None:
    """Segments matched by property type code whatever their labels; one only the radiologist drew has Dice 0."""
    ours, theirs = _pair(sources)
    result = {s.label: s for s in compare(ours, theirs)}
    mine, corrected = frames_by_code(ours), frames_by_code(theirs)
    liver = "SCT:" + LIVER.value
    assert result["liver"].dice == pytest.approx(numpy_dice(mine[liver], corrected[liver]), abs=1e-6)
    assert 0.5 < result["liver"].dice < 1.0
    assert result["spleen"].dice == 1.0 and result["spleen"].volume_diff_ml == 0.0
    assert result["kidney"].dice == 0.0 and result["kidney"].ours_ml == 0.0
    spacing = [float(v) for v in sources[0].PixelSpacing]
    positions = [float(ds.ImagePositionPatient[2]) for ds in sources]
    depth = abs(positions[1] - positions[0])  # 2 mm here, under the slices' 3 mm thickness
    voxel_ml = spacing[0] * spacing[1] * depth / 1000
    assert result["liver"].ours_ml == pytest.approx(voxels(mine[liver]) * voxel_ml, rel=1e-4)
    assert result["liver"].volume_diff_ml == pytest.approx(
        (voxels(corrected[liver]) - voxels(mine[liver])) * voxel_ml, rel=1e-4
    )


def test_kos_rejection_is_read(sources: list[Dataset]) -> None:
    ours, _ = _pair(sources)
    kos = rejection(ours)
    assert feedback.is_returned({"SOPClassUID": str(kos.SOPClassUID), "Modality": "KO"})
    assert feedback.is_returned({"Modality": "SEG"}) and not feedback.is_returned({"Modality": "CT"})
    assert dict(feedback.referenced_instances(kos)) == {str(ours.SOPInstanceUID): str(ours.StudyInstanceUID)}
    title = kos.ConceptNameCodeSequence[0]
    assert feedback.REJECTIONS[(title.CodeValue, title.CodingSchemeDesignator)] == "Rejected for Quality Reasons"


def test_export_writes_nifti_pairs_and_csv(tmp_path: Path, ct_series: Path, sources: list[Dataset]) -> None:
    """The corrected labels on the image's grid (nibabel reads both, same shape and affine); the CSV has no UID."""
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path / "data"), "PACSAI_LOG_KEY": "k"})
    state = State(settings.storage.database)
    spool = Spool(settings.storage.spool_dir, settings.log_key, reserve_bytes=0)
    study, series = str(sources[0].StudyInstanceUID), str(sources[0].SeriesInstanceUID)
    spooled = [spool.put(study, series, str(ds.SOPInstanceUID), p.read_bytes()) for ds, p in
               zip(sources, sorted(ct_series.iterdir()), strict=True)]  # fmt: skip
    manifest = spool.write_manifest(spooled[0].study_key, spooled[0].series_key, "job1", [s.path for s in spooled])
    state.add_job(SeriesJob("job1", spooled[0].study_key, spooled[0].series_key, "ct-organs-tiny", manifest, "PACS"))
    ours, theirs = _pair(sources)
    (settings.storage.data_dir / "feedback").mkdir()
    theirs.save_as(settings.storage.data_dir / "feedback" / "fb1.dcm")
    segments = compare(ours, theirs)
    state.record_feedback(
        FeedbackRow("fb1", "job1", "ct-organs-tiny", "0.1.0", FeedbackKind.CORRECTED, "", segments, "feedback/fb1.dcm")
    )
    state.record_feedback(FeedbackRow("fb2", "job1", "ct-organs-tiny", "0.1.0", FeedbackKind.REJECTED, "r", ()))
    done = export(settings, state, tmp_path / "out")
    assert (done.rows, done.pairs, done.missing) == (2, 1, 0)
    image, label = (nib.nifti1.load(tmp_path / "out" / "fb1" / f"{n}.nii.gz") for n in ("image", "label"))  # type: ignore[no-untyped-call]
    assert image.shape == label.shape == (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    assert np.allclose(image.affine, label.affine)
    data = np.asarray(label.dataobj)
    assert set(np.unique(data)) == {0, 1, 2, 3}
    assert int((data == 1).sum()) == voxels(frames_by_code(theirs)["SCT:" + LIVER.value])
    with open(tmp_path / "out" / CSV_NAME, encoding="utf-8") as handle:
        lines = list(csv.DictReader(handle))
    assert [line["kind"] for line in lines] == ["corrected"] * 3 + ["rejected"]
    assert {line["segment"] for line in lines[:3]} == {"liver", "spleen", "kidney"}
    text = (tmp_path / "out" / CSV_NAME).read_text()
    assert study not in text and series not in text and spooled[0].series_key in text


@pytest.mark.integration
def test_feedback_table_on_sqlite_and_postgresql(database: str) -> None:
    """Recorded, replaced when the same object comes again, summed per model version; jobs found by study."""
    state = State(database)
    job = JobRow("job1", "series", "study", "ct-organs-tiny", "m", "PACS", JobState.PENDING, "", 0)
    state.close_series("series", SeriesState.COMPLETE, "", [job])
    for dice in (0.5, 0.75):  # the same returned SEG twice: one row, the last
        liver = SegmentAgreement("liver", dice, 10.0, 5.0)
        state.record_feedback(
            FeedbackRow("f1", "job1", "ct-organs-tiny", "0.1.0", FeedbackKind.CORRECTED, "", (liver,))
        )
    state.record_feedback(FeedbackRow("f2", "job1", "ct-organs-tiny", "0.2.0", FeedbackKind.REJECTED, "r", ()))
    assert [r.segments for r in state.feedback("job1")][0] == (liver,)
    assert [(a.model_version, a.corrected, a.rejected, a.mean_dice) for a in state.agreement()] == [
        ("0.1.0", 1, 0, 0.75),
        ("0.2.0", 0, 1, None),
    ]
    assert [j.job_id for j in state.jobs_of_study("study")] == ["job1"]
    state.close()


def _node(tmp_path: Path, sources: list[Dataset]) -> tuple[Settings, State, Spool, hd.seg.Segmentation]:
    """A node's data dir with one job of the CT series whose outbox holds our SEG."""
    env = {"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "PACS@127.0.0.1:104", "PACSAI_LOG_KEY": "k"}
    settings = Settings.from_env(env)
    state, spool = State(settings.storage.database), Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    series_key = key_of(b"k", str(sources[0].SeriesInstanceUID))
    study_key = key_of(b"k", str(sources[0].StudyInstanceUID))
    job = JobRow("job1", series_key, study_key, "ct-organs-tiny", "m", "PACS", JobState.PENDING, "", 0)
    state.close_series(series_key, SeriesState.COMPLETE, "", [job])
    algorithm = hd.AlgorithmIdentificationSequence("ct-organs-tiny", codes.cid7162.ArtificialIntelligence, "0.1.0")
    automatic = [
        hd.seg.SegmentDescription(
            n, label, codes.SCT.Organ, code, hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm
        )
        for n, label, code in ((1, "liver", LIVER), (2, "spleen", SPLEEN))
    ]
    ours = make_seg(sources, _boxes(sources, (2, 14, 100, 300, 100, 300), (5, 10, 200, 260, 350, 420)), automatic)
    outbox_for(settings, "job1").mkdir(parents=True)
    ours.save_as(outbox_for(settings, "job1") / "seg.dcm")
    return settings, state, spool, ours


def _returned(spool: Spool, ds: Dataset, calling_ae: str = "PACS") -> tuple[SeriesRow, list[str]]:
    ds.save_as(buffer := BytesIO(), enforce_file_format=True)
    stored = spool.put(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), buffer.getvalue())
    header = {"Modality": str(ds.Modality), "SOPClassUID": str(ds.SOPClassUID)}
    return SeriesRow(stored.series_key, stored.study_key, 0.0, None, calling_ae, "PACSAI", header), [stored.path]


def test_take_links_a_corrected_seg_and_a_rejection_to_the_job(tmp_path: Path, sources: list[Dataset]) -> None:
    settings, state, spool, ours = _node(tmp_path, sources)
    _, theirs = _pair(sources)
    assert (
        feedback.take(settings, state, spool, *_returned(spool, theirs)) == "returned result, corrected SEG of job job1"
    )
    kos = rejection(ours)
    reason = feedback.take(settings, state, spool, *_returned(spool, kos))
    assert reason == "returned result, Rejected for Quality Reasons of job(s) job1"
    corrected, rejected = state.feedback("job1")
    assert corrected.kind is FeedbackKind.CORRECTED and rejected.kind is FeedbackKind.REJECTED
    assert corrected.model_version == rejected.model_version == "0.1.0"
    assert [s.label for s in corrected.segments] == ["liver", "spleen", "kidney"]
    assert (settings.storage.data_dir / corrected.corrected_file).is_file()


def test_take_records_nothing_it_cannot_link(tmp_path: Path, sources: list[Dataset]) -> None:
    """Unknown caller, our own SEG unchanged, a KOS of another title, a KOS naming none of ours: nothing recorded."""
    settings, state, spool, ours = _node(tmp_path, sources)
    _, theirs = _pair(sources)
    assert "unknown caller" in feedback.take(settings, state, spool, *_returned(spool, theirs, calling_ae="EVIL"))
    assert "came back unchanged" in feedback.take(settings, state, spool, *_returned(spool, ours))
    of_interest = rejection(ours)
    of_interest.ConceptNameCodeSequence[0].CodeValue = "113000"  # "Of Interest"
    assert "rejects nothing" in feedback.take(settings, state, spool, *_returned(spool, of_interest))
    assert "none of our results" in feedback.take(settings, state, spool, *_returned(spool, rejection(sources[0])))
    assert state.feedback() == []


def test_retention_drops_kept_seg_files_and_keeps_the_numbers(tmp_path: Path, sources: list[Dataset]) -> None:
    """The returned SEG (with its patient headers) in data_dir/feedback/ goes with its series; Dice stays."""
    settings, state, spool, _ours = _node(tmp_path, sources)
    for ds in sources:  # the source series as the node spooled and recorded it
        ds.save_as(buffer := BytesIO(), enforce_file_format=True)
        uids = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        stored = spool.put(*uids, buffer.getvalue())
        state.record_instance(stored, calling_ae="PACS", called_ae="PACSAI", header={})  # fmt: skip
    state.close_series(stored.series_key, SeriesState.COMPLETE, "", [])
    _, theirs = _pair(sources)
    feedback.take(settings, state, spool, *_returned(spool, theirs))
    [before] = state.feedback("job1")
    kept = settings.storage.data_dir / before.corrected_file
    assert kept.is_file() and kept.parent == settings.storage.data_dir / feedback.FEEDBACK_DIR
    move_job(state, "job1", JobState.DELIVERED)
    assert purge_expired(state, spool, settings, time.time()) == 0  # within retention: kept
    assert kept.is_file()
    assert purge_expired(state, spool, settings, time.time() + settings.storage.retention_s + 60) == 1
    assert not kept.exists() and list((settings.storage.data_dir / feedback.FEEDBACK_DIR).iterdir()) == []
    [after] = state.feedback("job1")
    assert after.corrected_file == "" and after.segments == before.segments and after.mean_dice == before.mean_dice
    assert [(a.corrected, a.mean_dice) for a in state.agreement()] == [(1, before.mean_dice)]
