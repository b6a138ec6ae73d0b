"""Step 7's file bytes: a result dataset as pydicom writes it, a SEG's per-frame functional groups and an SR's
content tree written faster.

pydicom writes each of a SEG's ~8 nested items per frame on its own (~7,000 datasets for 855 frames), yet most are
one object shared by many frames (a source slice's reference and position serve every segment's frame of that
slice; the derivation code serves all). An SR's ~2,700 content items repeat a few dozen codes and share the Image
Library's equal descriptors (worker/image_library.py). Here the one top-level sequence that holds them
(PerFrameFunctionalGroupsSequence, else ContentSequence) is encoded bottom-up with each distinct item encoded once
(memoised by identity: one object, one encoding). Every element that is not a sequence is still written by pydicom's
own `write_data_element` (a plain int or str value once per tag, VR and value), except UL and US values of plain
ints, packed here as its write_numbers packs them; this module otherwise only frames items and sequences the way
pydicom does (explicit VR little endian: item tag + 4-byte length, or undefined length + delimiter; the same for SQ).
The rest of the file (preamble, meta, other elements, pixel data) is pydicom's `save_as`/`write_dataset`. A dataset
this framing does not cover (another transfer syntax, items read from a file, as highdicom copies an enhanced
source's plane positions, ambiguous VRs, a nested character set) is written by `save_as` alone. An item marked as
read in explicit VR little endian with its character set unchanged (encode_sr's written_as_built) is one pydicom
writes as it holds it, as here. tests/unit/test_result_bytes.py checks that the bytes equal `save_as`'s.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from io import BytesIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filereader import dcmread
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR

FRAMED_TAGS = (BaseTag(0x52009230), BaseTag(0x0040A730))  # PerFrameFunctionalGroupsSequence, ContentSequence
_AS_WRITTEN = (None, None), (False, True)  # made here, or marked as read in explicit VR little endian
_CHARSET_TAG = BaseTag(0x00080005)
_NUMBER_CODES = {"UL": "I", "US": "H"}  # struct codes write_numbers uses for these VRs
_UNDEFINED = b"\xff\xff\xff\xff"
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000)
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # (FFFE,E00D), length 0
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0


class _NotCovered(Exception):
    """Something the fast framing does not reproduce; save_as writes the whole dataset."""


class Written(Dataset):
    """A result already serialised elsewhere (worker/forked.py), read back lazily from its bytes: to_bytes returns
    those bytes as they are. Not to be changed: a change would not reach the bytes."""

    def __init__(self, data: bytes) -> None:
        read = dcmread(BytesIO(data))  # elements stay raw until used: ~0.5 ms for a 200 kB SR
        super().__init__(read)
        self.file_meta, self.preamble = read.file_meta, read.preamble
        self.written = data


def to_bytes(ds: Dataset) -> bytes:
    """The file `ds.save_as(..., enforce_file_format=True)` writes, byte for byte."""
    if isinstance(ds, Written):
        return ds.written
    framed_tag = next((tag for tag in FRAMED_TAGS if tag in ds), None)
    if framed_tag is None or not _covered(ds):
        return _saved(ds)
    rest = Dataset({element.tag: element for element in ds.elements() if element.tag != framed_tag})
    correct_ambiguous_vr(rest, True)  # the pass save_as makes over the top level, with the same ancestors
    framed = framed_sequence(ds, framed_tag)
    if framed is None:
        return _saved(ds)
    head = Dataset({element.tag: element for element in rest.elements() if element.tag < framed_tag})
    head.file_meta, head.preamble = ds.file_meta, getattr(ds, "preamble", None)
    buffer = BytesIO()
    head.save_as(buffer, enforce_file_format=True)
    buffer.write(framed)
    tail = DicomFileLike(buffer)
    tail.is_little_endian, tail.is_implicit_VR = True, False
    after = Dataset({element.tag: element for element in rest.elements() if element.tag > framed_tag})
    write_dataset(tail, after, parent_encoding=_encodings(ds))
    return buffer.getvalue()


def framed_sequence(ds: Dataset, tag: BaseTag = FRAMED_TAGS[0]) -> bytes | None:
    """The top-level sequence `tag` as encoded in to_bytes' file; None where the framing does not reproduce
    pydicom's (no such element, read from a file, an ambiguous VR or a character set inside)."""
    element = ds.get_item(tag)
    if not isinstance(element, DataElement):
        return None
    try:
        return _Framing(_encodings(ds)).sequence(element)
    except _NotCovered:
        return None


def _encodings(ds: Dataset) -> list[str]:
    """What write_dataset hands the top level's elements (and so every item without its own character set)."""
    return convert_encodings(ds.get("SpecificCharacterSet", default_encoding) or default_encoding)


def _saved(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _covered(ds: Dataset) -> bool:
    """Made in this process (or marked as written), explicit VR little endian, pixels (if any) of defined length."""
    meta = getattr(ds, "file_meta", None)
    pixels = ds.get_item(BaseTag(0x7FE00010))
    return (
        meta is not None
        and meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian
        and ds.original_encoding in _AS_WRITTEN
        and not _recoded(ds)
        and not isinstance(pixels, RawDataElement)  # read from a file
        and not (pixels is not None and pixels.is_undefined_length)
    )


class _Framing:
    """Encodes a sequence as pydicom's write_data_element does, each distinct item object once."""

    def __init__(self, encodings: list[str]) -> None:
        self.encodings = encodings
        self.items: dict[int, bytes] = {}
        self.leaves: dict[tuple[object, ...], bytes] = {}

    def sequence(self, element: DataElement) -> bytes:
        """Tag, 'SQ', reserved, length (or undefined + delimiter), the items."""
        items = b"".join(self.item(item) for item in _items(element))
        header = struct.pack("<HH", element.tag.group, element.tag.element) + b"SQ\x00\x00"
        if element.is_undefined_length:
            return header + _UNDEFINED + items + _SEQUENCE_END
        return header + struct.pack("<I", len(items)) + items

    def item(self, item: Dataset) -> bytes:
        """One item as write_sequence_item writes a dataset made in this process (elements in tag order)."""
        known = self.items.get(id(item))
        if known is not None:
            return known
        if item.original_encoding not in _AS_WRITTEN or _CHARSET_TAG in item or _recoded(item):
            raise _NotCovered
        body = b"".join(self.element(item.get_item(tag)) for tag in sorted(item.keys()) if not _group_length(tag))
        if getattr(item, "is_undefined_length_sequence_item", False):
            encoded = _ITEM + _UNDEFINED + body + _ITEM_END
        else:
            encoded = _ITEM + struct.pack("<I", len(body)) + body
        self.items[id(item)] = encoded
        return encoded

    def element(self, element: DataElement | RawDataElement) -> bytes:
        """A sequence framed here; any other element written by pydicom."""
        if not isinstance(element, DataElement) or element.VR in AMBIGUOUS_VR:
            raise _NotCovered
        if element.VR == "SQ":
            return self.sequence(element)
        numbers = _numbers(element)
        if numbers is not None:
            return numbers
        key = _leaf_key(element)
        known = self.leaves.get(key) if key else None
        if known is not None:
            return known
        leaf = DicomBytesIO()
        leaf.is_little_endian, leaf.is_implicit_VR = True, False
        write_data_element(leaf, element, self.encodings)
        if key:
            self.leaves[key] = leaf.getvalue()
        return leaf.getvalue()


def _numbers(element: DataElement) -> bytes | None:
    """A UL or US element of plain ints (DimensionIndexValues, ReferencedSegmentNumber) as write_data_element writes
    it: tag, VR, 2-byte length, the values packed little endian (write_numbers); None for anything else."""
    value = element.value
    values = [value] if type(value) is int else list(value) if isinstance(value, (list, MultiValue)) else None
    code = _NUMBER_CODES.get(element.VR)
    if code is None or values is None or element.is_undefined_length or any(type(v) is not int for v in values):
        return None
    try:
        packed = struct.pack(f"<{len(values)}{code}", *values)
    except struct.error:  # out of range: pydicom's own error
        return None
    tag = element.tag
    return struct.pack("<HH2sH", tag.group, tag.element, element.VR.encode(), len(packed)) + packed


def _leaf_key(element: DataElement) -> tuple[object, ...]:
    """What a plain int or str element's encoding depends on (the framing's encodings being fixed); () for any
    other value (floats, DS/IS objects, lists, bytes), which is written each time."""
    value = element.value
    if type(value) not in (int, str, UID):
        return ()
    return (element.tag, element.VR, element.is_undefined_length, type(value), value)


def _items(element: DataElement) -> Iterable[Dataset]:
    return element.value if element.value else ()


def _recoded(item: Dataset) -> bool:
    """pydicom's write_dataset would convert this read item (its character set changed since): not framed here."""
    return item.original_encoding != (None, None) and item.original_character_set != item._character_set


def _group_length(tag: BaseTag) -> bool:
    """write_dataset leaves out retired group lengths (gggg,0000) beyond group 6."""
    return tag.element == 0 and tag.group > 6
