"""worker.result_bytes: a SEG's and an SR's file bytes are exactly what pydicom's save_as writes, their per-frame groups
and content framed here."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from models.spec import Code, Label, ModelSpec
from tests.checks import dciodvfy_errors, read_strict, segmentation_spec, to_bytes
from worker.encode_seg import encode_seg, value_counts
from worker.encode_sr import encode_sr
from worker.load_volume import load_series
from worker.result_bytes import FRAMED_TAGS, framed_sequence
from worker.result_bytes import to_bytes as fast_bytes
from worker.uids import output_uids
from worker.volume import Volume

DICOM = Path(__file__).resolve().parents[3] / "shared" / "dicom"
ENHANCED_MR = DICOM / "dcm_qa_enh" / "Philips" / "IM_0027_fMAP.dcm"
ANATOMY = Code("123037004", "Anatomical Structure")
LIVER = Label(1, "Leber (肝臓)", ANATOMY, Code("10200004", "Liver"), (221, 130, 101))  # non-ASCII: UTF-8 declared
SPLEEN = Label(2, "spleen", ANATOMY, Code("78961009", "Spleen"), (157, 108, 162))
KIDNEY = Label(3, "kidney", ANATOMY, Code("64033007", "Kidney"), (185, 102, 83))


def _need(what: str, *, found: bool) -> None:
    if not found:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{what} is missing on the CI runner")
        pytest.skip(f"{what} is missing")


def _spec(*labels: Label) -> ModelSpec:
    return segmentation_spec(*labels, modalities=("CT", "MR"))


def _labels(volume: Volume) -> NDArray[np.uint8]:
    """Three overlapping-in-slices blobs, so most slices hold several segments' frames."""
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    slices, rows, columns = volume.array.shape
    labels[1 : slices - 1, rows // 4 : rows // 2, columns // 4 : columns // 2] = 1
    labels[slices // 3 :, rows // 2 : rows * 3 // 4, columns // 2 : columns * 3 // 4] = 2
    labels[: slices // 2, 2:6, 2:6] = 3
    return labels


def _seg(volume: Volume, *, omit_empty_frames: bool = True) -> Dataset:
    spec = _spec(LIVER, SPLEEN, KIDNEY)
    uids = output_uids(str(volume.datasets[0].SeriesInstanceUID), spec.name, spec.version)
    return encode_seg(
        volume, _labels(volume), spec, uids, software_version="0.1.0", omit_empty_frames=omit_empty_frames
    )


@pytest.fixture(scope="module")
def enhanced_mr() -> Volume:
    _need("the enhanced MR of the shared corpus", found=ENHANCED_MR.is_file())
    return load_series([ENHANCED_MR])


def _assert_fast_and_identical(seg: Dataset) -> bytes:
    """The per-frame groups took the fast framing, and the file equals save_as's byte for byte."""
    framed = framed_sequence(seg)
    assert framed is not None
    data = fast_bytes(seg)
    assert data == to_bytes(seg)
    assert framed in data
    return data


@pytest.mark.parametrize("omit_empty_frames", [True, False])
def test_ct_seg_bytes_equal_save_as(ct: Volume, omit_empty_frames: bool) -> None:
    """Single-frame CT source, UTF-8 segment label; with and without empty frames."""
    seg = _seg(ct, omit_empty_frames=omit_empty_frames)
    data = _assert_fast_and_identical(seg)
    back = read_strict(data)
    assert back.SpecificCharacterSet == "ISO_IR 192" and back.SegmentSequence[0].SegmentLabel == LIVER.name
    assert len(back.PerFrameFunctionalGroupsSequence) == int(seg.NumberOfFrames)
    assert [_frame_values(groups) for groups in back.PerFrameFunctionalGroupsSequence] == [
        _frame_values(groups) for groups in seg.PerFrameFunctionalGroupsSequence
    ]


def _frame_values(groups: Dataset) -> tuple[object, ...]:
    """What a viewer reads of a frame: its indices, segment, position and source instance."""
    return (
        [int(v) for v in groups.FrameContentSequence[0].DimensionIndexValues],
        int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
        [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient],
        str(groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
    )


def test_seg_of_an_enhanced_source_bytes_equal_save_as(enhanced_mr: Volume) -> None:
    """Multi-frame source: highdicom copies plane positions read from the source file (raw elements pydicom writes
    verbatim), which the framing leaves to save_as; the file is the same."""
    seg = _seg(enhanced_mr)
    data = fast_bytes(seg)
    assert data == to_bytes(seg)
    frames = [
        int(groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for groups in read_strict(data).PerFrameFunctionalGroupsSequence
    ]
    assert set(frames) <= set(enhanced_mr.frame_numbers)


def test_shared_items_are_written_once_per_occurrence(ct: Volume) -> None:
    """One item object in several frames (a slice's source reference) is written in each of them."""
    seg = _seg(ct)
    groups = seg.PerFrameFunctionalGroupsSequence
    by_id: dict[int, int] = {}
    for frame in groups:
        item = frame.PlanePositionSequence[0]
        by_id[id(item)] = by_id.get(id(item), 0) + 1
    assert max(by_id.values()) > 1  # highdicom shares them: the memo is exercised
    back = read_strict(fast_bytes(seg)).PerFrameFunctionalGroupsSequence
    assert [f.PlanePositionSequence[0].ImagePositionPatient for f in back] == [
        f.PlanePositionSequence[0].ImagePositionPatient for f in groups
    ]


def test_undefined_lengths_and_odd_values_are_written_like_pydicom(ct: Volume) -> None:
    """Sequences and items marked with undefined length get 0xFFFFFFFF and their delimiters, as in save_as; UL/US
    values that are empty, single or out of range are left to, or packed as, pydicom's write_numbers."""
    seg = _seg(ct)
    groups = seg.PerFrameFunctionalGroupsSequence
    seg[0x52009230].is_undefined_length = True
    groups[0]["DerivationImageSequence"].is_undefined_length = True
    groups[1].FrameContentSequence[0].is_undefined_length_sequence_item = True
    groups[2].is_undefined_length_sequence_item = True
    groups[3].FrameContentSequence = []  # an empty sequence: no items, length 0
    groups[4].FrameContentSequence[0].DimensionIndexValues = []
    groups[5].FrameContentSequence[0].DimensionIndexValues = 7
    groups[6].SegmentIdentificationSequence[0].ReferencedSegmentNumber = None
    _assert_fast_and_identical(seg)
    groups[7].SegmentIdentificationSequence[0].ReferencedSegmentNumber = 70000  # over US: pydicom's error
    with pytest.raises(OSError):
        to_bytes(seg)
    with pytest.raises(OSError):
        fast_bytes(seg)


def test_what_the_framing_does_not_cover_is_written_by_save_as(ct: Volume) -> None:
    """An ambiguous VR or a character set inside an item, a file read back, another transfer syntax: save_as."""
    seg = _seg(ct)
    ambiguous = copy.deepcopy(seg)
    ambiguous.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0].add(
        DataElement(0x00281101, "US or SS", b"\x00\x01\x00\x00\x10\x00")  # RedPaletteColorLookupTableDescriptor
    )
    assert framed_sequence(ambiguous) is None
    assert fast_bytes(ambiguous) == to_bytes(copy.deepcopy(ambiguous))
    charset = copy.deepcopy(seg)
    charset.PerFrameFunctionalGroupsSequence[0].SpecificCharacterSet = "ISO_IR 100"
    assert framed_sequence(charset) is None and fast_bytes(charset) == to_bytes(charset)
    read = read_strict(to_bytes(seg))
    assert fast_bytes(read) == to_bytes(read)
    implicit = copy.deepcopy(seg)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert fast_bytes(implicit) == to_bytes(implicit)
    assert fast_bytes(ct.datasets[0]) == to_bytes(ct.datasets[0])  # no per-frame groups at all


def _sr(volume: Volume) -> Dataset:
    spec = _spec(LIVER, SPLEEN, KIDNEY)
    uids = output_uids(str(volume.datasets[0].SeriesInstanceUID), spec.name, spec.version)
    seg = encode_seg(volume, _labels(volume), spec, uids, software_version="0.1.0")
    return encode_sr(seg, volume, _labels(volume), spec, uids, software_version="0.1.0", ood=(1.5, 2.0))


def test_ct_sr_bytes_equal_save_as(ct: Volume) -> None:
    """The SR's content tree (marked as written by encode_sr, UTF-8 label names) takes the framing; same file."""
    sr = _sr(ct)
    framed = framed_sequence(sr, FRAMED_TAGS[1])
    assert framed is not None
    data = fast_bytes(sr)
    assert data == to_bytes(sr) and framed in data
    back = read_strict(data)
    (library,) = [item for item in back.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    entries = [item for item in library.ContentSequence[0].ContentSequence if item.ValueType == "IMAGE"]
    assert len(entries) == len(ct.datasets)
    assert LIVER.name in data.decode("utf-8", "replace")


def test_an_sr_whose_character_set_changed_is_written_by_save_as(ct: Volume) -> None:
    """Items marked as written in one character set are re-encoded by pydicom once it changes: not framed here."""
    sr = copy.deepcopy(_sr(ct))
    sr.ContentSequence[0].SpecificCharacterSet = "ISO_IR 100"  # a nested character set
    assert framed_sequence(sr, FRAMED_TAGS[1]) is None and fast_bytes(sr) == to_bytes(sr)
    recoded = _sr(ct)
    recoded.SpecificCharacterSet = "ISO_IR 100"  # the top level's: pydicom re-encodes the marked datasets
    assert fast_bytes(recoded) == to_bytes(recoded)


def test_fast_bytes_pass_dciodvfy(ct: Volume, tmp_path: Path) -> None:
    _need("dciodvfy", found=shutil.which("dciodvfy") is not None)
    path = tmp_path / "seg.dcm"
    path.write_bytes(fast_bytes(_seg(ct)))
    assert dciodvfy_errors(path) == []
    assert pydicom.dcmread(path).Modality == "SEG"


def test_value_counts_equal_numpy_bincount() -> None:
    """torch's count of a uint8 map equals numpy's, for a read-only and a non-contiguous map too."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 256, size=(9, 31, 17), dtype=np.uint8)
    labels[:, :5] = 0
    expected = np.bincount(labels.ravel(), minlength=256)
    assert np.array_equal(value_counts(labels), expected)
    frozen = labels.copy()
    frozen.flags.writeable = False
    assert np.array_equal(value_counts(frozen), expected)
    assert np.array_equal(value_counts(labels[:, ::2]), np.bincount(labels[:, ::2].ravel(), minlength=256))
    assert value_counts(labels).dtype == np.int64
