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
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from billiard.exceptions import SoftTimeLimitExceeded
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut

from worker.errors import StudyRejected
from worker.volume import Volume

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ by less are the same orientation (≈0.06°)
SPACING_TOLERANCE = 0.02  # slice steps may differ from their mean by 2% of it (rounding in ImagePositionPatient)
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
             "SeriesInstanceUID")
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1 … .7.4
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_IN_STACK = (pydicom.tag.Tag("InStackPositionNumber"), pydicom.tag.Tag("ImagePositionPatient"))


class SeriesNotLoadable(StudyRejected):
    """The files do not form one volume; `reason` says why and never quotes a UID or patient value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NotASlice(Exception):
    """A file that is not part of any volume; the message is the reason counted in the log."""


@dataclass(frozen=True, slots=True)
class _Slice:
    """One candidate plane: its header, frame number (0: single-frame), geometry, rescale and stack."""

    ds: Dataset
    frame: int
    position_mm: NDArray[np.float64]
    orientation: NDArray[np.float64]
    pixel_spacing_mm: NDArray[np.float64]
    rescale: tuple[float, float] | None  # (slope, intercept) of a frame; None: the single-frame modality LUT
    stack: Hashable


def load_series(paths: Sequence[Path], *, min_slices: int = 2) -> Volume:
    """Read the files, keep the largest stack of image planes, check its geometry and decode it."""
    not_used: Counter[str] = Counter()
    planes = _candidates(sorted(_read_all(paths, not_used), key=_instance_order), not_used)
    if not planes:
        raise SeriesNotLoadable(f"none of {len(paths)} files holds an image slice with position and orientation"
                                f"{_listed(not_used)}")
    stack = _largest_stack(planes, not_used)
    if len(stack) < min_slices:
        raise SeriesNotLoadable(f"series has {len(stack)} slice(s), at least {min_slices} are needed")
    _check_same(stack, "orientation", "mixed orientations in one series (ImageOrientationPatient differs)",
                tolerance=ORIENTATION_TOLERANCE)
    _check_same(stack, "pixel_spacing_mm", "mixed pixel spacings in one series (PixelSpacing differs)",
                tolerance=1e-4)
    _check_size(stack)
    slices = _sorted_along_normal(stack)
    step = _slice_step(slices)
    array = _decode_all(slices)
    for s in slices:
        if "PixelData" in s.ds:
            del s.ds.PixelData
        _complete_copied(s.ds)
    log.info("loaded series: %d slices of %dx%d%s%s", len(slices), array.shape[1], array.shape[2],
             " (frames of one enhanced multi-frame image)" if slices[0].frame else "",
             f"; not used{_listed(not_used)}" if not_used else "")
    frames = tuple(s.frame for s in slices) if slices[0].frame else ()
    return Volume(array=array, affine=_affine(slices[0], step), datasets=tuple(s.ds for s in slices),
                  frame_numbers=frames)


def read_source(path: Path) -> Dataset:
    """Read one spooled file with its text re-declared as UTF-8 (see utf8_text)."""
    ds = pydicom.dcmread(path)
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
    ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"


def _complete_copied(ds: Dataset) -> None:
    """Repair what results copy from the source so that they stay valid: absent Type 2 patient and study attributes
    get an empty value (highdicom reads each; the GE head CT has no PatientBirthDate), and a source marked
    de-identified without saying how (Type 1C, empty in the GE head CT) says that the method was not stated."""
    for keyword in _COPIED_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if (str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not ds.get("DeidentificationMethod")
            and not ds.get("DeidentificationMethodCodeSequence")):
        ds.DeidentificationMethod = "not stated by the source"


def _read_all(paths: Sequence[Path], not_used: Counter[str]) -> list[Dataset]:
    """Parse every file; unreadable ones are counted and skipped (a missing slice then shows as a gap)."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(read_source(path))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            not_used[f"unreadable ({type(exc).__name__})"] += 1
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


def _candidates(datasets: Sequence[Dataset], not_used: Counter[str]) -> list[_Slice]:
    """Every plane of every image that can be part of a volume; the others are counted in not_used by reason."""
    planes: list[_Slice] = []
    for ds in datasets:
        try:
            _check_image(ds)
            planes += _frames(ds) if "PerFrameFunctionalGroupsSequence" in ds else [_single(ds)]
        except _NotASlice as exc:
            not_used[str(exc)] += 1
    return planes


def _check_image(ds: Dataset) -> None:
    """Raise _NotASlice for what is no volume slice: no pixels, secondary captures and other secondary derived
    images, localizers, mosaics, colour."""
    if "PixelData" not in ds:
        raise _NotASlice("no pixel data (SR, dose report, presentation state or similar)")
    if str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE):
        raise _NotASlice("secondary capture")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if image_type[:2] == ["DERIVED", "SECONDARY"]:  # DERIVED\PRIMARY stays: e.g. lossy-compressed originals
        raise _NotASlice("secondary derived image (reformat, projection or capture)")
    if "LOCALIZER" in image_type:
        raise _NotASlice("localizer")
    if "MOSAIC" in image_type:
        raise _NotASlice("mosaic (several slices tiled in one image)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise _NotASlice("colour image")


def _single(ds: Dataset) -> _Slice:
    """A single-frame image as a plane of its series' stack."""
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise _NotASlice("multi-frame image without per-frame functional groups")
    if not all(keyword in ds for keyword in _REQUIRED):
        raise _NotASlice("image without position, orientation or pixel spacing")
    return _Slice(ds=ds, frame=0, position_mm=_vector(ds.ImagePositionPatient, 3),
                  orientation=_vector(ds.ImageOrientationPatient, 6), pixel_spacing_mm=_vector(ds.PixelSpacing, 2),
                  rescale=None, stack=("series", str(ds.SeriesInstanceUID)))


def _frames(ds: Dataset) -> list[_Slice]:
    """The frames of an enhanced multi-frame image, each with its functional groups (per-frame before shared)."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != int(ds.get("NumberOfFrames", 0) or 0) or not all(k in ds for k in ("Rows", "Columns")):
        raise _NotASlice("multi-frame image whose functional groups do not match its frames")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    planes = []
    for number, groups in enumerate(per_frame, start=1):
        position = _group_item(groups, shared, "PlanePositionSequence").get("ImagePositionPatient")
        orientation = _group_item(groups, shared, "PlaneOrientationSequence").get("ImageOrientationPatient")
        spacing = _group_item(groups, shared, "PixelMeasuresSequence").get("PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise _NotASlice("multi-frame image without plane position, orientation or pixel spacing")
        cosines = _vector(orientation, 6)
        planes.append(_Slice(ds=ds, frame=number, position_mm=_vector(position, 3), orientation=cosines,
                             pixel_spacing_mm=_vector(spacing, 2), rescale=_frame_rescale(ds, groups, shared),
                             stack=_frame_stack(ds, groups, shared, cosines)))
    return planes


def _group_item(groups: Dataset, shared: Dataset, keyword: str) -> Dataset:
    """The first item of a functional group macro, per-frame if present there, else shared, else empty."""
    for source in (groups, shared):
        if source.get(keyword):
            item: Dataset = source[keyword][0]
            return item
    return Dataset()


def _frame_rescale(ds: Dataset, groups: Dataset, shared: Dataset) -> tuple[float, float]:
    """(slope, intercept) from Pixel Value Transformation, else the top-level attributes, else identity."""
    item = _group_item(groups, shared, "PixelValueTransformationSequence")
    slope = item.get("RescaleSlope", ds.get("RescaleSlope", 1.0))
    intercept = item.get("RescaleIntercept", ds.get("RescaleIntercept", 0.0))
    return float(slope if slope not in (None, "") else 1.0), float(intercept if intercept not in (None, "") else 0.0)


def _frame_stack(ds: Dataset, groups: Dataset, shared: Dataset, orientation: NDArray[np.float64]) -> Hashable:
    """What frames of one stack share: instance, orientation, frame type, Stack ID, non-positional dimensions."""
    frame_type: tuple[str, ...] = ()
    for source in (groups, shared):
        for element in source:
            if element.keyword.endswith("FrameTypeSequence") and element.value and not frame_type:
                frame_type = tuple(str(v) for v in element.value[0].get("FrameType", []))
    content = _group_item(groups, shared, "FrameContentSequence")
    indices = content.get("DimensionIndexValues")
    indices = [indices] if isinstance(indices, int) else list(indices or [])
    pointers = [item.get("DimensionIndexPointer") for item in ds.get("DimensionIndexSequence", [])]
    dimensions = tuple(int(v) for pointer, v in zip(pointers, indices, strict=False) if pointer not in _IN_STACK)
    return ("frames", str(ds.SOPInstanceUID), tuple(np.round(orientation, 3).tolist()), frame_type,
            str(content.get("StackID", "")), dimensions)


def _vector(value: object, length: int) -> NDArray[np.float64]:
    """A multi-valued number as a float vector of the expected length."""
    try:
        vector = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise _NotASlice("image with unreadable geometry values") from None
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise _NotASlice("image with unreadable geometry values")
    return vector


def _largest_stack(planes: Sequence[_Slice], not_used: Counter[str]) -> list[_Slice]:
    """The planes of the stack with the most of them (ties: the first in instance order); the rest are counted."""
    counts = Counter(plane.stack for plane in planes)
    chosen = counts.most_common(1)[0][0]
    if len(counts) > 1:
        log.info("files hold %d image stacks, using the largest", len(counts))
    for plane in planes:
        if plane.stack != chosen:
            not_used["frame(s) of another stack" if plane.frame else "image(s) of another series"] += 1
    return [plane for plane in planes if plane.stack == chosen]


def _check_same(stack: Sequence[_Slice], field: str, problem: str, *, tolerance: float) -> None:
    """Refuse the stack unless every plane has (nearly) the same value of `field`."""
    first = getattr(stack[0], field)
    for plane in stack[1:]:
        if not np.allclose(getattr(plane, field), first, rtol=0.0, atol=tolerance):
            raise SeriesNotLoadable(problem)


def _check_size(stack: Sequence[_Slice]) -> None:
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


def _sorted_along_normal(stack: Sequence[_Slice]) -> list[_Slice]:
    """Sort ascending by position projected on the normal; refuse duplicate positions."""
    normal = _normal(stack[0].orientation)
    distances = [float(np.dot(plane.position_mm, normal)) for plane in stack]
    order = np.argsort(distances, kind="stable")
    gaps = np.diff(np.asarray(distances)[order])
    duplicates = int(np.count_nonzero(gaps < 1e-3))
    if duplicates:
        raise SeriesNotLoadable(f"{duplicates} slice(s) share a position with another slice (duplicate positions)")
    return [stack[int(index)] for index in order]


def _slice_step(slices: Sequence[_Slice]) -> NDArray[np.float64]:
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
            f"(tolerance {SPACING_TOLERANCE:.0%} of the step)")
    return mean_step


def _decode_all(slices: Sequence[_Slice]) -> NDArray[np.float32]:
    """Modality values of every slice, (slice, row, column) float32; a multi-frame instance is decoded once."""
    if not slices[0].frame:
        return np.stack([_decode(s.ds) for s in slices])
    stored = _pixels(slices[0].ds)
    if stored.ndim == 2:  # an enhanced image with one frame
        stored = stored[None]
    if stored.shape != (int(slices[0].ds.NumberOfFrames), int(slices[0].ds.Rows), int(slices[0].ds.Columns)):
        raise SeriesNotLoadable(f"decoded image has shape {stored.shape}, expected frames x rows x columns")
    array = np.empty((len(slices), *stored.shape[1:]), dtype=np.float32)
    for k, s in enumerate(slices):
        slope, intercept = s.rescale or (1.0, 0.0)
        array[k] = stored[s.frame - 1].astype(np.float64) * slope + intercept
    return array


def _decode(ds: Dataset) -> NDArray[np.float32]:
    """Pixel data → modality values (rescale slope/intercept or modality LUT) as float32."""
    stored = _pixels(ds)
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise SeriesNotLoadable(f"decoded image has shape {stored.shape}, expected rows x columns")
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def _pixels(ds: Dataset) -> NDArray[np.generic]:
    """Stored pixel values; decoding errors become a refusal that names only the exception type."""
    try:
        return np.asarray(ds.pixel_array)
    except SoftTimeLimitExceeded:  # the task's time limit, not a decoding fault
        raise
    except Exception as exc:  # pydicom raises many types; its text may quote element values
        raise SeriesNotLoadable(f"pixel data could not be decoded ({type(exc).__name__})") from None


def _affine(first: _Slice, step: NDArray[np.float64]) -> NDArray[np.float64]:
    """Voxel (slice, row, column, 1) → LPS mm; column 0 is the measured slice step, not SliceThickness."""
    row_spacing_mm, column_spacing_mm = (float(v) for v in first.pixel_spacing_mm)
    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = step
    affine[:3, 1] = first.orientation[3:] * row_spacing_mm  # down a column: rows advance
    affine[:3, 2] = first.orientation[:3] * column_spacing_mm  # along a row: columns advance
    affine[:3, 3] = first.position_mm
    return affine
