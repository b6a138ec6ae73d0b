"""check_instance on crafted datasets, decoded from bytes the way the node decodes a C-STORE (raw elements, lazy)."""

from __future__ import annotations

import struct
import time
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom.dsutils import decode, encode

from dicom_node.validate import (
    MALFORMED,
    MAX_DECODED_PIXEL_BYTES,
    MAX_SEQUENCE_DEPTH,
    NO_DECODER,
    NOT_MATCHING,
    TOO_LARGE,
    InstanceRefusal,
    check_instance,
)
from pacsai import dimse

CANARY_UID = "1.2.826.0.1.3680043.8.498.99999999"


def image(
    rows: int = 4, columns: int = 4, frames: int | None = None, *, bits: int = 16, native: bool = True
) -> Dataset:
    """A CT header, with matching native pixel data unless not native, and canary values no reason may show."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = CTImageStorage, CANARY_UID + ".3", CANARY_UID + ".1"
    ds.SeriesInstanceUID, ds.PatientName, ds.Modality = CANARY_UID + ".2", "CANARY^PHI", "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if native:
        ds.PixelData = b"\x00" * (rows * columns * (frames or 1) * bits // 8)
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    return ds


def encapsulated(ds: Dataset, fragments: list[bytes]) -> Dataset:
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def received(ds: Dataset, *, implicit: bool = False) -> tuple[Dataset, int]:
    """Encode, then decode like pynetdicom does for a C-STORE: elements stay raw until accessed."""
    data = encode(ds, implicit, True)
    assert data is not None
    return from_bytes(data, implicit=implicit)


def from_bytes(data: bytes, *, implicit: bool = False) -> tuple[Dataset, int]:
    decoded = decode(BytesIO(data), implicit, True)
    decoded.set_original_encoding(implicit, True)
    return decoded, len(data)


def check(ds: Dataset, syntax: UID = ExplicitVRLittleEndian, *, implicit: bool = False) -> InstanceRefusal | None:
    decoded, size = received(ds, implicit=implicit)
    return check_instance(decoded, size, transfer_syntax=str(syntax))


def assert_value_free(refusal: InstanceRefusal) -> None:
    assert CANARY_UID not in refusal.reason and "CANARY" not in refusal.reason


def test_a_consistent_image_is_accepted() -> None:
    assert check(image()) is None
    assert check(image(frames=3)) is None
    assert check(image(), ImplicitVRLittleEndian, implicit=True) is None


def test_a_consistent_compressed_image_is_accepted_as_received() -> None:
    assert check(encapsulated(image(frames=2), [b"\xff\xd8" * 5, b"\xff\xd8" * 5]), JPEG2000Lossless) is None


def test_a_non_image_without_pixel_data_is_accepted() -> None:
    ds = image()
    del ds.PixelData
    ds.SOPClassUID = BasicTextSRStorage
    assert check(ds) is None


def test_an_empty_dataset_is_refused() -> None:
    assert check_instance(Dataset(), 0) == InstanceRefusal(MALFORMED, "empty dataset")


@pytest.mark.catalogue("C4")
def test_c4_huge_declared_length_is_refused_without_allocating() -> None:
    """OB element declaring 0xFFFFFFF0 bytes with 10 present: refused from the raw length, nothing sized by it."""
    ds = image()
    del ds.PixelData
    data = encode(ds, False, True)
    assert data is not None
    data += struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFF0) + b"\x00" * 10
    decoded, size = from_bytes(data)
    started = time.monotonic()
    refusal = check_instance(decoded, size, transfer_syntax=ExplicitVRLittleEndian)
    assert time.monotonic() - started < 1
    assert refusal == InstanceRefusal(MALFORMED, "PixelData is shorter than its declared length (truncated)")


@pytest.mark.catalogue("C3", "C4")
def test_c4_truncated_element_inside_a_sequence_is_refused() -> None:
    ds = image()
    item = Dataset()
    item.CodeMeaning = "x" * 40
    ds.AnatomicRegionSequence = Sequence([item])
    data = encode(ds, False, True)
    assert data is not None
    cut = data.index(b"x" * 40) + 10  # the sequence's own length still claims the whole item
    with_short_sequence = data[:cut]
    decoded, size = from_bytes(with_short_sequence)
    refusal = check_instance(decoded, size, transfer_syntax=ExplicitVRLittleEndian)
    assert refusal == InstanceRefusal(
        MALFORMED, "AnatomicRegionSequence is shorter than its declared length (truncated)"
    )


@pytest.mark.catalogue("C6")
def test_c6_absurd_dimensions_are_refused_before_decoding() -> None:
    """JPEG 2000, Rows = Columns = 65535, 10,000 frames: over the decoded-size cap, answered 0xC001."""
    ds = encapsulated(image(rows=65535, columns=65535, frames=10_000, native=False), [b"\xff\x4f" * 8])
    refusal = check(ds, JPEG2000Lossless)
    assert refusal is not None
    assert refusal.status == TOO_LARGE and 0xC000 <= TOO_LARGE <= 0xCFFF
    assert f"{MAX_DECODED_PIXEL_BYTES // 2**20} MiB" in refusal.reason
    assert_value_free(refusal)


def test_c6_cap_applies_to_rle_too() -> None:
    ds = encapsulated(image(rows=65535, columns=65535, frames=10_000, native=False), [b"\x00" * 64])
    refusal = check(ds, RLELossless)
    assert refusal is not None and refusal.status == TOO_LARGE


@pytest.mark.catalogue("C7")
def test_c7_native_pixel_data_shorter_than_the_header_says_is_refused() -> None:
    ds = image(rows=512, columns=512)
    ds.PixelData = b"\x00" * 1000
    refusal = check(ds)
    assert refusal is not None and refusal.status == NOT_MATCHING
    assert refusal.reason.startswith("PixelData is shorter than Rows x Columns")
    assert_value_free(refusal)


def test_c7_ybr_full_422_is_sized_with_two_samples_a_pixel() -> None:
    ds = image(bits=8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.PixelData = b"\x00" * (4 * 4 * 2)
    assert check(ds) is None


def test_c7_fewer_fragments_than_frames_is_refused() -> None:
    refusal = check(encapsulated(image(frames=3), [b"\x00" * 8]), JPEG2000Lossless)
    assert refusal == InstanceRefusal(NOT_MATCHING, "encapsulated PixelData has fewer fragments than NumberOfFrames")


def test_image_without_pixel_data_is_refused() -> None:
    ds = image()
    del ds.PixelData
    assert check(ds) == InstanceRefusal(dimse.DATASET_DOES_NOT_MATCH, "PixelData missing from an image SOP class")


@pytest.mark.parametrize(
    "keyword",
    [
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PixelRepresentation",
    ],
)
def test_a_missing_pixel_description_attribute_is_refused_by_name(keyword: str) -> None:
    ds = image()
    delattr(ds, keyword)
    assert check(ds) == InstanceRefusal(NOT_MATCHING, f"{keyword} missing from the image pixel module")


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("Rows", 0, "Rows is not a positive integer"),
        ("NumberOfFrames", "1A", "NumberOfFrames is not a positive integer"),
        ("NumberOfFrames", "0", "NumberOfFrames is not a positive integer"),
        ("BitsAllocated", 12, "BitsAllocated is not 1 or a multiple of 8 up to 64"),
        ("BitsStored", 17, "BitsStored is not between 1 and BitsAllocated"),
        ("SamplesPerPixel", 2, "SamplesPerPixel is not 1, 3 or 4"),
        ("PixelRepresentation", 2, "PixelRepresentation is not 0 or 1"),
    ],
)
def test_an_impossible_pixel_description_is_refused(keyword: str, value: object, reason: str) -> None:
    ds = image()
    if keyword == "NumberOfFrames":
        ds.add_new(0x00280008, "IS", None)
        ds["NumberOfFrames"]._value = value  # an invalid IS, as a modality might send it
    else:
        setattr(ds, keyword, value)
    assert check(ds) == InstanceRefusal(NOT_MATCHING, reason)


def test_pixel_data_in_a_syntax_nothing_decodes_is_refused() -> None:
    refusal = check(encapsulated(image(), [b"\x00\x00\x01\xb3" * 4]), MPEG2MPML)
    assert refusal is not None and refusal.status == NO_DECODER
    assert "MPEG2" in refusal.reason


def test_native_pixel_data_in_an_encapsulated_syntax_is_refused() -> None:
    refusal = check(image(), JPEG2000Lossless)
    assert refusal == InstanceRefusal(MALFORMED, "PixelData is not encapsulated although the transfer syntax is")


def test_an_invalid_sop_class_uid_is_refused() -> None:
    ds = image()
    ds.SOPClassUID = ""
    assert check(ds) == InstanceRefusal(MALFORMED, "SOPClassUID is not a valid UID")


def nested(depth: int) -> bytes:
    """A dataset whose ReferencedSeriesSequence nests `depth` levels, every length defined (pydicom parses lazily)."""
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, len(item)) + item
    head = Dataset()
    head.SOPClassUID = BasicTextSRStorage
    data = encode(head, False, True)
    assert data is not None
    return data + inner


def test_c5_nesting_within_the_limit_is_accepted() -> None:
    decoded, size = from_bytes(nested(MAX_SEQUENCE_DEPTH))
    assert check_instance(decoded, size, transfer_syntax=ExplicitVRLittleEndian) is None


@pytest.mark.catalogue("C5")
@pytest.mark.parametrize("depth", [MAX_SEQUENCE_DEPTH + 1, 10_000])
def test_c5_deep_nesting_is_refused_without_recursion(depth: int) -> None:
    decoded, size = from_bytes(nested(depth))
    refusal = check_instance(decoded, size, transfer_syntax=ExplicitVRLittleEndian)
    assert refusal == InstanceRefusal(MALFORMED, f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")


def test_c5_undefined_length_nesting_past_the_limit_is_refused() -> None:
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    level = ds
    for _ in range(MAX_SEQUENCE_DEPTH + 3):
        item = Dataset()
        level.ReferencedSeriesSequence = Sequence([item])
        level = item
    refusal = check(ds)
    assert refusal == InstanceRefusal(MALFORMED, f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
