"""Checks on an incoming instance before it is spooled: a refusal carries a DIMSE status and a reason without values.

Header-level only: pixel data is never decoded, and nothing is allocated from a length read out of the dataset.
Policy: decodable data (compressed or not) is stored as received; we refuse only what can never be processed.
Statuses (PS3.4 B.2.3): 0xA900 when the instance breaks its IOD (an image without pixel data, a missing or
inconsistent pixel description); 0xC0xx when we cannot understand it. The size cap answers 0xC001, not 0xA7xx:
an SCU retries "out of resources" (our own send.py does), but an instance over the cap will never fit.
The same holds for the cap on the encoded instance (PACSAI_MAX_INSTANCE_MB, C15), which also answers 0xC001.
A received instance is read from its file with large values left on disk (C15): lengths are then checked against
the file's size, and encapsulated fragments are walked in the file itself.

Over 300 lines on purpose: every refusal of an instance is decided here, so a PACS administrator reads one file.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import uid as uids
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.tag import Tag

from pacsai import dimse
from pacsai.storage import InvalidUid, check_uid

MAX_SEQUENCE_DEPTH = 32  # C5: sequence nesting levels we walk (fault catalogue: ≤ 32)
MAX_DECODED_PIXEL_BYTES = 2 * 1024**3  # C6: one instance's pixel data once decoded
MALFORMED = dimse.CANNOT_UNDERSTAND  # 0xC000: truncated element, nesting, broken encapsulation, bad UID
TOO_LARGE = dimse.PIXELS_TOO_LARGE  # decoded pixel data over MAX_DECODED_PIXEL_BYTES
NO_DECODER = dimse.NO_DECODER  # pixel data in a transfer syntax that no decoder exists for
NOT_MATCHING = dimse.DATASET_DOES_NOT_MATCH  # 0xA900: the dataset breaks the image pixel module

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA = 0x7FE00010, 0x7FE00008, 0x7FE00009
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_IMAGE_SOP_CLASSES = frozenset(
    {  # storage SOP classes whose IOD requires pixel data (the ones a model reads)
        uids.CTImageStorage,
        uids.EnhancedCTImageStorage,
        uids.LegacyConvertedEnhancedCTImageStorage,
        uids.MRImageStorage,
        uids.EnhancedMRImageStorage,
        uids.EnhancedMRColorImageStorage,
        uids.LegacyConvertedEnhancedMRImageStorage,
        uids.PositronEmissionTomographyImageStorage,
        uids.EnhancedPETImageStorage,
        uids.LegacyConvertedEnhancedPETImageStorage,
        uids.NuclearMedicineImageStorage,
        uids.ComputedRadiographyImageStorage,
        uids.DigitalXRayImageStorageForPresentation,
        uids.DigitalXRayImageStorageForProcessing,
        uids.DigitalMammographyXRayImageStorageForPresentation,
        uids.DigitalMammographyXRayImageStorageForProcessing,
        uids.BreastTomosynthesisImageStorage,
        uids.XRayAngiographicImageStorage,
        uids.EnhancedXAImageStorage,
        uids.XRayRadiofluoroscopicImageStorage,
        uids.UltrasoundImageStorage,
        uids.UltrasoundMultiFrameImageStorage,
        uids.SecondaryCaptureImageStorage,
        uids.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        uids.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        uids.MultiFrameTrueColorSecondaryCaptureImageStorage,
        uids.RTImageStorage,
        uids.SegmentationStorage,
        uids.ParametricMapStorage,
    }
)


@dataclass(frozen=True, slots=True)
class InstanceRefusal:
    status: int
    reason: str  # for the log: names attributes and limits, never their values


@dataclass(frozen=True, slots=True)
class PixelDescription:
    """The Image Pixel module attributes that size the pixel data."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    photometric: str

    def decoded_bytes(self) -> int:
        """Size once decoded: each sample takes whole bytes (1-bit data unpacks to one byte a pixel)."""
        return self.rows * self.columns * self.frames * self.samples * max(1, self.bits_allocated // 8)

    def native_bytes(self) -> int:
        """Size as encoded natively; YBR_FULL_422 stores two samples a pixel, 1-bit data is packed."""
        bits = self.rows * self.columns * self.frames * self.samples * self.bits_allocated
        if self.photometric == "YBR_FULL_422" and self.samples == 3:
            bits = bits // 3 * 2
        return math.ceil(bits / 8)


class _Refused(Exception):
    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.refusal = InstanceRefusal(status_code, reason)


def check_instance(
    ds: Dataset, encoded_size: int, *, transfer_syntax: str = "", source: Path | None = None
) -> InstanceRefusal | None:
    """Return why an instance must be refused, or None to accept it; transfer_syntax is the negotiated one.

    `source` is the file `ds` was read from with large values left on disk, `encoded_size` that file's size.
    """
    if encoded_size <= 0:
        return InstanceRefusal(MALFORMED, "empty dataset")
    try:
        check_encoding(ds, encoded_size)
        check_sop_class(ds)
        check_pixels(ds, transfer_syntax, encoded_size=encoded_size, source=source)
    except _Refused as refused:
        return refused.refusal
    return None


def _name(tag: int) -> str:
    keyword = keyword_for_tag(tag)
    return keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _is_sequence(raw: RawDataElement) -> bool:
    if raw.VR is not None:
        return bool(raw.VR == "SQ")
    try:
        return bool(dictionary_VR(raw.tag) == "SQ")
    except KeyError:  # private or unknown in implicit VR: pydicom keeps it as bytes
        return False


def check_encoding(ds: Dataset, encoded_size: int = 0) -> None:
    """Walk every element without recursion: each value holds its declared length, sequences nest ≤ the limit."""
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        item, depth = stack.pop()
        for tag in list(item.keys()):
            elem = item.get_item(tag, keep_deferred=True)  # a value left on disk stays there
            if isinstance(elem, RawDataElement):
                if _truncated(elem, encoded_size):
                    raise _Refused(MALFORMED, f"{_name(tag)} is shorter than its declared length (truncated)")
                if not _is_sequence(elem):
                    continue
                elem = _convert(item, tag)
            if elem is not None and elem.VR == "SQ":
                if depth >= MAX_SEQUENCE_DEPTH:
                    raise _Refused(MALFORMED, f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
                stack.extend((child, depth + 1) for child in elem.value or ())


def _truncated(elem: RawDataElement, encoded_size: int) -> bool:
    """Value shorter than its declared length: read short, or (left on disk) running past the end of the file."""
    if elem.length == _UNDEFINED:
        return False
    if elem.value is not None:
        return len(elem.value) < elem.length
    return encoded_size > 0 and elem.value_tell + elem.length > encoded_size


def _convert(item: Dataset, tag: int) -> DataElement:
    """Parse one sequence level (items' own sequences stay raw until the walk reaches them)."""
    try:
        return item[tag]
    except RecursionError:
        raise _Refused(MALFORMED, "sequences nested too deep to decode") from None
    except Exception:  # pydicom's message may quote values: name the attribute only
        raise _Refused(MALFORMED, f"{_name(tag)} cannot be decoded as a sequence") from None


def check_sop_class(ds: Dataset) -> None:
    try:
        check_uid("SOPClassUID", _text(ds, "SOPClassUID"))
    except InvalidUid as exc:
        raise _Refused(MALFORMED, str(exc)) from None


def check_pixels(ds: Dataset, transfer_syntax: str, *, encoded_size: int = 0, source: Path | None = None) -> None:
    """Image pixel module: present where the SOP class needs it, described, under the cap, consistent in size."""
    pixel_tag = next((tag for tag in (_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA) if tag in ds), None)
    if pixel_tag is None:
        if _text(ds, "SOPClassUID") in _IMAGE_SOP_CLASSES:
            raise _Refused(NOT_MATCHING, "PixelData missing from an image SOP class")
        return
    description = describe_pixels(ds, integer=pixel_tag == _PIXEL_DATA)
    elem = ds.get_item(pixel_tag, keep_deferred=True)
    value = elem.value if elem is not None else None
    data = value if isinstance(value, bytes | bytearray) else b""  # no copy of the pixel data
    encapsulated = isinstance(elem, RawDataElement) and elem.length == _UNDEFINED
    on_disk = isinstance(elem, RawDataElement) and value is None and source is not None  # left there by the read
    syntax = uids.UID(transfer_syntax) if transfer_syntax else None
    if syntax is not None and syntax.is_encapsulated != encapsulated:
        raise _Refused(
            MALFORMED,
            "PixelData is encapsulated although the transfer syntax is native"
            if encapsulated
            else "PixelData is not encapsulated although the transfer syntax is",
        )
    if encapsulated:
        if syntax is not None:
            check_decoder(syntax)
        check_size(description)
        if on_disk and isinstance(elem, RawDataElement) and source is not None:
            with open(source, "rb") as handle:
                check_fragments(_InFile(handle, elem.value_tell, encoded_size - elem.value_tell), description.frames)
        else:
            check_fragments(data, description.frames)
        return
    length = len(data)
    if on_disk and isinstance(elem, RawDataElement):
        length = max(0, min(elem.length, encoded_size - elem.value_tell))
    if length < description.native_bytes():
        raise _Refused(
            NOT_MATCHING,
            f"{_name(pixel_tag)} is shorter than Rows x Columns x NumberOfFrames x "
            "SamplesPerPixel x BitsAllocated requires",
        )
    check_size(description)


def check_size(description: PixelDescription) -> None:
    """C6: refuse before anything sizes a buffer from Rows, Columns and NumberOfFrames."""
    if description.decoded_bytes() > MAX_DECODED_PIXEL_BYTES:
        raise _Refused(
            TOO_LARGE,
            f"decoded pixel data would exceed {MAX_DECODED_PIXEL_BYTES // 2**20} MiB "
            "(Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated)",
        )


def check_decoder(syntax: uids.UID) -> None:
    """Refuse a transfer syntax no pixel decoder exists for (an uninstalled plugin is not a reason)."""
    try:
        get_decoder(syntax)
    except NotImplementedError:
        name = syntax.name if syntax.is_transfer_syntax else "an unknown transfer syntax"
        raise _Refused(NO_DECODER, f"no pixel data decoder exists for {name}") from None


class _InFile:
    """A span of a file that check_fragments reads like bytes: only the 8-byte item headers, by seeking."""

    def __init__(self, handle: BinaryIO, start: int, length: int) -> None:
        self._handle, self._start, self._length = handle, start, max(0, length)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, span: slice) -> bytes:
        self._handle.seek(self._start + span.start)
        return self._handle.read(span.stop - span.start)


def check_fragments(data: bytes | bytearray | _InFile, frames: int) -> None:
    """Encapsulated pixel data: a Basic Offset Table item, then at least one fragment a frame (PS3.5 A.4)."""
    offset, items = 0, 0
    while items <= frames and offset + 8 <= len(data):
        group, element, length = struct.unpack("<HHL", data[offset : offset + 8])
        if (group, element) == _SEQUENCE_END:
            break
        if (group, element) != _ITEM:
            raise _Refused(MALFORMED, "encapsulated PixelData holds something other than items")
        if length == _UNDEFINED or offset + 8 + length > len(data):
            raise _Refused(MALFORMED, "a PixelData fragment runs past the end of the data")
        offset, items = offset + 8 + length, items + 1
    if items == 0:
        raise _Refused(MALFORMED, "encapsulated PixelData has no Basic Offset Table item")
    if items - 1 < frames:
        raise _Refused(NOT_MATCHING, "encapsulated PixelData has fewer fragments than NumberOfFrames")


def describe_pixels(ds: Dataset, *, integer: bool) -> PixelDescription:
    """Read the pixel description, refusing a missing or impossible value (integer: PixelData, not float data)."""
    rows, columns = _us(ds, "Rows"), _us(ds, "Columns")
    samples, bits_allocated = _us(ds, "SamplesPerPixel"), _us(ds, "BitsAllocated")
    photometric = _cs(ds, "PhotometricInterpretation")
    frames = _is(ds, "NumberOfFrames") if "NumberOfFrames" in ds else 1
    for keyword, value in (("Rows", rows), ("Columns", columns), ("NumberOfFrames", frames)):
        if value < 1:
            raise _Refused(NOT_MATCHING, f"{keyword} is not a positive integer")
    if samples not in (1, 3, 4):
        raise _Refused(NOT_MATCHING, "SamplesPerPixel is not 1, 3 or 4")
    if bits_allocated == 0 or bits_allocated > 64 or (bits_allocated != 1 and bits_allocated % 8):
        raise _Refused(NOT_MATCHING, "BitsAllocated is not 1 or a multiple of 8 up to 64")
    if integer:
        if not 1 <= _us(ds, "BitsStored") <= bits_allocated:
            raise _Refused(NOT_MATCHING, "BitsStored is not between 1 and BitsAllocated")
        if _us(ds, "PixelRepresentation") not in (0, 1):
            raise _Refused(NOT_MATCHING, "PixelRepresentation is not 0 or 1")
    return PixelDescription(rows, columns, frames, samples, bits_allocated, photometric)


def _element(ds: Dataset, keyword: str) -> DataElement | RawDataElement:
    elem = ds.get_item(Tag(keyword)) if keyword in ds else None
    if elem is None or elem.value in (None, b"", ""):
        raise _Refused(NOT_MATCHING, f"{keyword} missing from the image pixel module")
    return elem


def _us(ds: Dataset, keyword: str) -> int:
    """An unsigned short, read from the raw bytes when still raw (no conversion, no warnings)."""
    elem = _element(ds, keyword)
    value = elem.value
    if isinstance(elem, RawDataElement) and isinstance(value, bytes):
        if len(value) != 2:
            raise _Refused(NOT_MATCHING, f"{keyword} is not a single unsigned short")
        return int(struct.unpack("<H" if elem.is_little_endian else ">H", value)[0])
    if not isinstance(value, int):
        raise _Refused(NOT_MATCHING, f"{keyword} is not a single unsigned short")
    return value


def _is(ds: Dataset, keyword: str) -> int:
    """An integer string: one value, digits only."""
    value = _element(ds, keyword).value
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    text = text.strip(" \x00")
    if not text.lstrip("+").isdigit():
        raise _Refused(NOT_MATCHING, f"{keyword} is not a positive integer")
    return int(text)


def _cs(ds: Dataset, keyword: str) -> str:
    value = _element(ds, keyword).value
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip(" \x00")


def _text(ds: Dataset, keyword: str) -> str:
    """A short text value, from the raw bytes when still raw: converting would warn and quote the value."""
    elem = ds.get_item(Tag(keyword)) if keyword in ds else None
    value = elem.value if elem is not None else None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    return text.strip(" \x00")


def check_command(encoded: bytes) -> InstanceRefusal | None:
    """N15: each UID in a DIMSE command set (implicit VR little endian) has an even length and is a valid UID.

    pynetdicom decodes a command set leniently: an odd-length or malformed UID reaches the handler unpadded or
    garbled, and a well-formed dataset would then be stored under a command that breaks PS3.5 7.1.1 and 9.1.
    The command's own bytes are the only place the length is still visible, so the check reads them.
    """
    offset = 0
    while offset + 8 <= len(encoded):
        group, element, length = struct.unpack_from("<HHL", encoded, offset)
        value = encoded[offset + 8 : offset + 8 + length]
        offset += 8 + length
        tag = group << 16 | element
        try:
            is_uid = dictionary_VR(tag) == "UI"
        except KeyError:  # an element no command defines: pynetdicom ignores it, and so do we
            continue
        if not is_uid:
            continue
        if length % 2 or len(value) != length:
            return InstanceRefusal(MALFORMED, f"{_name(tag)} in the command set has an odd or short length")
        try:
            check_uid(_name(tag), value.decode("ascii", "replace"))
        except InvalidUid as exc:
            return InstanceRefusal(MALFORMED, f"{exc} (command set)")
    return None
