"""The SR's fast paths: one-pass label statistics, the Image Library's shared descriptors, and the write marks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import UID, Comprehensive3DSRStorage

from models.spec import Code, Label, ModelSpec
from pacsai.errors import ModelError
from tests.checks import read_strict, segmentation_spec, to_bytes
from worker.encode_seg import encode_seg
from worker.encode_sr import encode_sr, measure_labels
from worker.image_library import image_library
from worker.uids import output_uids
from worker.volume import Volume

ANATOMY = Code("123037004", "Anatomical Structure")
LABELS = (
    Label(1, "liver", ANATOMY, Code("10200004", "Liver"), (221, 130, 101)),
    Label(2, "spleen", ANATOMY, Code("78961009", "Spleen"), (157, 108, 162)),
    Label(7, "stomach", ANATOMY, Code("69695003", "Stomach"), (216, 132, 105)),
)
# TID 1602-1604 concept codes (DCM): modality, frame of reference, rows, columns, spacing, thickness, position Z
MODALITY, FRAME_OF_REFERENCE, ROWS, COLUMNS = "121139", "112227", "110910", "110911"
HORIZONTAL, VERTICAL, THICKNESS, POSITION_Z = "111026", "111066", "112225", "110903"
ORIENTATION = ("110904", "110905", "110906", "110907", "110908", "110909")


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return segmentation_spec(*LABELS)


def _synthetic(slices: int) -> tuple[Volume, NDArray[np.uint8]]:
    """A 256² volume far from 0 (cancellation would show) with labels spanning blocks, and one on a single slice."""
    rng = np.random.default_rng(7)
    array = (3000.0 + rng.normal(0.0, 0.01, (slices, 256, 256))).astype(np.float32)
    labels = np.zeros(array.shape, np.uint8)
    labels[:, 20:120, 30:200] = 1  # in every block
    labels[5 : slices - 3, 150:160, 10:250] = 2  # across blocks, starting and ending inside one
    labels[slices // 2, 200:210, 100:110] = 7  # a single slice
    affine = np.diag([2.0, 0.5, 0.5, 1.0])
    return Volume(array=array, affine=affine, datasets=()), labels


def test_measure_labels_equals_exact_statistics_across_blocks(spec: ModelSpec) -> None:
    """Counts exact; mean and population SD within 1e-12 of the exactly summed (math.fsum) values."""
    volume, labels = _synthetic(slices=40)  # 2.6 M voxels: several blocks
    stats = measure_labels(volume, labels, spec)
    assert [s.label.number for s in stats] == [1, 2, 7]
    for s in stats:
        values = volume.array[labels == s.label.number].astype(np.float64)
        mean = math.fsum(values) / values.size
        sd = math.sqrt(math.fsum((values - mean) ** 2) / values.size)
        assert s.voxel_count == values.size
        assert s.volume_ml == pytest.approx(values.size * 0.5 * 0.5 * 2.0 / 1000.0, rel=1e-12)
        assert s.mean == pytest.approx(mean, rel=1e-12)
        assert s.sd == pytest.approx(sd, rel=1e-9)  # SD ≈ 0.01 on values ≈ 3000: no cancellation


def test_measure_labels_refuses_a_map_that_does_not_fit(spec: ModelSpec) -> None:
    volume, labels = _synthetic(slices=4)
    unknown = labels.copy()
    unknown[0, 0, 0] = 9
    with pytest.raises(ModelError, match=r"values \[9\]"):
        measure_labels(volume, unknown, spec)
    with pytest.raises(ModelError, match="expected uint8"):
        measure_labels(volume, labels[:3], spec)
    with pytest.raises(ModelError, match="expected uint8"):
        measure_labels(volume, labels.astype(np.int16), spec)
    assert measure_labels(volume, np.zeros_like(labels), spec) == ()


def _descriptors(items: list[Dataset]) -> dict[str, str]:
    """TID 1602 items → concept code → value as written (NUM numeric, CODE code value, text or UID)."""
    values = {}
    for item in items:
        if item.ValueType == "NUM":
            value = str(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            value = str(item.ConceptCodeSequence[0].CodeValue)
        else:
            value = str(item.get("UID", item.get("TextValue")))
        values[str(item.ConceptNameCodeSequence[0].CodeValue)] = value
    return values


def test_library_entries_with_their_group_describe_each_source(ct: Volume) -> None:
    """Each entry references its slice in order; its own descriptors plus the group's give its header's values."""
    sources = list(ct.datasets)
    sources[3] = copy.deepcopy(sources[3])
    sources[3].SliceThickness = 7.5  # one slice of another thickness: thickness is no longer the group's
    written = read_strict(to_bytes(_as_document(image_library(sources))))
    (group,) = written.ContentSequence[0].ContentSequence
    shared = [item for item in group.ContentSequence if item.ValueType != "IMAGE"]
    entries = [item for item in group.ContentSequence if item.ValueType == "IMAGE"]
    assert [str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for e in entries] == [
        str(ds.SOPInstanceUID) for ds in sources
    ]
    group_values = _descriptors(shared)
    assert POSITION_Z not in group_values and THICKNESS not in group_values
    assert group_values[MODALITY] == "CT" and group_values[FRAME_OF_REFERENCE] == str(sources[0].FrameOfReferenceUID)
    for entry, ds in zip(entries, sources, strict=True):
        own = _descriptors(list(entry.ContentSequence))
        assert set(own) == {POSITION_Z, THICKNESS}  # what differs between the slices, and nothing else
        described = group_values | own
        assert (int(float(described[ROWS])), int(float(described[COLUMNS]))) == (ds.Rows, ds.Columns)
        assert float(described[HORIZONTAL]) == float(ds.PixelSpacing[1])
        assert float(described[VERTICAL]) == float(ds.PixelSpacing[0])
        assert float(described[THICKNESS]) == float(ds.SliceThickness)
        assert [float(described[c]) for c in ("110901", "110902", POSITION_Z)] == [
            float(v) for v in ds.ImagePositionPatient
        ]
        assert [float(described[c]) for c in ORIENTATION] == [float(v) for v in ds.ImageOrientationPatient]


def _as_document(library: Dataset) -> Dataset:
    """The library in a minimal dataset pydicom can write and read back."""
    ds = Dataset()
    ds.ContentSequence = [library]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = Comprehensive3DSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID("1.2.3.4")
    return ds


def test_sr_marked_for_writing_writes_what_an_unmarked_copy_writes(ct: Volume, spec: ModelSpec) -> None:
    """Every dataset of the SR is marked as Explicit VR Little Endian, and the marks change no byte written."""
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[3:11, 100:200, 150:260] = 1
    uids = output_uids(str(ct.datasets[0].SeriesInstanceUID), spec.name, spec.version)
    seg = encode_seg(ct, labels, spec, uids, software_version="0.1.0")
    sr = encode_sr(seg, ct, labels, spec, uids, software_version="0.1.0")
    marked = to_bytes(sr)
    datasets = list(_walk(sr))
    assert len(datasets) > 4 * len(ct.datasets)  # the library's entries among them
    assert all(ds.original_encoding == (False, True) for ds in datasets)
    for ds in datasets:
        ds.set_original_encoding(None, None, "")
    assert to_bytes(sr) == marked


def _walk(ds: Dataset) -> list[Dataset]:
    found = [ds]
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found += _walk(item)
    return found
