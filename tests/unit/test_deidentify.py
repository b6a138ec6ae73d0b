"""A10: the PS3.15 E.1 basic profile on real files, the node's de-identified copies, and re-identified results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import UID

from dicom_node import deidentify
from dicom_node.assemble import Assembler
from dicom_node.deidentify import IdentityMap, Pseudonyms
from dicom_node.route import load_rules
from pacsai.jobs import JobState, SeriesJob
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import DEID_DIR, Spool
from tests.checks import make_canary_series, read_strict, to_bytes

pytestmark = pytest.mark.catalogue("A10")
SECRET = b"s" * 32
CANARY_ROOT = "1.2.826.0.1.3680043.10.1051.777"  # tests.checks.make_canary_series
# identifying attributes of Table E.1-1 that these files carry, by keyword
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "OtherPatientIDs",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ContentDate",
    "ContentTime",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureID",
    "ImageComments",
    "InstanceCreationDate",
    "RequestingPhysician",
    "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate",
    "AdditionalPatientHistory",
)
GEOMETRY = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "Rows",
    "Columns",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "PhotometricInterpretation",
    "BitsStored",
)
FILES = [
    "pydicom/test_files/CT_small.dcm",
    "pydicom/test_files/MR_small.dcm",
    "pydicom/test_files/examples_overlay.dcm",
    "nema-wg04/J2KR/CT2_J2KR.dcm",
    "dcm_qa_nih/GE_mr_0004/axial_epi_fmri_interleaved_i_to_s-00001.dcm",
    "dcm_qa_enh/Siemens/XA10/6_1.dcm",
    "dcm_qa_enh/Philips/IM_0027_fMAP.dcm",
    "pydicom-data/RG1_UNCR.dcm",
]


def walk(ds: Dataset) -> Iterator[DataElement]:
    """Every element at every depth."""
    for element in ds:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from walk(item)


def instance_uids(ds: Dataset) -> set[str]:
    """UIDs that name this instance's study, series, instance, frame of reference or what it references."""
    found = set()
    for element in walk(ds):
        if element.VR == "UI" and element.value and not deidentify._names_a_class(element.tag):
            values = [element.value] if isinstance(element.value, str) else element.value
            found |= {str(v) for v in values if not str(v).startswith("1.2.840.10008.")}
    return found


@pytest.mark.parametrize("name", FILES)
def test_basic_profile_on_real_files(name: str, shared: Path) -> None:
    source = dcmread(shared / "dicom" / name)
    original = dcmread(shared / "dicom" / name)
    pseudonyms = Pseudonyms(SECRET)
    data = to_bytes(deidentify.deidentify(source, pseudonyms))
    copy = read_strict(data)
    for keyword in IDENTIFYING:  # gone, or present without a value (Z: Type 2 attributes stay, empty)
        assert not copy.get(keyword), keyword
    for keyword in ("PatientName", "PatientID"):
        value = str(original.get(keyword, ""))
        assert len(value) < 4 or value.encode() not in data, f"{keyword} still somewhere in the copy"
    elements = list(walk(copy))
    assert not [e.tag for e in elements if e.tag.is_private], "private attributes must go"
    assert not [e.tag for e in elements if e.tag.group >> 8 in (0x50, 0x60)], "curves and overlays must go"
    for element in elements:
        action = deidentify.ACTIONS.get(int(element.tag))
        assert action != "X", f"{element.keyword} is X in Table E.1-1"
        if action in ("Z", "X/Z") or element.VR == "PN":
            assert not element.value, f"{element.keyword} must be empty"
    old, new = instance_uids(original), instance_uids(copy)
    assert old and not old & new, "every instance UID is replaced"
    assert all(uid.encode() not in data for uid in old)
    assert {pseudonyms.originals[uid] for uid in new} <= old
    for keyword in GEOMETRY:
        assert copy.get(keyword) == original.get(keyword), keyword
    assert copy.PixelData == original.PixelData
    assert copy.SOPClassUID == original.SOPClassUID and copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
    assert copy.PatientIdentityRemoved == "YES" and copy.LongitudinalTemporalInformationModified == "REMOVED"
    (code,) = copy.DeidentificationMethodCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert copy.DeidentificationMethod.startswith("PS3.15 E.1 Basic Profile")


def test_enhanced_multiframe_keeps_per_frame_geometry(shared: Path) -> None:
    path = shared / "dicom" / "dcm_qa_enh/Siemens/XA10/6_1.dcm"
    original, copy = dcmread(path), deidentify.deidentify(dcmread(path), Pseudonyms(SECRET))
    frames = zip(original.PerFrameFunctionalGroupsSequence, copy.PerFrameFunctionalGroupsSequence, strict=True)
    for before, after in frames:
        for group, keyword in (
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"),
            ("PixelMeasuresSequence", "SliceThickness"),
        ):
            assert after[group][0][keyword].value == before[group][0][keyword].value


def test_same_uid_same_pseudonym_within_a_job_only(ct_series: Path) -> None:
    first, second = (dcmread(p) for p in sorted(ct_series.iterdir())[:2])
    job = Pseudonyms(SECRET)
    a, b = (deidentify.deidentify(ds, job) for ds in (dcmread(p) for p in sorted(ct_series.iterdir())[:2]))
    assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.FrameOfReferenceUID) == (
        b.StudyInstanceUID,
        b.SeriesInstanceUID,
        b.FrameOfReferenceUID,
    )
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert job.originals[a.StudyInstanceUID] == first.StudyInstanceUID
    assert job.originals[b.SOPInstanceUID] == second.SOPInstanceUID
    again = deidentify.deidentify(dcmread(sorted(ct_series.iterdir())[0]), Pseudonyms(SECRET))
    assert again.SOPInstanceUID == a.SOPInstanceUID, "the same job's secret gives the same copy after a crash"
    other = deidentify.deidentify(dcmread(sorted(ct_series.iterdir())[0]), Pseudonyms(b"o" * 32))
    assert other.StudyInstanceUID != a.StudyInstanceUID, "another job cannot be linked to this one"
    assert a.SOPInstanceUID.startswith("2.25.") and len(a.SOPInstanceUID) <= 64


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("cornerstone3D-testImages/US-YBR_FULL_422-EVRLE.dcm", "modality US"),
        ("pydicom/charset_files/chrGerm.dcm", "modality OT"),
        ("pydicom/test_files/SC_rgb_small_odd.dcm", "modality OT"),
    ],
)
def test_burned_in_modalities_are_flagged(name: str, reason: str, shared: Path) -> None:
    assert reason in deidentify.refusal_reason(dcmread(shared / "dicom" / name, stop_before_pixels=True))


def test_declared_burned_in_annotation_is_flagged(ct_series: Path) -> None:
    ds = dcmread(sorted(ct_series.iterdir())[0], stop_before_pixels=True)
    assert deidentify.refusal_reason(ds) == ""
    ds.BurnedInAnnotation = "YES"
    assert "BurnedInAnnotation is YES" in deidentify.refusal_reason(ds)
    ds.BurnedInAnnotation, ds.RecognizableVisualFeatures = "NO", "YES"
    assert "RecognizableVisualFeatures" in deidentify.refusal_reason(ds)


def _routes(tmp_path: Path) -> Path:
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "rules:\n  - {name: ct, model: ct-organs-tiny, match: {modality: [CT]}}\n"
        "  - {name: us, model: ct-organs-tiny, match: {modality: [US]}}\n"
    )
    return routes


def _spool_series(state: State, spool: Spool, folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        ds = dcmread(path, stop_before_pixels=True)
        stored = spool.put(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes())
        state.record_instance(
            stored,
            calling_ae="ORTHANC",
            called_ae="PACSAI",
            header={"Modality": str(ds.Modality), "SOPClassUID": str(ds.SOPClassUID)},
        )


def test_node_makes_the_copy_keeps_the_map_and_refuses_burned_in(tmp_path: Path, ct_series: Path, shared: Path) -> None:
    """The job of a de-identified model points at a clean copy under spool/deid; its identity map lies next to the
    originals; an ultrasound series is refused (job failed with the reason) and nothing of it is copied."""
    canaries = make_canary_series(ct_series, tmp_path / "canary")
    us = tmp_path / "us"
    us.mkdir()
    (us / "1.dcm").write_bytes((shared / "dicom/cornerstone3D-testImages/US-YBR_FULL_422-EVRLE.dcm").read_bytes())
    settings = Settings.from_env(
        {
            "PACSAI_DATA_DIR": str(tmp_path / "data"),
            "PACSAI_PEERS": "ORTHANC@127.0.0.1:4242",
            "PACSAI_DEIDENTIFY_FOR": "ct-organs-tiny",
            "PACSAI_ROUTES_FILE": str(_routes(tmp_path)),
        }
    )
    state, spool = State(settings.storage.database), Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    queued: list[SeriesJob] = []
    assembler = Assembler(settings, state, spool, load_rules(settings.node.routes_file), queued.append, lambda: set())
    _spool_series(state, spool, tmp_path / "canary")
    _spool_series(state, spool, us)
    assembler.tick(now=time.time() + 11)
    (job,) = queued
    assert job.manifest == f"{DEID_DIR}/{job.job_id}/manifest-{job.job_id}.json"
    copies = spool.read_manifest(job.manifest)
    assert len(copies) == 20
    for path in copies:
        data = path.read_bytes()
        assert [canary for canary in canaries if canary.encode() in data] == []
        assert dcmread(path, stop_before_pixels=True).PatientIdentityRemoved == "YES"
    identity_file = deidentify.identity_path(spool, job.study_key, job.series_key, job.job_id)
    assert DEID_DIR not in identity_file.relative_to(spool.root).parts
    identity = IdentityMap.read(identity_file)
    assert identity.study_uid == f"{CANARY_ROOT}.1"
    assert {f"{CANARY_ROOT}.1", f"{CANARY_ROOT}.2", f"{CANARY_ROOT}.3.20"} <= set(identity.uids.values())
    assert not any(canary in str(job.to_message()) for canary in canaries)
    (refused,) = state.jobs_in(JobState.FAILED)
    assert refused.reason == "not sent to de-identified model ct-organs-tiny: modality US often carries burned-in text"
    assert not (spool.root / DEID_DIR / refused.series_key).exists()
    assert "110106" in settings.audit_path.read_text() and "de-identified copy" in settings.audit_path.read_text()
    spool.remove_series(
        job.study_key, job.series_key, manifests=[job.manifest]
    )  # retention: the copy and the map go with the series
    assert not copies[0].exists() and not identity_file.exists()


def _deidentified_job(tmp_path: Path, ct_series: Path) -> tuple[Spool, JobRow, list[Path]]:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path / "data")})
    spool = Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    stored = []
    for path in sorted(ct_series.iterdir())[:3]:
        ds = dcmread(path, stop_before_pixels=True)
        stored.append(spool.put(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes()))
    study_key, series_key = stored[0].study_key, stored[0].series_key
    manifest = deidentify.write_copy(
        settings, spool, study_key, series_key, "job1", "ct-organs-tiny", [s.path for s in stored]
    )
    job = JobRow("job1", series_key, study_key, "ct-organs-tiny", manifest, "PACS", JobState.ENCODED, "", 1)
    return spool, job, spool.read_manifest(manifest)


def test_results_get_the_original_identity_back(tmp_path: Path, ct_series: Path) -> None:
    """A 'result' made from the copy (here a copy of one de-identified instance that references another) comes back
    with the original study, references and patient; its own SOP instance UID stays as produced."""
    spool, job, copies = _deidentified_job(tmp_path, ct_series)
    originals = [dcmread(p) for p in sorted(ct_series.iterdir())[:3]]
    result = dcmread(copies[0])
    result.SOPInstanceUID = result.file_meta.MediaStorageSOPInstanceUID = UID("2.25.1234")
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = (
        result.SOPClassUID,
        dcmread(copies[1]).SOPInstanceUID,
    )
    result.SourceImageSequence = [reference]
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    result.save_as(outbox / "seg.dcm", enforce_file_format=True)
    (sent,) = deidentify.restore_identity(spool, job, [outbox / "seg.dcm"])
    assert sent.name == "seg.dcm" and DEID_DIR not in sent.relative_to(spool.root).parts
    back = dcmread(sent)
    assert back.StudyInstanceUID == originals[0].StudyInstanceUID
    assert back.SeriesInstanceUID == originals[0].SeriesInstanceUID  # here the 'result' reuses the series
    assert back.FrameOfReferenceUID == originals[0].FrameOfReferenceUID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == originals[1].SOPInstanceUID
    assert back.SOPInstanceUID == "2.25.1234"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "PatientWeight"):
        assert back.get(keyword) == originals[0].get(keyword), keyword
    assert "PatientIdentityRemoved" not in back and "DeidentificationMethodCodeSequence" not in back
    assert dcmread(outbox / "seg.dcm").PatientIdentityRemoved == "YES", "the outbox file itself is left as it was"


def test_non_ascii_names_come_back_in_utf8(shared: Path) -> None:
    source = dcmread(shared / "dicom/pydicom/charset_files/chrGerm.dcm")
    identity = IdentityMap(SECRET, "1.2.3", {}, deidentify.identity_of(source))
    result = Dataset()
    result.StudyInstanceUID, result.PatientName = "1.2.3", ""
    back = read_strict(to_bytes_of(deidentify.reidentify(result, identity)))
    assert str(back.PatientName) == str(source.PatientName) == "Äneas^Rüdiger"


def to_bytes_of(ds: Dataset) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.33", "2.25.1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return to_bytes(ds)


def test_results_are_never_sent_without_their_identity(tmp_path: Path, ct_series: Path) -> None:
    spool, job, copies = _deidentified_job(tmp_path, ct_series)
    foreign = dcmread(copies[0])
    foreign.StudyInstanceUID = "1.2.3.4"
    foreign.save_as(tmp_path / "foreign.dcm", enforce_file_format=True)
    with pytest.raises(deidentify.NotReidentifiable):  # permanent: the job fails, nothing is sent
        deidentify.restore_identity(spool, job, [tmp_path / "foreign.dcm"])
    deidentify.identity_path(spool, job.study_key, job.series_key, job.job_id).unlink()
    with pytest.raises(deidentify.IdentityMapMissing) as missing:  # retried: a node-side worker may take it
        deidentify.restore_identity(spool, job, copies[:1])
    assert missing.value.retryable and "node's host" in str(missing.value)
    plain = JobRow(
        "job2", job.series_key, job.study_key, "other", "a/b/manifest-job2.json", "PACS", JobState.ENCODED, "", 1
    )
    assert deidentify.restore_identity(spool, plain, copies[:1]) == copies[:1]
