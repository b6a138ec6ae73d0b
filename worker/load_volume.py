# over 300 lines: reading, stacking, geometry checks and decoding of one series are one step
"""Step 6 input: DICOM files of one series → Volume (decoded, rescaled, sorted along the slice normal).

A slice is a single-frame image or one frame of an enhanced multi-frame image (geometry and rescale from its
per-frame or shared functional groups). Slices group into stacks: all single-frame images of one series form one
stack; the frames of a multi-frame instance form one stack per orientation, frame type, Stack ID and dimension
index other than the position in the stack (a Philips field map holds a magnitude and a phase stack at the same
positions). The largest stack becomes the volume (ties: lowest Instance Number, then first frame); the rest is
counted as not used, with the reason. A gantry tilt is kept as a sheared grid; uneven slice spacing is refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from billiard.exceptions import SoftTimeLimitExceeded
from numpy.typing import NDArray
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import UID

from pacsai.errors import StudyRejected
from pacsai.storage import intact, judge_intact
from worker.slices import NotASlice, Slice, check_image, frames, single
from worker.volume import Volume, release_freed_memory
from worker.volume_memory import empty_volume

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ by less are the same orientation (≈0.06°)
SPACING_TOLERANCE = 0.02  # slice steps may differ from their mean by 2% of it (rounding in ImagePositionPatient)
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})  # the VRs whose values use the character set
# VRs whose values never use it (binary, or the default repertoire only): their bytes need no check
_CHARSET_FREE_VRS = frozenset(
    {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "OB", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV"}
    | {"TM", "UI", "UL", "UR", "US", "UV"}
)
_COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class SeriesNotLoadable(StudyRejected):
    """The files do not form one volume; `reason` says why and never quotes a UID or patient value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_series(paths: Sequence[Path], *, min_slices: int = 2, check_files: bool = False) -> Volume:
    """Read the files, keep the largest stack of image planes, check its geometry and decode it.

    `check_files`: S7, each spooled file's bytes against the hash recorded when it was written, hashed as they are
    read (SpoolCorrupted if any differs; a file that cannot be read raises its OSError)."""
    not_used: Counter[str] = Counter()
    planes = _candidates(sorted(_read_all(paths, not_used, check_files), key=_instance_order), not_used)
    if not planes:
        raise SeriesNotLoadable(
            f"none of {len(paths)} files holds an image slice with position and orientation{_listed(not_used)}"
        )
    stack = _largest_stack(planes, not_used)
    if len(stack) < min_slices:
        raise SeriesNotLoadable(f"series has {len(stack)} slice(s), at least {min_slices} are needed")
    _check_same(
        stack,
        "orientation",
        "mixed orientations in one series (ImageOrientationPatient differs)",
        tolerance=ORIENTATION_TOLERANCE,
    )
    _check_same(stack, "pixel_spacing_mm", "mixed pixel spacings in one series (PixelSpacing differs)", tolerance=1e-4)
    _check_size(stack)
    slices = _sorted_along_normal(stack)
    step = _slice_step(slices)
    array = _decode_all(slices)
    for s in slices:
        if "PixelData" in s.ds:  # a multi-frame source's, decoded whole
            del s.ds.PixelData
        _complete_copied(s.ds)
    log.info(
        "loaded series: %d slices of %dx%d%s%s",
        len(slices),
        array.shape[1],
        array.shape[2],
        " (frames of one enhanced multi-frame image)" if slices[0].frame else "",
        f"; not used{_listed(not_used)}" if not_used else "",
    )
    frames = tuple(s.frame for s in slices) if slices[0].frame else ()
    release_freed_memory()
    return Volume(
        array=array, affine=_affine(slices[0], step), datasets=tuple(s.ds for s in slices), frame_numbers=frames
    )


def read_source(path: Path | BinaryIO) -> Dataset:
    """Read one spooled file (or its bytes) with its text re-declared as UTF-8 (see utf8_text)."""
    ds = pydicom.dcmread(path)
    if isinstance(ds, FileDataset):
        ds.buffer = None  # pydicom keeps a buffer read from; its values are all read (nothing deferred)
    utf8_text(ds)
    return ds


def utf8_text(ds: Dataset) -> None:
    """C8: decode every text value with the declared Specific Character Set, then declare ISO_IR 192 (UTF-8).

    Results copy patient and study attributes from their source, so they are valid whatever the source declared:
    ISO 2022 code extensions, GBK, GB18030, or an unknown or misspelt term, which pydicom decodes with its default
    (ISO-IR 6 / latin-1), replacing bytes that do not decode and warning without the value. Without a declared
    character set (the default repertoire) nothing changes.
    """
    if not ds.get("SpecificCharacterSet"):
        return
    if not _plain_ascii(ds):  # text as 7-bit ASCII reads the same in every character set: no decoding needed
        ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"


def _plain_ascii(ds: Dataset) -> bool:
    """True when no text value (nor any value of unknown VR, nor a sequence) holds a byte outside 7-bit ASCII or
    an ESC (ISO 2022 code extensions are 7-bit). Such bytes mean the same in UTF-8 as in any character set DICOM
    allows, so re-declaring is enough; `Dataset.decode` would convert all ~50 elements of each slice (0.4 s for
    300 slices). Sequences are converted to reach their items. Conservative: binary bytes in an implicit-VR value
    (its VR unknown here) send the dataset to `decode`."""
    for element in list(ds.elements()):  # raw elements are not converted by iterating
        if element.VR == "SQ":  # converted into items whose elements stay raw
            if not all(_plain_ascii(item) for item in ds[element.tag].value):
                return False
        elif isinstance(element, RawDataElement):
            if element.VR not in _CHARSET_FREE_VRS and not _ascii(element.value):
                return False
        elif element.VR in TEXT_VRS and not all(_ascii(value) for value in text_values(element.value)):
            return False
    return True


def _ascii(value: object) -> bool:
    if isinstance(value, bytes | str):
        return value.isascii() and ("\x1b" not in value if isinstance(value, str) else b"\x1b" not in value)
    return value is None


def text_values(value: object) -> list[object]:
    """The values of a text element: its one value, or each of a multi-valued one."""
    return list(value) if isinstance(value, list | MultiValue) else [value]


def _complete_copied(ds: Dataset) -> None:
    """Repair what results copy from the source so that they stay valid: absent Type 2 patient and study attributes
    get an empty value (highdicom reads each; the GE head CT has no PatientBirthDate), and a source marked
    de-identified without saying how (Type 1C, empty in the GE head CT) says that the method was not stated."""
    for keyword in _COPIED_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if (
        str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not ds.get("DeidentificationMethod")
        and not ds.get("DeidentificationMethodCodeSequence")
    ):
        ds.DeidentificationMethod = "not stated by the source"


def _read_all(paths: Sequence[Path], not_used: Counter[str], check_files: bool) -> list[Dataset]:
    """Parse every file; unreadable ones are counted and skipped (a missing slice then shows as a gap). With
    `check_files`, each file is read once: its bytes are hashed (in a thread: hashlib releases the GIL, so the hash
    can run beside pydicom's parsing) and parsed from memory; an unreadable file raises its OSError."""
    datasets: list[Dataset] = []
    verdicts: list[Future[bool | None]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        for path in paths:
            data = path.read_bytes() if check_files else None
            if data is not None:
                verdicts.append(hasher.submit(intact, path, data))
            try:
                datasets.append(read_source(path if data is None else BytesIO(data)))
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                not_used[f"unreadable ({type(exc).__name__})"] += 1
    judge_intact([verdict.result() for verdict in verdicts])
    return datasets


def _instance_order(ds: Dataset) -> tuple[int, str]:
    """Instance Number, then SOP Instance UID: ties between stacks go the same way whatever the file order."""
    try:
        number = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return number, str(ds.get("SOPInstanceUID", ""))


def _listed(not_used: Counter[str]) -> str:
    """': 3 localizer, 1 no pixel data' or '' — counts by reason, for logs and refusals."""
    return (": " + ", ".join(f"{count} {reason}" for reason, count in sorted(not_used.items()))) if not_used else ""


def _candidates(datasets: Sequence[Dataset], not_used: Counter[str]) -> list[Slice]:
    """Every plane of every image that can be part of a volume; the others are counted in not_used by reason."""
    planes: list[Slice] = []
    for ds in datasets:
        try:
            check_image(ds)
            planes += frames(ds) if "PerFrameFunctionalGroupsSequence" in ds else [single(ds)]
        except NotASlice as exc:
            not_used[str(exc)] += 1
    return planes


def _largest_stack(planes: Sequence[Slice], not_used: Counter[str]) -> list[Slice]:
    """The planes of the stack with the most of them (ties: the first in instance order); the rest are counted."""
    counts = Counter(plane.stack for plane in planes)
    chosen = counts.most_common(1)[0][0]
    if len(counts) > 1:
        log.info("files hold %d image stacks, using the largest", len(counts))
    for plane in planes:
        if plane.stack != chosen:
            not_used["frame(s) of another stack" if plane.frame else "image(s) of another series"] += 1
    return [plane for plane in planes if plane.stack == chosen]


def _check_same(stack: Sequence[Slice], field: str, problem: str, *, tolerance: float) -> None:
    """Refuse the stack unless every plane has (nearly) the same value of `field`."""
    first = getattr(stack[0], field)
    for plane in stack[1:]:
        if not np.allclose(getattr(plane, field), first, rtol=0.0, atol=tolerance):
            raise SeriesNotLoadable(problem)


def _check_size(stack: Sequence[Slice]) -> None:
    """Refuse a stack of images of different sizes."""
    sizes = {(int(plane.ds.Rows), int(plane.ds.Columns)) for plane in stack}
    if len(sizes) > 1:
        raise SeriesNotLoadable("mixed image sizes in one series (Rows/Columns differ)")


def _normal(orientation: NDArray[np.float64]) -> NDArray[np.float64]:
    """Unit slice normal: row direction × column direction (ImageOrientationPatient halves)."""
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if length < 0.5 or abs(float(np.dot(orientation[:3], orientation[3:]))) > 0.01:
        raise SeriesNotLoadable("ImageOrientationPatient is not two orthogonal unit vectors")
    return normal / length


def _sorted_along_normal(stack: Sequence[Slice]) -> list[Slice]:
    """Sort ascending by position projected on the normal; refuse duplicate positions."""
    normal = _normal(stack[0].orientation)
    distances = [float(np.dot(plane.position_mm, normal)) for plane in stack]
    order = np.argsort(distances, kind="stable")
    gaps = np.diff(np.asarray(distances)[order])
    duplicates = int(np.count_nonzero(gaps < 1e-3))
    if duplicates:
        raise SeriesNotLoadable(f"{duplicates} slice(s) share a position with another slice (duplicate positions)")
    return [stack[int(index)] for index in order]


def _slice_step(slices: Sequence[Slice]) -> NDArray[np.float64]:
    """Mean step between neighbouring origins; refuse the series if steps differ beyond SPACING_TOLERANCE.

    The step may be oblique to the image plane (gantry tilt): it stays so, and the affine is sheared.
    """
    positions = np.stack([s.position_mm for s in slices])
    steps = np.diff(positions, axis=0)
    mean_step: NDArray[np.float64] = (positions[-1] - positions[0]) / (len(slices) - 1)
    step_mm = float(np.linalg.norm(mean_step))
    deviation_mm = float(np.max(np.linalg.norm(steps - mean_step, axis=1)))
    if deviation_mm > SPACING_TOLERANCE * step_mm:
        lengths = np.linalg.norm(steps, axis=1)
        raise SeriesNotLoadable(
            f"uneven slice spacing: steps from {lengths.min():.2f} to {lengths.max():.2f} mm, mean {step_mm:.2f} mm "
            f"(tolerance {SPACING_TOLERANCE:.0%} of the step)"
        )
    return mean_step


def _decode_all(slices: Sequence[Slice]) -> NDArray[np.float32]:
    """Modality values of every slice, (slice, row, column) float32; a multi-frame instance is decoded once.

    Single-frame slices are decoded one by one into one preallocated array, each header losing its pixel data
    once decoded: at most one slice's temporaries exist besides the volume.
    """
    if not slices[0].frame:
        array = empty_volume((len(slices), int(slices[0].ds.Rows), int(slices[0].ds.Columns)))
        for k, s in enumerate(slices):
            _decode_into(s.ds, array[k])
            del s.ds.PixelData
        return array
    stored = _pixels(slices[0].ds)
    if stored.ndim == 2:  # an enhanced image with one frame
        stored = stored[None]
    if stored.shape != (int(slices[0].ds.NumberOfFrames), int(slices[0].ds.Rows), int(slices[0].ds.Columns)):
        raise SeriesNotLoadable(f"decoded image has shape {stored.shape}, expected frames x rows x columns")
    array = empty_volume((len(slices), *stored.shape[1:]))
    for k, s in enumerate(slices):
        slope, intercept = s.rescale or (1.0, 0.0)
        array[k] = stored[s.frame - 1].astype(np.float64) * slope + intercept
    return array


def _decode_into(ds: Dataset, out: NDArray[np.float32]) -> None:
    """Pixel data → modality values (rescale slope/intercept or modality LUT), written into `out` (rows, columns)."""
    native = _native_pixels(ds, out.shape)
    stored: NDArray[np.generic] = _pixels(ds) if native is None else native
    if stored.shape != out.shape:
        raise SeriesNotLoadable(f"decoded image has shape {stored.shape}, expected rows x columns")
    if "ModalityLUTSequence" in ds:
        out[...] = apply_modality_lut(stored, ds)
        return
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None or intercept is None:  # what apply_modality_lut does: no rescale without both
        out[...] = stored
        return
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")  # in float32, no temporary
    out += np.float32(intercept)


def _native_pixels(ds: Dataset, shape: tuple[int, ...]) -> NDArray[np.generic] | None:
    """Stored values of an uncompressed little-endian 16-bit greyscale frame, read in place from PixelData (bits
    above BitsStored masked, or sign-extended, as pydicom does); None when pydicom has to decode it."""
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not syntax or syntax.is_compressed or not syntax.is_little_endian or "PixelData" not in ds:
        return None
    if int(ds.get("BitsAllocated", 0) or 0) != 16 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    data = ds.PixelData
    bits, signed = int(ds.get("BitsStored", 16) or 16), int(ds.get("PixelRepresentation", 0) or 0) == 1
    if not isinstance(data, bytes) or len(data) < 2 * shape[0] * shape[1] or not 0 < bits <= 16:
        return None
    count = shape[0] * shape[1]
    if signed:
        values = np.frombuffer(data, dtype="<i2", count=count).reshape(shape)
        return values if bits == 16 else (values << (16 - bits)) >> (16 - bits)
    unsigned = np.frombuffer(data, dtype="<u2", count=count).reshape(shape)
    return unsigned if bits == 16 else unsigned & np.uint16((1 << bits) - 1)


def _pixels(ds: Dataset) -> NDArray[np.generic]:
    """Stored pixel values; decoding errors become a refusal that names only the exception type."""
    try:
        return np.asarray(ds.pixel_array)
    except SoftTimeLimitExceeded:  # the task's time limit, not a decoding fault
        raise
    except Exception as exc:  # pydicom raises many types; its text may quote element values
        raise SeriesNotLoadable(f"pixel data could not be decoded ({type(exc).__name__})") from None


def _affine(first: Slice, step: NDArray[np.float64]) -> NDArray[np.float64]:
    """Voxel (slice, row, column, 1) → LPS mm; column 0 is the measured slice step, not SliceThickness."""
    row_spacing_mm, column_spacing_mm = (float(v) for v in first.pixel_spacing_mm)
    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = step
    affine[:3, 1] = first.orientation[3:] * row_spacing_mm  # down a column: rows advance
    affine[:3, 2] = first.orientation[:3] * column_spacing_mm  # along a row: columns advance
    affine[:3, 3] = first.position_mm
    return affine
