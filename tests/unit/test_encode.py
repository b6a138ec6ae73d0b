"""SEG and SR from the real CT series and a synthetic label map: encoded, written to bytes, read back, checked."""

from __future__ import annotations

import os
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from models.spec import Code, Label, ModelSpec
from pacsai.errors import ModelError
from tests.checks import read_strict, segmentation_spec, to_bytes
from worker.encode_seg import NothingFound, encode_seg, present_labels, tracking_uid
from worker.encode_sr import encode_sr, measure_labels
from worker.load_volume import load_series
from worker.uids import output_uids
from worker.volume import Volume

DICOM = Path(__file__).resolve().parents[3] / "shared" / "dicom"
CT_SERIES = DICOM / "totalsegmentator-ct-abdomen"
REFERENCE_SEG = DICOM / "dcmqi" / "seg" / "liver.dcm"
SOFTWARE_VERSION = "0.1.0"
ANATOMY = Code("123037004", "Anatomical Structure")
LIVER = Label(1, "liver", ANATOMY, Code("10200004", "Liver"), (221, 130, 101))
SPLEEN = Label(2, "spleen", ANATOMY, Code("78961009", "Spleen"), (157, 108, 162))
STOMACH = Label(3, "stomach", ANATOMY, Code("69695003", "Stomach"), (216, 132, 105))  # absent from the label map
BOX_SLICES = range(3, 11)


def _need(what: str, *, found: bool) -> None:
    """Skip when something a test needs is missing, but fail in CI, where it must be there."""
    if not found:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{what} is missing on the CI runner")
        pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def volume() -> Volume:
    _need("the shared DICOM corpus", found=CT_SERIES.is_dir() and REFERENCE_SEG.is_file())
    return load_series(sorted(CT_SERIES.iterdir()))


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return segmentation_spec(LIVER, SPLEEN, STOMACH)


@pytest.fixture(scope="module")
def label_map(volume: Volume) -> NDArray[np.uint8]:
    """A box of label 1 on slices 3..10 and a 12 mm sphere of label 2 centred on slice 12."""
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[BOX_SLICES.start : BOX_SLICES.stop, 100:200, 150:260] = LIVER.number
    slices, rows, columns = volume.array.shape
    k = np.arange(slices).reshape(-1, 1, 1)
    r = np.arange(rows).reshape(1, -1, 1)
    c = np.arange(columns).reshape(1, 1, -1)
    slice_mm, row_mm, col_mm = volume.spacing_mm
    sphere = ((k - 12) * slice_mm) ** 2 + ((r - 300) * row_mm) ** 2 + ((c - 350) * col_mm) ** 2 <= 12.0**2
    labels[sphere] = SPLEEN.number
    return labels


@pytest.fixture(scope="module")
def uids(volume: Volume, spec: ModelSpec) -> dict[str, str]:
    return output_uids(str(volume.datasets[0].SeriesInstanceUID), spec.name, spec.version)


@pytest.fixture(scope="module")
def seg_bytes(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec, uids: dict[str, str]) -> bytes:
    return to_bytes(encode_seg(volume, label_map, spec, uids, software_version=SOFTWARE_VERSION))


@pytest.fixture(scope="module")
def sr_bytes(
    seg_bytes: bytes, volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec, uids: dict[str, str]
) -> bytes:
    seg = hd.seg.segread(BytesIO(seg_bytes))
    return to_bytes(encode_sr(seg, volume, label_map, spec, uids, software_version=SOFTWARE_VERSION))


@pytest.fixture(scope="module")
def sr_alone_bytes(volume: Volume, spec: ModelSpec, uids: dict[str, str]) -> bytes:
    """The SR sent alone when the model found nothing."""
    empty = np.zeros(volume.array.shape, dtype=np.uint8)
    return to_bytes(encode_sr(None, volume, empty, spec, uids, software_version=SOFTWARE_VERSION))


def _report(data: bytes) -> hd.sr.MeasurementReport:
    """Read an SR back with highdicom and return its TID 1500 content."""
    report = hd.sr.srread(BytesIO(data)).content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def _frames_by_segment(seg: Dataset, volume: Volume) -> dict[int, list[int]]:
    """Segment number → source slice index of each of its frames, checking each frame's position on the way."""
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(volume.datasets)}
    frames: dict[int, list[int]] = {}
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence
        assert len(source) == 1
        k = slice_of[str(source[0].ReferencedSOPInstanceUID)]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in volume.datasets[k].ImagePositionPatient], abs=1e-4)
        frames.setdefault(int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber), []).append(k)
    return frames


def test_loaded_volume_has_no_pixel_data(volume: Volume) -> None:
    """The encoders get headers only, as the pipeline gives them."""
    assert len(volume.datasets) == 20
    assert not any("PixelData" in ds for ds in volume.datasets)


def test_seg_has_one_frame_per_source_slice_holding_each_segment(
    seg_bytes: bytes, volume: Volume, label_map: NDArray[np.uint8]
) -> None:
    """Frames sit at the source slice positions, exactly on the slices that contain the segment."""
    seg = read_strict(seg_bytes)
    frames = _frames_by_segment(seg, volume)
    assert set(frames) == {1, 2}
    for number, label in ((1, LIVER), (2, SPLEEN)):
        expected = [k for k in range(label_map.shape[0]) if np.any(label_map[k] == label.number)]
        assert sorted(frames[number]) == expected
    assert sorted(frames[1]) == list(BOX_SLICES)
    assert int(seg.NumberOfFrames) == sum(len(v) for v in frames.values())


def test_seg_pixels_equal_the_label_map(seg_bytes: bytes, volume: Volume, label_map: NDArray[np.uint8]) -> None:
    """highdicom reads the frames back into the label map, slice by source instance."""
    seg = hd.seg.segread(BytesIO(seg_bytes))
    pixels = seg.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in volume.datasets], combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(pixels, label_map)  # segment numbers equal label numbers here


def test_seg_references_every_source_instance(seg_bytes: bytes, volume: Volume) -> None:
    seg = read_strict(seg_bytes)
    assert len(seg.ReferencedSeriesSequence) == 1
    series = seg.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == volume.datasets[0].SeriesInstanceUID
    referenced = {str(item.ReferencedSOPInstanceUID) for item in series.ReferencedInstanceSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in volume.datasets}


def test_seg_header_marks_ai_output(seg_bytes: bytes, volume: Volume, uids: dict[str, str]) -> None:
    seg = read_strict(seg_bytes)
    source = volume.datasets[0]
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (seg.SegmentationType, seg.Modality, seg.Manufacturer) == ("BINARY", "SEG", "pacsai")
    assert seg.SeriesDescription == "AI ct-organs-tiny 0.1.0 SEG - not for diagnosis"
    assert "not for diagnosis" in seg.ContentDescription and seg.ContentLabel == "AI_SEGMENTATION"
    assert (seg.ManufacturerModelName, seg.SoftwareVersions) == ("ct-organs-tiny", SOFTWARE_VERSION)
    assert seg.DeviceSerialNumber
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (uids["seg_series"], uids["seg_instance"])
    assert (seg.SeriesNumber, seg.InstanceNumber) == (9901, 1)
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "StudyDate"):
        assert seg.get(keyword) == source.get(keyword), keyword


def test_seg_segments_are_coded_and_coloured(seg_bytes: bytes, uids: dict[str, str]) -> None:
    seg = read_strict(seg_bytes)
    for item, label in zip(seg.SegmentSequence, (LIVER, SPLEEN), strict=True):
        assert item.SegmentLabel == label.name
        for sequence, code in (
            (item.SegmentedPropertyCategoryCodeSequence, label.category),
            (item.SegmentedPropertyTypeCodeSequence, label.type),
        ):
            assert (sequence[0].CodeValue, sequence[0].CodingSchemeDesignator) == (code.value, "SCT")
        assert list(item.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*label.colour_rgb).value)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ct-organs-tiny", "0.1.0")
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")  # Artificial Intelligence
        assert item.TrackingUID == tracking_uid(uids, label)


def test_seg_has_the_structure_of_a_dcmqi_reference_seg(seg_bytes: bytes) -> None:
    """Same SOP class, type, segment attributes, shared and per-frame groups and dimensions as dcmqi's liver SEG."""
    seg, reference = read_strict(seg_bytes), pydicom.dcmread(REFERENCE_SEG, stop_before_pixels=True)
    assert (seg.SOPClassUID, seg.SegmentationType) == (reference.SOPClassUID, reference.SegmentationType)
    assert (seg.BitsAllocated, seg.BitsStored, seg.SamplesPerPixel) == (1, 1, 1)
    wanted = set(reference.SegmentSequence[0].dir())
    assert all(wanted <= set(item.dir()) for item in seg.SegmentSequence)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert {"PixelMeasuresSequence", "PlaneOrientationSequence"} <= set(shared.dir())
    per_frame = set(reference.PerFrameFunctionalGroupsSequence[0].dir())
    assert all(per_frame <= set(item.dir()) for item in seg.PerFrameFunctionalGroupsSequence)
    pointers = [(d.DimensionIndexPointer, d.FunctionalGroupPointer) for d in seg.DimensionIndexSequence]
    assert pointers == [(d.DimensionIndexPointer, d.FunctionalGroupPointer) for d in reference.DimensionIndexSequence]


def test_segments_are_numbered_over_present_labels_only(
    volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec, uids: dict[str, str]
) -> None:
    """With only label 2 present, segment 1 is the spleen and the SR's spleen group points at segment 1."""
    spleen_only = np.where(label_map == SPLEEN.number, label_map, 0).astype(np.uint8)
    seg = hd.seg.segread(BytesIO(to_bytes(encode_seg(volume, spleen_only, spec, uids, software_version="x"))))
    assert [item.SegmentedPropertyTypeCodeSequence[0].CodeValue for item in seg.SegmentSequence] == ["78961009"]
    report = _report(to_bytes(encode_sr(seg, volume, spleen_only, spec, uids, software_version="x")))
    (group,) = report.get_volumetric_roi_measurement_groups()
    assert group.tracking_uid == tracking_uid(uids, SPLEEN)
    assert group.referenced_segment is not None and group.referenced_segment[0].referenced_segment_numbers == [1]


def test_empty_label_map_is_nothing_found(volume: Volume, spec: ModelSpec, uids: dict[str, str]) -> None:
    empty = np.zeros(volume.array.shape, dtype=np.uint8)
    with pytest.raises(NothingFound):
        encode_seg(volume, empty, spec, uids, software_version=SOFTWARE_VERSION)


@pytest.mark.parametrize("fault", ["unknown label", "wrong shape", "wrong dtype"])
def test_label_map_that_does_not_fit_the_model_is_a_model_error(
    volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec, fault: str
) -> None:
    faulty: dict[str, NDArray[np.generic]] = {
        "unknown label": np.where(label_map == 2, 7, label_map).astype(np.uint8),
        "wrong shape": label_map[1:],
        "wrong dtype": label_map.astype(np.int16),
    }
    bad = faulty[fault]
    with pytest.raises(ModelError):
        present_labels(volume, bad, spec)  # type: ignore[arg-type]


def test_measure_labels_matches_numpy(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec) -> None:
    stats = measure_labels(volume, label_map, spec)
    assert [s.label for s in stats] == [LIVER, SPLEEN]
    for s in stats:
        inside = volume.array[label_map == s.label.number].astype(np.float64)
        assert s.voxel_count == inside.size
        assert s.volume_ml == pytest.approx(inside.size * 0.9765625 * 0.9765625 * 2.0 / 1000.0, rel=1e-9)
        assert s.mean == pytest.approx(inside.mean(), rel=1e-9)
        assert s.sd == pytest.approx(inside.std(), rel=1e-9)


def test_sr_reports_each_segment_with_volume_mean_and_sd(
    sr_bytes: bytes, volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec, uids: dict[str, str]
) -> None:
    stats = {s.label.number: s for s in measure_labels(volume, label_map, spec)}
    groups = _report(sr_bytes).get_volumetric_roi_measurement_groups()
    assert [g.tracking_uid for g in groups] == [tracking_uid(uids, LIVER), tracking_uid(uids, SPLEEN)]
    for group, number in zip(groups, (1, 2), strict=True):
        expected = stats[number]
        assert group.finding_type is not None and group.finding_type.value == expected.label.type.value
        segment = group.referenced_segment
        assert segment is not None
        assert segment[0].referenced_sop_instance_uid == uids["seg_instance"]
        assert segment[0].referenced_segment_numbers == [number]
        assert segment[1].value == volume.datasets[0].SeriesInstanceUID
        values = {
            (m.name.value, None if m.derivation is None else m.derivation.meaning): (m.value, m.unit.value)
            for m in group.get_measurements()
        }
        wanted = {
            ("118565006", None): (expected.voxel_count * volume.voxel_volume_ml, "ml"),
            ("112031", "Mean"): (expected.mean, "[hnsf'U]"),
            ("112031", "Standard Deviation"): (expected.sd, "[hnsf'U]"),
        }
        assert set(values) == set(wanted)
        for key, (value, unit) in wanted.items():
            assert values[key][0] == pytest.approx(value, rel=1e-12) and values[key][1] == unit, key


def test_sr_reports_an_absent_label_as_zero_ml(sr_bytes: bytes, uids: dict[str, str]) -> None:
    (group,) = _report(sr_bytes).get_image_measurement_groups()
    assert group.tracking_uid == tracking_uid(uids, STOMACH)
    assert [(m.name.value, m.value) for m in group.get_measurements()] == [("118565006", 0.0)]


def test_sr_header_observer_and_evidence(sr_bytes: bytes, volume: Volume, uids: dict[str, str]) -> None:
    sr = read_strict(sr_bytes)
    assert (sr.SOPClassUID, sr.Modality) == (Comprehensive3DSRStorage, "SR")
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (uids["sr_series"], uids["sr_instance"])
    assert sr.SeriesDescription == "AI ct-organs-tiny 0.1.0 SR - not for diagnosis"
    assert (sr.Manufacturer, sr.StudyInstanceUID) == ("pacsai", volume.datasets[0].StudyInstanceUID)
    assert (sr.ContentTemplateSequence[0].TemplateIdentifier, sr.PreliminaryFlag) == ("1500", "PRELIMINARY")
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == {uids["seg_instance"], *(str(ds.SOPInstanceUID) for ds in volume.datasets)}
    observer = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item
        for item in sr.ContentSequence
        if item.RelationshipType == "HAS OBS CONTEXT"
    }
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert observer["Device Observer Manufacturer"].TextValue == "pacsai"
    assert observer["Device Observer Name"].TextValue == "ct-organs-tiny"


def test_sr_without_seg_reports_every_label_as_zero(
    sr_alone_bytes: bytes, spec: ModelSpec, uids: dict[str, str]
) -> None:
    """When encode_seg raised NothingFound the SR alone goes back, with 0 mL for every label."""
    report = _report(sr_alone_bytes)
    groups = report.get_image_measurement_groups()
    assert [g.tracking_uid for g in groups] == [tracking_uid(uids, label) for label in spec.labels]
    assert [m.value for g in groups for m in g.get_measurements()] == [0.0] * len(spec.labels)
    assert not report.get_volumetric_roi_measurement_groups()


def _validator(name: str) -> str:
    """Path of a dicom3tools validator."""
    path = shutil.which(name)
    _need(f"{name} (dicom3tools)", found=path is not None)
    assert path is not None
    return path


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["seg", "sr", "sr_alone"])
def test_dciodvfy_finds_no_error(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """dciodvfy reports no IOD error; its warnings (empty PatientID/StudyID, a private scheme) come from the source."""
    dciodvfy = _validator("dciodvfy")
    path = tmp_path / f"{kind}.dcm"
    path.write_bytes(request.getfixturevalue(f"{kind}_bytes"))
    result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    assert not [line for line in lines if "Error" in line], lines


@pytest.mark.integration
def test_dcentvfy_finds_seg_sr_and_source_consistent(seg_bytes: bytes, sr_bytes: bytes, tmp_path: Path) -> None:
    """Patient and study attributes agree across the SEG, the SR and the source images."""
    dcentvfy = _validator("dcentvfy")
    (tmp_path / "seg.dcm").write_bytes(seg_bytes)
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    files = [str(tmp_path / "seg.dcm"), str(tmp_path / "sr.dcm"), *(str(p) for p in sorted(CT_SERIES.iterdir()))]
    result = subprocess.run([dcentvfy, *files], capture_output=True, text=True, timeout=60, check=False)
    lines = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line and "Different information entities" not in line
    ]  # IE bookkeeping across IODs, not a mismatch
    assert not lines, lines
